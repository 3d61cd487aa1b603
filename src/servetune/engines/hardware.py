"""GPU and model facts the GPU engines' pre-flight checks need: GPUs of the host, config.json.

``probe_gpus`` asks ``nvidia-smi`` (argv, no shell); ``read_model_config`` reads a Hugging Face
``config.json`` from a local path; ``weight_bytes`` estimates the weights' size from it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuFacts:
    """The GPUs one trial may use: ``count`` and ``memory_gib`` (total memory of each, GiB).

    ``count`` 0 means the host has no usable NVIDIA GPU; ``source`` says where the facts came
    from (``engine.gpus`` in the spec, or ``nvidia-smi``) so messages can name it.
    """

    count: int
    memory_gib: float
    source: str = "engine.gpus"


NVIDIA_SMI_QUERY = ["--query-gpu=memory.total", "--format=csv,noheader,nounits"]
"""``nvidia-smi`` arguments that print one line per GPU with its total memory in MiB."""


def probe_gpus(
    *,
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[[list[str]], str] | None = None,
) -> GpuFacts:
    """The NVIDIA GPUs of this host from ``nvidia-smi`` (count and the smallest memory, GiB).

    Returns ``GpuFacts(0, 0.0, reason)`` when ``nvidia-smi`` is missing or fails (no driver, no
    GPU), the reason naming why; never raises. ``which``/``run`` are for tests.
    """
    exe = which("nvidia-smi")
    if exe is None:
        return GpuFacts(0, 0.0, "nvidia-smi not found on PATH (no NVIDIA driver on this host)")
    argv = [exe, *NVIDIA_SMI_QUERY]
    try:
        out = run(argv) if run else _run(argv)
    except (OSError, subprocess.SubprocessError) as e:
        return GpuFacts(0, 0.0, f"nvidia-smi failed: {e}")
    sizes = []
    for line in out.splitlines():
        try:
            sizes.append(float(line.strip()) / 1024)
        except ValueError:
            continue
    if not sizes:
        return GpuFacts(0, 0.0, "nvidia-smi lists no GPU")
    return GpuFacts(len(sizes), min(sizes), "nvidia-smi")


def _run(argv: list[str]) -> str:
    # argv is nvidia-smi (found by which) plus constant arguments: no user input.
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=20).stdout  # noqa: S603


@dataclass(frozen=True)
class ModelFacts:
    """What pre-flight needs from a Hugging Face ``config.json`` (None = not in the file).

    Head counts, layer sizes, vocabulary, context length, the checkpoint dtype
    (``torch_dtype``/``dtype``), the quantization method (``quantization_config.quant_method``)
    and the MoE expert count (``num_local_experts``/``num_experts``/``n_routed_experts``) and
    expert size (``moe_intermediate_size``); ``has_rope_scaling`` (the engines derive a longer
    context from it), ``uses_mla`` (DeepSeek-style latent attention: ``kv_lora_rank``), and
    ``checkpoint_bytes``: the size of the ``*.safetensors`` files next to config.json (None when
    there are none).
    """

    path: str
    num_attention_heads: int | None
    num_key_value_heads: int | None
    hidden_size: int | None
    num_hidden_layers: int | None
    intermediate_size: int | None
    vocab_size: int | None
    max_position_embeddings: int | None
    torch_dtype: str | None
    quant_method: str | None
    num_experts: int | None
    tie_word_embeddings: bool
    moe_intermediate_size: int | None = None
    head_dim: int | None = None
    has_rope_scaling: bool = False
    uses_mla: bool = False
    checkpoint_bytes: int | None = None

    @property
    def kv_heads(self) -> int | None:
        """KV heads (``num_key_value_heads``; absent = multi-head attention, as many as heads)."""
        return self.num_key_value_heads or self.num_attention_heads


class ModelConfigError(ValueError):
    """config.json is missing or unreadable; the message names the path and the fix."""


def config_path(model: str, model_config: str | None) -> Path | None:
    """Where the model's config.json is: ``model_config`` (a file or a folder holding one), else
    ``model/config.json`` when ``model`` is a local folder; None when neither is given locally."""
    if model_config is not None:
        p = Path(model_config).expanduser()
        return p / "config.json" if p.is_dir() else p
    p = Path(model).expanduser()
    if p.is_dir():
        return p / "config.json"
    return None


def read_model_config(path: Path) -> ModelFacts:
    """Parse ``path`` (a config.json) into ModelFacts.

    Multimodal configs that nest the language model under ``text_config`` are read from there.
    Raises ModelConfigError when the file is missing, not JSON, or not a JSON object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelConfigError(f"{path} does not exist") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"{path} is not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path} holds {type(data).__name__}, not a JSON object")
    text = data.get("text_config")
    cfg: Mapping[str, Any] = {**data, **text} if isinstance(text, dict) else data
    quant = cfg.get("quantization_config")
    return ModelFacts(
        path=str(path),
        num_attention_heads=_int(cfg, "num_attention_heads", "n_head"),
        num_key_value_heads=_int(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv"),
        hidden_size=_int(cfg, "hidden_size", "n_embd", "d_model"),
        num_hidden_layers=_int(cfg, "num_hidden_layers", "n_layer"),
        intermediate_size=_int(cfg, "intermediate_size", "ffn_hidden_size"),
        vocab_size=_int(cfg, "vocab_size"),
        max_position_embeddings=_int(cfg, "max_position_embeddings", "max_seq_len"),
        torch_dtype=_str(cfg, "torch_dtype", "dtype"),
        quant_method=str(quant["quant_method"]).lower()
        if isinstance(quant, dict) and quant.get("quant_method")
        else None,
        num_experts=_int(cfg, "num_local_experts", "num_experts", "n_routed_experts"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        moe_intermediate_size=_int(cfg, "moe_intermediate_size"),
        head_dim=_int(cfg, "head_dim"),
        has_rope_scaling=isinstance(cfg.get("rope_scaling"), dict),
        uses_mla=cfg.get("kv_lora_rank") is not None,
        checkpoint_bytes=_checkpoint_bytes(path.parent),
    )


def _checkpoint_bytes(folder: Path) -> int | None:
    """Total size of the ``*.safetensors`` weight files in ``folder`` (None when there are none)."""
    try:
        sizes = [f.stat().st_size for f in folder.glob("*.safetensors") if f.is_file()]
    except OSError:
        return None
    return sum(sizes) if sizes else None


def _int(cfg: Mapping[str, Any], *keys: str) -> int | None:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _str(cfg: Mapping[str, Any], *keys: str) -> str | None:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, str):
            return v
    return None


BYTES_PER_PARAM: Mapping[str, float] = {
    "float32": 4.0,
    "float": 4.0,
    "float16": 2.0,
    "half": 2.0,
    "bfloat16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}
"""Bytes per weight by dtype; 4-bit methods (awq, gptq, ...) are 0.5 (see ``weight_bytes``)."""

_FOUR_BIT = ("awq", "gptq", "marlin", "bitsandbytes", "mxfp4", "nvfp4", "fp4", "wna16", "int4")
_EIGHT_BIT = ("fp8", "int8", "w8a8", "experts_int8", "mxfp8")


def parameter_count(m: ModelFacts) -> int | None:
    """Weights of a decoder-only transformer from its config (None when a size is missing).

    embeddings ``V·h`` (twice unless ``tie_word_embeddings``) + per layer: attention
    ``2·h·heads·d + 2·h·kv·d`` (q and o, k and v; ``d`` = ``head_dim`` or h / heads), MLP ``3·h·i`` (gate, up,
    down; × experts for MoE) and two norms ``2·h``. This is the Llama/Mistral/Qwen layout (Hugging
    Face transformers' modeling_llama); other layouts land within a few percent, which is enough to
    tell "does not fit" from "fits".
    """
    h, n_layers, inter, vocab = (
        m.hidden_size,
        m.num_hidden_layers,
        m.intermediate_size,
        m.vocab_size,
    )
    heads = m.num_attention_heads
    if not (h and n_layers and inter and vocab and heads) or m.uses_mla:
        return None
    head_dim = m.head_dim or h // heads
    kv = m.kv_heads or heads
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    if m.num_experts and m.moe_intermediate_size:
        mlp = 3 * h * m.moe_intermediate_size * m.num_experts
    else:
        mlp = 3 * h * inter * (m.num_experts or 1)
    embed = vocab * h * (1 if m.tie_word_embeddings else 2)
    return embed + n_layers * (attn + mlp + 2 * h) + h


def bytes_per_param(m: ModelFacts, dtype: str | None, quantization: str | None) -> float:
    """Bytes each weight takes when served: from the quantization method (flag, else the
    checkpoint's ``quant_method``), else the dtype flag, else the checkpoint dtype (default 2,
    bf16/fp16). Source: weights = parameters × bytes per parameter, the estimate Hugging Face's
    ``accelerate estimate-memory`` prints."""
    method = (quantization or m.quant_method or "").lower()
    if any(k in method for k in _FOUR_BIT):
        return 0.5
    if any(k in method for k in _EIGHT_BIT):
        return 1.0
    for name in (dtype, m.torch_dtype):
        if name and name != "auto" and name.lower() in BYTES_PER_PARAM:
            return BYTES_PER_PARAM[name.lower()]
    if m.torch_dtype in ("float32", "float"):
        return 2.0  # vLLM/SGLang serve fp32 checkpoints in fp16 under dtype auto
    return 2.0


def weight_gib(m: ModelFacts, dtype: str | None, quantization: str | None) -> float | None:
    """Weights in GiB: the checkpoint's ``*.safetensors`` size when present and no
    ``quantization`` flag changes it, else ``parameter_count × bytes_per_param / 2^30``; None
    when neither is known."""
    if m.checkpoint_bytes is not None and (quantization is None or quantization == m.quant_method):
        if m.quant_method is None and m.torch_dtype:  # a float checkpoint served in ``dtype``
            stored = BYTES_PER_PARAM.get(m.torch_dtype.lower(), 2.0)
            return m.checkpoint_bytes * bytes_per_param(m, dtype, None) / stored / 2**30
        return m.checkpoint_bytes / 2**30
    n = parameter_count(m)
    if n is None:
        return None
    return n * bytes_per_param(m, dtype, quantization) / 2**30
