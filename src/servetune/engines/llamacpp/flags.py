"""llama.cpp's flag catalogue: the llama-server flags servetune knows, with type, default and
choices, their aliases and spellings, the upstream flag list, and what values each takes.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

from servetune.core.space import (
    BoolParam,
    ChoiceParam,
    FloatParam,
    IntParam,
    LogParam,
    Param,
)
from servetune.core.study import ParamValue
from servetune.engines.base import FlagInfo
from servetune.engines.xllamacpp_server import CACHE_TYPES, LOAD_MODES

_README = "llama.cpp tools/server/README.md"


_QUANTIZED_CACHE = tuple(t for t in CACHE_TYPES if t not in ("f32", "f16", "bf16"))


def _flag(
    name: str,
    type_: Literal["int", "float", "str", "bool"],
    default: ParamValue | None,
    meaning: str,
    source: str = _README,
    choices: tuple[str, ...] | None = None,
) -> FlagInfo:
    return FlagInfo(
        name=name,
        type=type_,
        default=default,
        meaning=meaning,
        source=source,
        choices=choices,
    )


CATALOGUE: Mapping[str, FlagInfo] = MappingProxyType(
    {
        f.name: f
        for f in (
            _flag(
                "threads",
                "int",
                -1,
                "CPU threads for generation (-1 = auto, the number of physical cores).",
            ),
            _flag(
                "threads-batch",
                "int",
                None,
                "CPU threads for prompt processing (unset = same as --threads).",
            ),
            _flag("threads-http", "int", -1, "Threads serving HTTP requests (-1 = auto)."),
            _flag(
                "parallel",
                "int",
                -1,
                "Server slots, i.e. requests decoded at once "
                "(-1 = auto: 4 slots with a unified KV cache).",
                f"{_README}; auto = 4 from the llama.cpp server log",
            ),
            _flag("batch-size", "int", 2048, "Logical maximum batch size, tokens."),
            _flag(
                "ubatch-size",
                "int",
                512,
                "Physical maximum batch size, tokens (at most batch-size).",
            ),
            _flag(
                "ctx-size",
                "int",
                0,
                "KV cells for all slots together, padded up to a multiple of 256 (0 = the model's "
                "context length); without kv-unified each slot gets its own "
                "pad256(ctx-size / parallel), with it every slot shares all of them "
                "(see slot_layout).",
            ),
            _flag(
                "flash-attn",
                "str",
                "auto",
                "Flash attention: on, off or auto.",
                choices=("on", "off", "auto"),
            ),
            _flag("cache-type-k", "str", "f16", "KV cache data type for K.", choices=CACHE_TYPES),
            _flag(
                "cache-type-v",
                "str",
                "f16",
                "KV cache data type for V (quantized types need flash attention).",
                choices=CACHE_TYPES,
            ),
            _flag(
                "cont-batching",
                "bool",
                True,
                "Continuous (dynamic) batching; false = --no-cont-batching.",
            ),
            _flag(
                "n-gpu-layers",
                "int",
                None,
                "Layers stored in VRAM: a number, 'auto' or 'all' (default auto).",
            ),
            _flag(
                "load-mode",
                "str",
                "auto",
                "Model loading mode: auto, none, mmap, mlock, mmap+mlock, dio.",
                choices=LOAD_MODES,
            ),
            _flag(
                "mlock",
                "bool",
                False,
                "Keep the model in RAM (llama-server before --load-mode; the wheel maps it).",
                "llama.cpp common/arg.cpp (older builds)",
            ),
            _flag(
                "mmap",
                "bool",
                True,
                "Memory-map the model; false = --no-mmap (llama-server before --load-mode).",
                "llama.cpp common/arg.cpp (older builds)",
            ),
            _flag(
                "cache-reuse",
                "int",
                0,
                "Min chunk size to reuse from the prompt cache via KV shifting (0 = off).",
            ),
            _flag("cache-prompt", "bool", True, "Prompt caching; false = --no-cache-prompt."),
            _flag(
                "cache-ram", "int", 8192, "Max prompt cache size in MiB (-1 = no limit, 0 = off)."
            ),
            _flag("warmup", "bool", True, "Empty warm-up run at start; false = --no-warmup."),
            _flag(
                "kv-unified",
                "bool",
                None,
                "One KV buffer shared by all slots (default: on when parallel is auto, else off).",
            ),
            _flag(
                "kv-offload",
                "bool",
                True,
                "Offload the KV cache to the GPU; false = --no-kv-offload.",
            ),
            _flag(
                "fit",
                "str",
                "on",
                "Adjust unset arguments to fit device memory: on or off.",
                choices=("on", "off"),
            ),
            _flag("metrics", "bool", False, "Serve Prometheus metrics on /metrics."),
        )
    }
)
"""llama-server flags servetune knows, by CLI name without dashes; defaults are llama-server's."""

