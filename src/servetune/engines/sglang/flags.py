"""SGLang's flag catalogue: the ``sglang.launch_server`` flags people tune, per release.

Facts read from SGLang's own argument definitions in the PyPI wheels: 0.5.23
(sglang/srt/arg_groups/fields/*.py, choices.py) and 0.5.3 (sglang/srt/server_args.py); each
entry's ``source`` names the release and file. Bool flags are argparse store_true in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

from servetune.core.study import ParamValue
from servetune.engines.base import FlagInfo
from servetune.engines.flagcheck import FlagRules, Range

VERSION = "0.5.23"
"""The SGLang release the main catalogue was read from."""
OLD_VERSION = "0.5.3"
"""The older release whose renamed flags and narrower choices are also known."""

QUANTIZATION_CHOICES = (
    "awq", "fp8", "mxfp8", "gptq", "gptq_marlin", "awq_marlin", "bitsandbytes", "gguf",
    "modelopt", "modelopt_fp8", "modelopt_fp4", "nvfp4_online", "modelopt_mixed", "petit_nvfp4",
    "w8a8_int8", "w8a8_fp8", "moe_wna16", "w4afp8", "mxfp4", "auto-round", "auto-round-int8",
    "compressed-tensors", "modelslim", "mxfp_w4a8", "quark", "quark_int4fp8_moe", "quark_mxfp4",
    "mlx_q4", "mlx_q8", "unquant", "humming",
)  # fmt: skip
"""QUANTIZATION_CHOICES of sglang 0.5.23 sglang/srt/arg_groups/choices.py."""

ATTENTION_BACKENDS = (
    "triton", "torch_native", "flex_attention", "dsa", "nsa", "qsa", "dsv4", "compressed", "fa3",
    "fa4", "flashinfer", "llada2_cfg_flashinfer", "flashmla", "trtllm_mla", "cutedsl_mla",
    "tokenspeed_mla", "trtllm_mha", "hpc_ops", "minicpm_flashattn", "minicpm_flashinfer", "aiter",
    "wave", "intel_amx", "ascend", "intel_xpu",
)  # fmt: skip
"""ATTENTION_BACKEND_CHOICES of sglang 0.5.23 sglang/srt/arg_groups/choices.py."""

KV_CACHE_DTYPES = (
    "auto", "fp8_e5m2", "fp8_e4m3", "mxfp8", "bf16", "bfloat16", "nvfp4", "fp4_mx_block16",
)  # fmt: skip
"""--kv-cache-dtype choices of sglang 0.5.23 (arg_groups/fields/model.py)."""

SCHEDULE_POLICIES = (
    "lpm", "random", "fcfs", "dfs-weight", "lof", "priority", "routing-key", "hrrn",
    "shortest-prefill-first",
)  # fmt: skip
"""--schedule-policy choices of sglang 0.5.23 (arg_groups/fields/schedule.py)."""

DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
"""--dtype choices (both releases)."""


def _f(
    name: str,
    type_: Literal["int", "float", "str", "bool"],
    default: ParamValue | None,
    meaning: str,
    file: str,
    choices: tuple[str, ...] | None = None,
    version: str = VERSION,
) -> FlagInfo:
    return FlagInfo(name, type_, default, meaning, f"SGLang {version} {file}", choices)


_SCHED = "sglang/srt/arg_groups/fields/schedule.py"
_PAR = "sglang/srt/arg_groups/fields/parallel.py"
_MODEL = "sglang/srt/arg_groups/fields/model.py"
_EXEC = "sglang/srt/arg_groups/fields/exec_.py"
_MEM = "sglang/srt/arg_groups/fields/memory.py"

_COMMON: tuple[FlagInfo, ...] = (
    _f("mem-fraction-static", "float", None,
       "Fraction of GPU memory for weights plus the KV cache pool (unset = computed from the GPU "
       "and model); smaller on OOM, larger on 'Not enough memory'.", _SCHED),
    _f("max-running-requests", "int", None, "Most requests decoded at once.", _SCHED),
    _f("chunked-prefill-size", "int", None,
       "Most tokens in one prefill chunk (-1 = no chunked prefill; unset = by GPU).", _SCHED),
    _f("max-prefill-tokens", "int", 16384, "Most tokens in one prefill batch.", _SCHED),
    _f("schedule-policy", "str", "fcfs", "Request scheduling policy.", _SCHED, SCHEDULE_POLICIES),
    _f("schedule-conservativeness", "float", 1.0,
       "How conservatively new requests are admitted (larger = fewer retractions).", _SCHED),
    _f("enable-mixed-chunk", "bool", False,
       "Mix prefill and decode in one batch with chunked prefill.", _SCHED),
    _f("max-total-tokens", "int", None, "Tokens in the KV pool (unset = from memory).", _SCHED),
    _f("page-size", "int", None, "Tokens per KV cache page.", _SCHED),
    _f("tp-size", "int", 1, "Tensor-parallel GPUs.", _PAR),
    _f("pp-size", "int", 1, "Pipeline-parallel stages.", _PAR),
    _f("dp-size", "int", 1, "Data-parallel replicas.", _PAR),
    _f("ep-size", "int", 1, "Expert-parallel size (must divide tp-size).", _PAR),
    _f("enable-dp-attention", "bool", False,
       "Data-parallel attention inside the tensor-parallel group (dp-size shares tp's GPUs); "
       "deprecated in 0.5.23 for attn-dp-size, still accepted.",
       "sglang/srt/server_args.py"),
    _f("disable-radix-cache", "bool", False, "Turn off RadixAttention prefix caching.", _MEM),
    _f("kv-cache-dtype", "str", "auto", "KV cache data type.", _MODEL, KV_CACHE_DTYPES),
    _f("quantization", "str", None, "Weight quantization method.", _MODEL, QUANTIZATION_CHOICES),
    _f("dtype", "str", "auto", "Weights and activations data type.", _MODEL, DTYPES),
    _f("context-length", "int", None, "Context length (unset = the model's config).", _MODEL),
    _f("attention-backend", "str", None, "Attention kernels.", _EXEC, ATTENTION_BACKENDS),
    _f("enable-torch-compile", "bool", False, "Optimize the model with torch.compile.", _EXEC),
)  # fmt: skip

_NEW_ONLY: tuple[FlagInfo, ...] = (
    _f("attn-dp-size", "int", 1,
       "Data-parallel attention groups inside the tensor-parallel group (FFN stays tensor "
       "parallel; uses no extra GPUs).", _PAR),
    _f("cuda-graph-max-bs-decode", "int", None,
       "Largest batch captured in the decode CUDA graph (unset = by GPU).", _EXEC),
    _f("cuda-graph-max-bs-prefill", "int", None,
       "Largest batch captured in the prefill CUDA graph.", _EXEC),
)  # fmt: skip

_OLD = "sglang/srt/server_args.py"
_OLD_ONLY: tuple[FlagInfo, ...] = (
    _f("cuda-graph-max-bs", "int", None,
       "Largest batch captured in a CUDA graph (unset = by GPU).", _OLD, version=OLD_VERSION),
    _f("disable-cuda-graph", "bool", False, "Turn off CUDA graphs.", _OLD, version=OLD_VERSION),
)  # fmt: skip

_OLD_CHOICES: Mapping[str, tuple[str, ...]] = {
    "kv-cache-dtype": ("auto", "fp8_e5m2", "fp8_e4m3"),
    "schedule-policy": ("lpm", "random", "fcfs", "dfs-weight", "lof", "priority"),
}
"""Narrower choices in 0.5.3 (server_args.py)."""

CATALOGUE: Mapping[str, FlagInfo] = MappingProxyType({f.name: f for f in _COMMON + _NEW_ONLY})
"""SGLang 0.5.23 flags servetune knows, by CLI name without dashes."""

OLD_CATALOGUE: Mapping[str, FlagInfo] = MappingProxyType(
    {
        **{
            f.name: (
                FlagInfo(
                    f.name, f.type, f.default, f.meaning, f"SGLang {OLD_VERSION} {_OLD}",
                    _OLD_CHOICES[f.name],
                )
                if f.name in _OLD_CHOICES
                else f
            )
            for f in _COMMON
        },
        **{f.name: f for f in _OLD_ONLY},
    }
)  # fmt: skip
"""The same for SGLang 0.5.3 (and releases between it and 0.5.23, the nearest known facts)."""

_ALIASES = MappingProxyType(
    {
        "tensor-parallel-size": "tp-size",
        "tp": "tp-size",
        "pipeline-parallel-size": "pp-size",
        "data-parallel-size": "dp-size",
        "dp": "dp-size",
        "expert-parallel-size": "ep-size",
        "ep": "ep-size",
    }
)
_RESERVED = MappingProxyType(
    {
        "model-path": "engine.model",
        "model": "engine.model",
        "host": "deployment.host",
        "port": "the deployment",
        "served-model-name": "engine.served_model_name",
    }
)
_RANGES = MappingProxyType(
    {
        "mem-fraction-static": Range(low=0, high=1, low_open=True),
        "max-running-requests": Range(low=1),
        "chunked-prefill-size": Range(low=1, specials=(-1,)),
        "max-prefill-tokens": Range(low=1),
        "schedule-conservativeness": Range(low=0),
        "max-total-tokens": Range(low=1),
        "page-size": Range(low=1),
        "tp-size": Range(low=1),
        "pp-size": Range(low=1),
        "dp-size": Range(low=1),
        "ep-size": Range(low=1),
        "attn-dp-size": Range(low=1),
        "context-length": Range(low=1),
        "cuda-graph-max-bs": Range(low=1),
        "cuda-graph-max-bs-decode": Range(low=1),
        "cuda-graph-max-bs-prefill": Range(low=1),
    }
)

RULES = FlagRules(
    engine=f"SGLang {VERSION}",
    catalogue=CATALOGUE,
    aliases=_ALIASES,
    reserved=_RESERVED,
    renamed=MappingProxyType(
        {
            "cuda-graph-max-bs": (
                f"SGLang {VERSION} split --cuda-graph-max-bs into 'cuda-graph-max-bs-decode' and "
                f"'cuda-graph-max-bs-prefill'; use those, or set engine.version: '{OLD_VERSION}' "
                "if your SGLang is older"
            ),
            "disable-cuda-graph": (
                f"SGLang {VERSION} deprecates --disable-cuda-graph "
                "(--cuda-graph-backend-{decode,prefill}=disabled); not tunable here"
            ),
        }
    ),
    ranges=_RANGES,
)
"""How SGLang 0.5.23 flag names and values are judged."""

OLD_RULES = FlagRules(
    engine=f"SGLang {OLD_VERSION}",
    catalogue=OLD_CATALOGUE,
    aliases=_ALIASES,
    reserved=_RESERVED,
    renamed=MappingProxyType(
        {
            n: f"SGLang {OLD_VERSION} has no --{n}; use 'cuda-graph-max-bs' (or drop "
            "engine.version for newer releases)"
            for n in ("cuda-graph-max-bs-decode", "cuda-graph-max-bs-prefill")
        }
    ),
    ranges=_RANGES,
)
"""How SGLang 0.5.3 flag names and values are judged."""


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("."):
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def rules_for(version: str | None) -> FlagRules:
    """The flag rules of SGLang ``version``: 0.5.23's for None or ≥ 0.5.23, else 0.5.3's."""
    if version is None or _version_tuple(version) >= _version_tuple(VERSION):
        return RULES
    return OLD_RULES


def graph_flag(rules: FlagRules) -> str:
    """The CUDA graph batch-size flag of these rules' release."""
    return (
        "cuda-graph-max-bs"
        if "cuda-graph-max-bs" in rules.catalogue
        else ("cuda-graph-max-bs-decode")
    )
