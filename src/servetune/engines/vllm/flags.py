"""vLLM's flag catalogue: the ``vllm serve`` flags people tune, with type, default and choices.

Facts read from vLLM 0.33.0's own argument definitions (vllm/engine/arg_utils.py and the config
dataclasses in vllm/config/*.py of the PyPI wheel); each entry's ``source`` names the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

from servetune.core.study import ParamValue
from servetune.engines.base import FlagInfo
from servetune.engines.flagcheck import FlagRules, Range

VERSION = "0.33.0"
"""The vLLM release this catalogue was read from."""

_V = f"vLLM {VERSION}"

CACHE_DTYPES = (
    "auto",
    "float16",
    "bfloat16",
    "fp8",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp8_inc",
    "fp8_ds_mla",
    "nvfp4_ds_mla",
)
"""``CacheDType`` of vllm/config/cache.py (the general ones; vLLM 0.33.0 also lists experimental
turboquant_*/octave_* types, left out here)."""

MODEL_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
"""``ModelDType`` of vllm/config/model.py."""

QUANTIZATION_METHODS = (
    "awq",
    "auto_awq",
    "fp8",
    "fbgemm_fp8",
    "fp_quant",
    "modelopt",
    "modelopt_fp4",
    "modelopt_mxfp8",
    "modelopt_mixed",
    "auto_gptq",
    "gptq",
    "gptq_marlin",
    "awq_marlin",
    "humming",
    "compressed-tensors",
    "experts_int8",
    "quark",
    "moe_wna16",
    "torchao",
    "inc",
    "mxfp4",
    "gpt_oss_mxfp4",
    "deepseek_v4_fp8",
    "online",
    "fp8_per_tensor",
    "fp8_per_block",
    "fp8_per_channel",
    "int8_per_channel_weight_only",
    "nvfp4_per_token",
    "mxfp8",
)
"""``QuantizationMethods`` of vllm/model_executor/layers/quantization/__init__.py."""

SCHEDULING_POLICIES = ("fcfs", "priority")
"""``SchedulerPolicy`` of vllm/config/scheduler.py."""


def _f(
    name: str,
    type_: Literal["int", "float", "str", "bool"],
    default: ParamValue | None,
    meaning: str,
    file: str,
    choices: tuple[str, ...] | None = None,
) -> FlagInfo:
    return FlagInfo(
        name=name,
        type=type_,
        default=default,
        meaning=meaning,
        source=f"{_V} {file}",
        choices=choices,
    )


_SCHED = "vllm/config/scheduler.py (SchedulerConfig)"
_CACHE = "vllm/config/cache.py (CacheConfig)"
_MODEL = "vllm/config/model.py (ModelConfig)"
_PAR = "vllm/config/parallel.py (ParallelConfig)"
_COMP = "vllm/config/compilation.py (CompilationConfig)"

CATALOGUE: Mapping[str, FlagInfo] = MappingProxyType(
    {
        f.name: f
        for f in (
            _f(
                "max-num-seqs",
                "int",
                None,
                "Most sequences processed in one iteration (unset = by GPU: 256, 1024 on "
                "≥70 GiB GPUs for the API server; arg_utils.py).",
                _SCHED,
            ),
            _f(
                "max-num-batched-tokens",
                "int",
                None,
                "Most tokens processed in one iteration (unset = by GPU: 2048, 8192 on ≥70 GiB "
                "GPUs for the API server; arg_utils.py).",
                _SCHED,
            ),
            _f(
                "enable-chunked-prefill",
                "bool",
                True,
                "Split long prefills to fit max-num-batched-tokens (--no-enable-chunked-prefill "
                "turns it off).",
                _SCHED,
            ),
            _f(
                "scheduling-policy",
                "str",
                "fcfs",
                "Request scheduling policy.",
                _SCHED,
                SCHEDULING_POLICIES,
            ),
            _f(
                "gpu-memory-utilization",
                "float",
                0.92,
                "Fraction (0, 1] of each GPU's memory vLLM may use for weights, activations and "
                "KV cache.",
                _CACHE,
            ),
            _f(
                "block-size",
                "int",
                16,
                "Tokens per KV cache block (CacheConfig.DEFAULT_BLOCK_SIZE on CUDA).",
                _CACHE,
            ),
            _f(
                "kv-cache-dtype",
                "str",
                "auto",
                "KV cache data type (auto = the model's dtype).",
                _CACHE,
                CACHE_DTYPES,
            ),
            _f(
                "enable-prefix-caching",
                "bool",
                True,
                "Automatic prefix caching (--no-enable-prefix-caching turns it off).",
                _CACHE,
            ),
            _f(
                "dtype",
                "str",
                "auto",
                "Weights and activations data type.",
                _MODEL,
                MODEL_DTYPES,
            ),
            _f(
                "quantization",
                "str",
                None,
                "Weight quantization method (unset = from the checkpoint's quantization_config).",
                _MODEL,
                QUANTIZATION_METHODS,
            ),
            _f(
                "max-model-len",
                "int",
                None,
                "Context length, prompt plus output (unset = the model's config; -1 = the largest that fits in GPU memory).",
                _MODEL,
            ),
            _f(
                "enforce-eager",
                "bool",
                False,
                "Always run eager PyTorch (no CUDA graphs).",
                _MODEL,
            ),
            _f(
                "tensor-parallel-size",
                "int",
                1,
                "Tensor-parallel GPUs per replica.",
                _PAR,
            ),
            _f(
                "pipeline-parallel-size",
                "int",
                1,
                "Pipeline stages per replica.",
                _PAR,
            ),
            _f(
                "data-parallel-size",
                "int",
                1,
                "Data-parallel replicas.",
                _PAR,
            ),
            _f(
                "enable-expert-parallel",
                "bool",
                False,
                "Expert parallelism instead of tensor parallelism for MoE layers.",
                _PAR,
            ),
            _f(
                "max-cudagraph-capture-size",
                "int",
                None,
                "Largest batch captured in a CUDA graph (unset = min(2 × max-num-seqs, 512)-ish, "
                "capped at 512; 1024 on data-centre Blackwell).",
                _COMP,
            ),
            _f(
                "cudagraph-capture-sizes",
                "str",
                None,
                "Exact batch sizes to capture, e.g. '1 2 4 8 16' (integers, commas or spaces).",
                _COMP,
            ),
            _f(
                "speculative-config",
                "str",
                None,
                "Speculative decoding as a JSON object, e.g. "
                '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\'.',
                "vllm/config/speculative.py (SpeculativeConfig)",
            ),
            _f(
                "kv-cache-memory-bytes",
                "int",
                None,
                "KV cache size per GPU in bytes; when set, gpu-memory-utilization is ignored.",
                _CACHE,
            ),
            _f(
                "seed",
                "int",
                0,
                "Random seed.",
                _MODEL,
            ),
        )
    }
)
"""vLLM serve flags servetune knows, by CLI name without dashes; defaults are vLLM's."""