_BOOL_FORMS: Mapping[str, tuple[str | None, str | None]] = MappingProxyType(
    {
        "cont-batching": ("--cont-batching", "--no-cont-batching"),
        "mlock": ("--mlock", None),
        "mmap": (None, "--no-mmap"),
        "cache-prompt": ("--cache-prompt", "--no-cache-prompt"),
        "warmup": (None, "--no-warmup"),
        "kv-unified": ("--kv-unified", "--no-kv-unified"),
        "kv-offload": ("--kv-offload", "--no-kv-offload"),
        "metrics": ("--metrics", None),
    }
)
"""How a bool flag is written when true / false (None = omitted; the older form is used when
only it exists in every llama-server version, e.g. --no-mmap)."""

_INT_KEYWORDS: Mapping[str, tuple[str, ...]] = MappingProxyType({"n-gpu-layers": ("auto", "all")})
"""Words an int flag also accepts."""

_INT_RANGES: Mapping[str, tuple[int, int | None]] = MappingProxyType(
    {
        "threads": (1, -1),
        "threads-batch": (1, -1),
        "threads-http": (1, -1),
        "parallel": (1, -1),
        "batch-size": (1, None),
        "ubatch-size": (1, None),
        "ctx-size": (0, None),
    }
)
"""Int flags whose values llama.cpp can run: (smallest value, the one value below it that means
auto, or None). Sources: the --threads/--parallel help ("-1 = auto"), llama-server refusing
--parallel 0 and --batch-size 0, ctx-size 0 meaning the model's context length."""

_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "t": "threads",
        "tb": "threads-batch",
        "np": "parallel",
        "b": "batch-size",
        "ub": "ubatch-size",
        "c": "ctx-size",
        "fa": "flash-attn",
        "ctk": "cache-type-k",
        "ctv": "cache-type-v",
        "cb": "cont-batching",
        "ngl": "n-gpu-layers",
        "gpu-layers": "n-gpu-layers",
        "lm": "load-mode",
        "kvu": "kv-unified",
        "kvo": "kv-offload",
        "cram": "cache-ram",
    }
)
"""Short or alternative llama-server names → the catalogue name."""

_NEGATIONS: Mapping[str, str] = MappingProxyType(
    {
        "no-cont-batching": "cont-batching",
        "nocb": "cont-batching",
        "no-mmap": "mmap",
        "no-warmup": "warmup",
        "no-kv-unified": "kv-unified",
        "no-kvu": "kv-unified",
        "no-kv-offload": "kv-offload",
        "nkvo": "kv-offload",
        "no-cache-prompt": "cache-prompt",
    }
)
"""llama-server's negative switches → the catalogue bool they set to false."""

_RESERVED: Mapping[str, str] = MappingProxyType(
    {
        "model": "engine.model",
        "m": "engine.model",
        "host": "deployment.host",
        "port": "the deployment",
        "alias": "engine.served_model_name",
        "a": "engine.served_model_name",
    }
)
"""Flags servetune sets itself, and where the user sets them instead."""

LLAMA_SERVER_FLAGS_SOURCE = (
    "tools/server/README.md of ggml-org/llama.cpp at commit 00dc8057ab28 (2026), tables "
    "'Common params' and 'Server-specific params' up to --chat-template-file (generated from "
    "common/arg.cpp by llama-gen-docs)"
)
"""Where ``LLAMA_SERVER_FLAGS`` comes from."""

