"""The demo study: TPE over five llama.cpp flags on a locally generated model, with a TTFT SLO.

Numbers here are sized for a 2-core machine so the whole demo ends in a few minutes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def demo_spec(model: Path, tokenizer: Path, trials: int = 12) -> dict[str, Any]:
    """The demo's spec document (before validation): llama.cpp on ``model`` with ``trials`` trials."""
    cpus = max(1, len(os.sched_getaffinity(0)))
    return {
        "name": None,
        "engine": {"kind": "llamacpp", "model": str(model), "tokenizer": str(tokenizer)},
        "deployment": {"kind": "local", "startup_timeout_s": 60},
        "space": {
            "params": {
                "threads": {"kind": "int", "low": 1, "high": max(2, cpus)},
                "parallel": {"kind": "choice", "values": [1, 2, 4, 8]},
                "batch-size": {"kind": "choice", "values": [64, 128, 256, 512, 2048]},
                "ubatch-size": {"kind": "choice", "values": [32, 64, 128, 512]},
                "cont-batching": {"kind": "bool"},
            },
            "constraints": ["ubatch-size <= batch-size"],
        },
        "strategy": {"kind": "tpe", "seed": 0, "n_startup_trials": 5},
        "budget": {"max_trials": trials, "confirm_repeats": 1},
        "workload": {
            "api": "completions",
            "input_tokens": 128,
            "output_tokens": 64,
            "concurrency": [8],
            "num_requests": 24,
            "warmup_requests": 2,
            "max_error_rate": 0.0,
        },
        "slos": [{"metric": "ttft_ms", "percentile": "p99", "max_ms": 1500}],
        "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
    }