BOOL_FLAGS = frozenset(n for n, f in CATALOGUE.items() if f.type == "bool")
"""Bool flags: vLLM 0.33.0 declares every bool config field with argparse's
BooleanOptionalAction (arg_utils.py ``_compute_kwargs``), so true is ``--x`` and false ``--no-x``."""

RULES = FlagRules(
    engine=_V,
    catalogue=CATALOGUE,
    aliases=MappingProxyType(
        {
            "tp": "tensor-parallel-size",
            "pp": "pipeline-parallel-size",
            "dp": "data-parallel-size",
            "q": "quantization",
            "sc": "speculative-config",
            "device-memory-utilization": "gpu-memory-utilization",
        }
    ),
    negations=MappingProxyType({f"no-{n}": n for n in BOOL_FLAGS}),
    reserved=MappingProxyType(
        {
            "model": "engine.model",
            "host": "deployment.host",
            "port": "the deployment",
            "served-model-name": "engine.served_model_name",
        }
    ),
    renamed=MappingProxyType(
        {
            "cuda-graph-sizes": (
                f"{_V} has no --cuda-graph-sizes (it became CompilationConfig's capture sizes); "
                "use 'cudagraph-capture-sizes' or 'max-cudagraph-capture-size'"
            ),
            "num-speculative-tokens": (
                f"{_V} takes speculative settings as one JSON flag; use 'speculative-config', "
                'e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\''
            ),
            "speculative-model": (
                f"{_V} takes speculative settings as one JSON flag; use 'speculative-config', "
                'e.g. \'{"model": "...", "num_speculative_tokens": 4}\''
            ),
            "max-seq-len-to-capture": (
                f"{_V} has no --max-seq-len-to-capture; use 'max-cudagraph-capture-size'"
            ),
        }
    ),
    ranges=MappingProxyType(
        {
            "max-num-seqs": Range(low=1),
            "max-num-batched-tokens": Range(low=1),
            "gpu-memory-utilization": Range(low=0, high=1, low_open=True),
            "block-size": Range(low=1),
            "max-model-len": Range(low=1, specials=(-1,)),
            "tensor-parallel-size": Range(low=1),
            "pipeline-parallel-size": Range(low=1),
            "data-parallel-size": Range(low=1),
            "max-cudagraph-capture-size": Range(low=1),
            "kv-cache-memory-bytes": Range(low=1),
        }
    ),
    json_flags=frozenset({"speculative-config"}),
    list_flags=frozenset({"cudagraph-capture-sizes"}),
)
"""How vLLM flag names and values are judged (see engines/flagcheck.py)."""