LLAMA_SERVER_FLAGS: frozenset[str] = frozenset(
    """
    help usage version cache-list completion-bash threads threads-batch cpu-mask cpu-range
    cpu-strict prio poll cpu-mask-batch cpu-range-batch cpu-strict-batch prio-batch poll-batch
    ctx-size predict n-predict batch-size ubatch-size keep swa-full flash-attn perf no-perf
    escape no-escape rope-scaling rope-scale rope-freq-base rope-freq-scale yarn-orig-ctx
    yarn-ext-factor yarn-attn-factor yarn-beta-slow yarn-beta-fast kv-offload no-kv-offload
    repack no-repack no-host cache-type-k cache-type-v defrag-thold rpc load-mode lazy-mode numa
    device list-devices override-tensor cpu-moe n-cpu-moe moe-cache-mib n-cpu-ffn gpu-layers
    n-gpu-layers split-mode tensor-split main-gpu fit fit-target fit-ctx check-tensors
    override-kv op-offload no-op-offload lora lora-scaled control-vector control-vector-scaled
    control-vector-layer-range model model-url docker-repo hf-repo hf-file hf-token log-disable
    log-file log-jsonl no-log-jsonl log-colors verbose log-verbose offline verbosity
    log-verbosity log-prefix no-log-prefix log-timestamps no-log-timestamps spec-draft-type-k
    cache-type-k-draft spec-draft-type-v cache-type-v-draft
    lookup-cache-static lookup-cache-dynamic kv-unified-per-slot ctx-checkpoints
    swa-checkpoints checkpoint-min-step cache-ram kv-unified no-kv-unified cache-idle-slots
    no-cache-idle-slots context-shift no-context-shift reverse-prompt special warmup no-warmup
    spm-infill pooling parallel cont-batching no-cont-batching mmproj mmproj-url mmproj-auto
    no-mmproj no-mmproj-auto mmproj-offload no-mmproj-offload mmproj-device image-min-tokens
    image-max-tokens mtmd-batch-max-tokens video-fps video-timestamp-interval video-ffmpeg-dir
    alias tags embd-normalize host port reuse-port path cors-origins cors-methods cors-headers
    cors-credentials no-cors-credentials api-prefix ui-config webui-config ui-config-file
    webui-config-file ui-mcp-proxy webui-mcp-proxy no-ui-mcp-proxy no-webui-mcp-proxy tools
    tools-runtime mcp-servers-config mcp-servers-json agent no-agent ui webui no-ui no-webui
    embedding embeddings rerank reranking api-key api-key-file ssl-key-file ssl-cert-file
    chat-template-kwargs timeout sse-ping-interval threads-http cache-prompt no-cache-prompt
    cache-reuse metrics props slots no-slots slot-save-path media-path models-dir models-preset
    models-max models-autoload no-models-autoload jinja no-jinja reasoning-format reasoning
    reasoning-effort reasoning-budget reasoning-budget-message reasoning-preserve
    no-reasoning-preserve chat-template chat-template-file
    """.split()  # noqa: SIM905 - one readable block, as in the source table
)
"""Long flag names (without dashes) of upstream llama-server's current argument list (an excerpt:
see ``LLAMA_SERVER_FLAGS_SOURCE``; sampling flags left out). Every flag ``user_command`` can
print is in it (a unit test checks); ``--mlock`` and ``--no-mmap`` are not: current llama-server
replaced them by ``--load-mode``."""


def _name_problem(name: str) -> str | None:
    """Why ``name`` is not a usable catalogue flag name (None when it is one)."""
    if name in CATALOGUE:
        return None
    if name in _RESERVED:
        return f"servetune sets --{name} itself; set {_RESERVED[name]} instead"
    if name in _ALIASES:
        return f"write the long flag name {_ALIASES[name]!r} instead of {name!r}"
    if name in _NEGATIONS:
        return f"use {_NEGATIONS[name]!r} with false instead of {name!r}"
    close = difflib.get_close_matches(name, [*CATALOGUE, *_ALIASES], n=1, cutoff=0.6)
    hint = f"did you mean {_ALIASES.get(close[0], close[0])!r}? " if close else ""
    return f"unknown llama-server flag {name!r}; {hint}known flags: {', '.join(sorted(CATALOGUE))}"


