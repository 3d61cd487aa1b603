"""SGLang start-up failures: log lines → FailureKind, evidence and which flag to move which way.

Wordings are SGLang's own: "Not enough memory. Please try to increase --mem-fraction-static."
(0.5.23 model_executor/pool_configurator.py; model_runner.py in older releases) and "Capture cuda
graph failed: ..." (model_executor/runner/decode_cuda_graph_runner.py), as users report them in
sgl-project/sglang issues #4330 and #5285.
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

MFS = "mem-fraction-static"

LOG_PREFIX = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\s+[A-Z]+\d+)*\]\s*")
"""SGLang's ``[2024-10-22 06:31:49 TP0] `` line prefix."""

READY = re.compile(r"The server is fired up and ready to roll|Uvicorn running on")
"""Lines SGLang prints once its HTTP server answers (entrypoints/http_server.py, uvicorn)."""

_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory")


def rules(graph_flag: str) -> tuple[Rule, ...]:
    """Rules in order; ``graph_flag`` is the release's CUDA-graph batch flag
    (cuda-graph-max-bs, or cuda-graph-max-bs-decode from 0.5.23)."""
    return (
        Rule(FailureKind.INVALID_ARGS, UNRECOGNIZED_ARGS, "SGLang rejected a flag"),
        Rule(
            FailureKind.INVALID_ARGS,
            re.compile(r"total_num_heads % tp_size|must be divisible by tensor parallel size"),
            "tp-size does not divide the model's attention heads; use a divisor",
        ),
        Rule(
            FailureKind.INVALID_ARGS,
            re.compile(r"To allow overriding this maximum, set the env var SGLANG_ALLOW_OVERWRITE"),
            "context-length is above the model's (configs/model_config.py): lower it",
            (Direction("context-length", "decrease"),),
        ),
        Rule(
            FailureKind.INVALID_ARGS,
            re.compile(r"tp_size \d+ must be divisible by ep_size"),
            "use an ep-size that divides tp-size",
        ),
        Rule(
            FailureKind.INVALID_ARGS,
            re.compile(r"is not supported for quantization method"),
            "the dtype/quantization combination is not one SGLang runs",
        ),
        Rule(FailureKind.PORT_IN_USE, PORT_IN_USE, "another process holds the port"),
        Rule(
            FailureKind.KV_CACHE_TOO_SMALL,
            re.compile(r"Not enough memory\. Please try to increase --mem-fraction-static"),
            f"after the weights, {MFS} leaves too little for the KV cache pool: raise {MFS} "
            "(the opposite of an out-of-memory error)",
            (Direction(MFS, "increase"),),
        ),
        Rule(
            FailureKind.CUDA_OOM,
            re.compile(r"Capture cuda graph failed.*(out of memory|OutOfMemory)", re.IGNORECASE),
            f"out of memory while capturing CUDA graphs: lower {MFS} or {graph_flag}",
            (Direction(MFS, "decrease"), Direction(graph_flag, "decrease")),
        ),
        Rule(
            FailureKind.CUDA_OOM,
            _OOM,
            f"the GPU ran out of memory (weights, activations or CUDA graphs): lower {MFS}, "
            f"{graph_flag} or max-running-requests",
            (Direction(MFS, "decrease"), Direction(graph_flag, "decrease")),
        ),
        Rule(
            FailureKind.MODEL_LOAD_FAILED,
            re.compile(
                r"is not a local folder and is not a valid model identifier|Repository Not Found|"
                r"does not appear to have a file named config.json"
            ),
            "SGLang could not load the model; check engine.model",
        ),
    )


def classify_sglang_log(
    log_text: str, returncode: int | None, graph_flag: str = "cuda-graph-max-bs-decode"
) -> Classification:
    """(kind, evidence + advice, directions) for an SGLang server log tail and exit status.

    "Not enough memory. Please try to increase --mem-fraction-static" → KV_CACHE_TOO_SMALL
    (raise mem-fraction-static); "Capture cuda graph failed: CUDA out of memory" and other CUDA
    OOMs → CUDA_OOM (lower mem-fraction-static or the CUDA graph batch size): opposite
    directions, so neighbouring values failing both ways make the region infeasible. Then
    argparse/heads/ep/quantization → INVALID_ARGS, port → PORT_IN_USE, model → MODEL_LOAD_FAILED,
    and the generic endings (see logclassify.classify).
    """
    return classify(
        rules(graph_flag), log_text, returncode, ready=READY, engine="SGLang", prefix=LOG_PREFIX
    )
