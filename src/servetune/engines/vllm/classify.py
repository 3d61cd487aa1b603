"""vLLM start-up failures: log lines → FailureKind, evidence and which flag to move which way.

Wordings are vLLM's own (vllm/v1/core/kv_cache_planning.py, vllm/config/scheduler.py,
vllm/config/model.py of 0.33.0; older releases' wordings where they differ, cited per rule).
"""

from __future__ import annotations

import re

from servetune.core.feasibility import Direction
from servetune.core.study import FailureKind
from servetune.engines.logclassify import (
    PORT_IN_USE,
    UNRECOGNIZED_ARGS,
    Classification,
    Rule,
    classify,
)

GMU = "gpu-memory-utilization"

LOG_PREFIX = re.compile(
    r"^(\([\w\s=]+pid=\d+\)\s*)?"
    r"((INFO|WARNING|ERROR|DEBUG|CRITICAL)\s+\d\d-\d\d\s+\d\d:\d\d:\d\d(\.\d+)?\s+\[[^\]]*\]\s*)?"
)
"""vLLM's ``(EngineCore_DP0 pid=223840) ERROR 10-25 13:08:43 [core.py:708] `` line prefix."""

NOT_AN_ERROR = re.compile(r"^(\([^)]*pid=\d+\)\s*)?(INFO|WARNING|DEBUG)[\s:]")
"""vLLM info/warning/debug lines (and uvicorn's ``INFO:``): evidence of nothing, never matched."""

READY = re.compile(r"Application startup complete|Uvicorn running on|Starting vLLM API server")
"""Lines vLLM's API server prints once it listens (uvicorn and vllm/entrypoints/openai)."""

RULES: tuple[Rule, ...] = (
    Rule(FailureKind.INVALID_ARGS, UNRECOGNIZED_ARGS, "vLLM rejected a flag"),
    Rule(
        FailureKind.INVALID_ARGS,
        re.compile(r"max_num_batched_tokens \(\d+\) is smaller than max_model_len"),
        "without chunked prefill vLLM needs max-num-batched-tokens ≥ max-model-len "
        "(scheduler.py verify_max_model_len): raise max-num-batched-tokens, lower "
        "max-model-len, or enable chunked prefill",
        (
            Direction("max-num-batched-tokens", "increase"),
            Direction("max-model-len", "decrease"),
        ),
    ),
    Rule(
        FailureKind.INVALID_ARGS,
        re.compile(r"max_num_batched_tokens \(\d+\) must be greater than or equal to max_num_seqs"),
        "raise max-num-batched-tokens or lower max-num-seqs (scheduler.py)",
        (Direction("max-num-batched-tokens", "increase"), Direction("max-num-seqs", "decrease")),
    ),
    Rule(
        FailureKind.INVALID_ARGS,
        re.compile(r"User-specified max_model_len \(\d+\) is greater than the derived"),
        "max-model-len is above the model's context length (config/model.py): lower it, or set "
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 in engine.env if the model really supports it",
        (Direction("max-model-len", "decrease"),),
    ),
    Rule(
        FailureKind.INVALID_ARGS,
        re.compile(r"attention heads \(\d+\) must be divisible by tensor parallel size"),
        "use a tensor-parallel-size that divides the model's attention heads",
    ),
    Rule(
        FailureKind.INVALID_ARGS,
        re.compile(
            r"is not supported for quantization method|does not match the quantization method|"
            r"Unknown quantization method"
        ),
        "the dtype/quantization combination is not one vLLM runs",
    ),
    Rule(FailureKind.PORT_IN_USE, PORT_IN_USE, "another process holds the port"),
    Rule(
        FailureKind.KV_CACHE_TOO_SMALL,
        re.compile(r"No available memory for the cache blocks|Cannot auto-fit max_model_len"),
        f"the weights and activations leave no room for the KV cache: raise {GMU} "
        "(or serve the model on more GPUs)",
        (Direction(GMU, "increase"),),
    ),
    Rule(
        FailureKind.KV_CACHE_TOO_SMALL,
        re.compile(
            r"KV cache is needed, which is larger than the available KV cache memory|"
            r"is larger than the maximum number of tokens that can be stored in KV cache"
        ),
        f"one request of max-model-len does not fit the KV cache: raise {GMU} or lower "
        "max-model-len",
        (Direction(GMU, "increase"), Direction("max-model-len", "decrease")),
    ),
    Rule(
        FailureKind.CUDA_OOM,
        re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory"),
        f"the GPU ran out of memory outside the KV cache (weights, activations, CUDA graphs): "
        f"lower {GMU}, max-num-seqs or max-cudagraph-capture-size, or set enforce-eager",
        (Direction(GMU, "decrease"), Direction("max-num-seqs", "decrease")),
    ),
    Rule(
        FailureKind.MODEL_LOAD_FAILED,
        re.compile(
            r"is not a local folder and is not a valid model identifier|Repository Not Found|"
            r"does not appear to have a file named config.json|"
            r"Model architectures? \[.*\] (are|is) not supported|No such file or directory.*config"
        ),
        "vLLM could not load the model; check engine.model",
    ),
)
"""Checked in order; the first rule with a matching line decides (see logclassify.classify)."""


def classify_vllm_log(log_text: str, returncode: int | None) -> Classification:
    """(kind, evidence + advice, directions) for a vLLM server log tail and exit status.

    Rules in order: argparse rejections, max-num-batched-tokens vs max-model-len / max-num-seqs,
    tensor parallel vs heads, dtype/quantization → INVALID_ARGS; port bind → PORT_IN_USE;
    "No available memory for the cache blocks" → KV_CACHE_TOO_SMALL (raise
    gpu-memory-utilization); "KV cache is needed, which is larger than the available KV cache
    memory" → KV_CACHE_TOO_SMALL (raise gpu-memory-utilization or lower max-model-len); CUDA out
    of memory → CUDA_OOM (lower gpu-memory-utilization); model not found → MODEL_LOAD_FAILED;
    then the generic endings (ready then died, ready but never generating, SIGKILL).
    """
    return classify(
        RULES,
        log_text,
        returncode,
        ready=READY,
        engine="vLLM",
        prefix=LOG_PREFIX,
        skip=NOT_AN_ERROR,
    )
