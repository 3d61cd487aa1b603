"""Helpers for the vLLM/SGLang unit tests: specs, config.json files, log fixtures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "gpu_logs"

LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
"""meta-llama/Llama-3.1-8B's config.json sizes (about 8.0 B parameters)."""

QWEN2_7B = {**LLAMA_8B, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_size": 3584}
"""Qwen2-7B's head counts (28 heads, 4 KV heads: cannot run at tp 8; vLLM issue #11797)."""

LLAMA_70B = {
    **LLAMA_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
}
"""meta-llama/Llama-3.1-70B's sizes (about 70.6 B parameters, ~131 GiB in bf16)."""


def write_config(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    """A model folder holding ``config.json`` = ``cfg``."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def log(name: str) -> str:
    """A fixture log without its leading '# Source: ...' comment lines."""
    text = (FIXTURES / name).read_text()
    return "\n".join(x for x in text.splitlines() if not x.startswith("# "))


def spec_doc(kind: str, model: str, params: dict[str, Any], **engine: Any) -> dict[str, Any]:
    """A minimal study document for engine ``kind`` tuning ``params``."""
    return {
        "engine": {"kind": kind, "model": model, **engine},
        "space": {"params": params},
        "workload": {
            "input_tokens": 512,
            "output_tokens": 128,
            "concurrency": [8],
            "num_requests": 16,
        },
        "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
    }