def _int_allowed(name: str, value: int) -> bool:
    """Whether llama.cpp can run int flag ``name`` at ``value`` (see ``_INT_RANGES``)."""
    if name not in _INT_RANGES:
        return True
    low, auto = _INT_RANGES[name]
    return value >= low or value == auto


def _int_range_text(name: str) -> str:
    low, auto = _INT_RANGES[name]
    text = f"use ≥ {low}"
    if auto is not None:
        text += f", or {auto} for auto"
    if name == "ctx-size":
        text += " (0 = the model's context length)"
    return text


def _int_values_never_run(name: str, param: IntParam) -> list[int]:
    """Up to two values of ``param``'s range that llama.cpp never runs for flag ``name``.

    Only values below the flag's minimum can be wrong, so only that part of the range is walked
    (at most two values plus the auto value: no loop over a huge range).
    """
    if name not in _INT_RANGES:
        return []
    low, _ = _INT_RANGES[name]
    bad: list[int] = []
    v = param.low
    while v <= param.high and v < low and len(bad) < 2:
        if not _int_allowed(name, v):
            bad.append(v)
        v += param.step
    return bad


def _value_problem(info: FlagInfo, value: ParamValue) -> str | None:
    """Why ``value`` does not fit flag ``info`` (None when it does)."""
    t = info.type
    if t == "bool":
        return (
            None if isinstance(value, bool) else f"{info.name} takes true or false, not {value!r}"
        )
    if t == "int":
        if isinstance(value, str) and value in _INT_KEYWORDS.get(info.name, ()):
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            words = " or ".join(repr(w) for w in _INT_KEYWORDS.get(info.name, ()))
            return f"{info.name} takes an integer{' or ' + words if words else ''}, not {value!r}"
        if not _int_allowed(info.name, value):
            return f"{info.name} = {value} never runs: {_int_range_text(info.name)}"
        return None
    if t == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{info.name} takes a number, not {value!r}"
        return None
    if info.name == "flash-attn" and isinstance(value, bool):
        return None
    if not isinstance(value, str):
        return f"{info.name} takes a string{_choices_text(info)}, not {value!r}"
    if info.choices and value not in info.choices:
        return f"{info.name} = {value!r} is not allowed{_choices_text(info)}"
    return None


def _choices_text(info: FlagInfo) -> str:
    return f" (one of {', '.join(info.choices)})" if info.choices else ""


def _param_type_problem(info: FlagInfo, param: Param) -> str | None:
    """Why a search-space param of this kind cannot drive flag ``info`` (None when it can).

    The message names the kind that can: ``kind: bool`` for a bool flag, ``kind: int`` for an int
    flag given floats, ``kind: choice`` with the allowed values for a string flag; an int range
    that reaches values llama.cpp never runs (parallel 0) names them and the allowed range.
    """
    t = info.type
    if t == "bool" and not isinstance(param, BoolParam):
        if isinstance(param, ChoiceParam) and all(isinstance(v, bool) for v in param.values):
            return None
        return f"{info.name} is a bool flag (true or false); use kind: bool, not {param.kind}"
    if isinstance(param, ChoiceParam):
        for v in param.values:
            msg = _value_problem(info, v)
            if msg:
                return msg
        return None
    if isinstance(param, BoolParam):
        if t == "bool" or info.name == "flash-attn":
            return None
        return f"{info.name} is a {t} flag; a bool param cannot set it (use kind: choice)"
    if isinstance(param, IntParam):
        if t not in ("int", "float"):
            return (
                f"{info.name} is a {t} flag; use kind: choice with its values{_choices_text(info)}"
            )
        bad = _int_values_never_run(info.name, param)
        if bad:
            listed = ", ".join(str(v) for v in bad)
            auto = _INT_RANGES[info.name][1]
            choice = f" (kind: choice can also list {auto})" if auto is not None else ""
            return (
                f"the range {param.low}..{param.high} holds values llama.cpp never runs for "
                f"{info.name} ({listed}): {_int_range_text(info.name)}; raise low{choice}"
            )
        return None
    if isinstance(param, FloatParam | LogParam):
        if t == "float":
            return None
        if t == "int":
            return (
                f"{info.name} takes integers; use kind: int (log: true for a log scale) or choice"
            )
        return f"{info.name} is a {t} flag; use kind: choice{_choices_text(info)}"
    return None
