"""The llama.cpp engine adapter: llama-server flag catalogue, launch, preflight, failure classifier.

It launches ``llama-server`` when one is installed, else the same flags through the xllamacpp wheel.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import mmap
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from servetune.core.space import (
    BoolParam,
    ChoiceParam,
    FloatParam,
    IntParam,
    LogParam,
    Param,
    SearchSpace,
)
from servetune.core.spec import LlamaCppEngineSpec, Problem, StudySpec, Workload
from servetune.core.study import FailureKind, Params, ParamValue
from servetune.engines.base import Endpoint, FlagInfo, LaunchCommand
from servetune.engines.xllamacpp_server import CACHE_TYPES, LOAD_MODES
from servetune.errors import EngineNotFound

logger = logging.getLogger(__name__)

XLLAMACPP = "xllamacpp"
"""``engine.binary`` that selects the wheel (module ``SERVER_MODULE``)."""

SERVER_MODULE = "servetune.engines.xllamacpp_server"

_README = "llama.cpp tools/server/README.md"
_AUTO_SLOTS = 4
"""Slots llama-server uses when --parallel is -1 (auto); auto also forces kv-unified on, even
with --no-kv-unified. Sources: llama.cpp PR #16736 ("server : support unified cache across
slots": by default 4 slots over a unified KV cache), tools/server/server.cpp
"n_parallel is set to auto, using n_parallel = 4 and kv_unified = true"; measured with the
xllamacpp wheel 2026.10.11549 (``--parallel -1 --no-kv-unified`` logs ``kv_unified = 'true'``)."""

CTX_PAD = 256
"""llama.cpp pads the context and each non-unified slot's share up to a multiple of 256 cells.
Source: src/llama-context.cpp, ``cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)`` and
``n_ctx_seq = GGML_PAD(n_ctx / n_seq_max, 256)`` (ref. llama.cpp PR #17046)."""

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

STAND_IN = f"python -m {SERVER_MODULE}"
"""The test stand-in: llama-server's flags served by the xllamacpp wheel."""

STAND_IN_NOTE = f"(to try it on this machine without llama.cpp, `{STAND_IN}` takes the same flags)"
"""The one line that names the stand-in, only as a way to try the command locally."""


class LlamaCppEngine:
    """llama.cpp's HTTP server as an Engine (see engines/base.py for the protocol).

    ``which`` finds executables on PATH (``shutil.which``; tests pass their own).
    """

    kind = "llamacpp"
    health_path = "/health"

    def __init__(
        self, spec: LlamaCppEngineSpec, *, which: Callable[[str], str | None] = shutil.which
    ) -> None:
        self.spec = spec
        self._which = which
        self._prefix: list[str] | None = None
        self._model_ctx: int | None = None
        self._model_ctx_read = False

    # ---- catalogue -------------------------------------------------------------------------

    def flag_catalogue(self) -> Mapping[str, FlagInfo]:
        """Known llama-server flags by name (no dashes), with their defaults and sources."""
        return CATALOGUE

    # ---- launch ----------------------------------------------------------------------------

    def server_prefix(self) -> list[str]:
        """The argv that starts the server before any flag: ``[llama-server]`` or the wheel.

        ``engine.binary``: 'xllamacpp' → the wheel; a name or path → that executable; null →
        ``llama-server`` from PATH when present, else the wheel. Raises EngineNotFound when the
        named binary does not exist, or when neither a binary nor the wheel is installed.
        """
        if self._prefix is None:
            self._prefix = self._resolve_prefix()
        return list(self._prefix)

    def _resolve_prefix(self) -> list[str]:
        binary = self.spec.binary
        wheel = [sys.executable, "-m", SERVER_MODULE]
        if binary == XLLAMACPP:
            if importlib.util.find_spec("xllamacpp") is None:
                raise EngineNotFound(
                    "engine.binary is 'xllamacpp' but the xllamacpp wheel is not "
                    "installed; pip install xllamacpp"
                )
            return wheel
        if binary:
            path = Path(binary).expanduser()
            found = str(path) if path.is_file() else self._which(binary)
            if not found:
                raise EngineNotFound(
                    f"llama-server binary {binary!r} not found; install llama.cpp "
                    "(https://github.com/ggml-org/llama.cpp) and give its path in engine.binary, "
                    "or set engine.binary: xllamacpp to use the wheel"
                )
            if not os.access(found, os.X_OK):
                raise EngineNotFound(f"{found} is not executable; chmod +x it or fix engine.binary")
            return [str(found)]
        found = self._which("llama-server")
        if found:
            return [str(found)]
        if importlib.util.find_spec("xllamacpp") is None:
            raise EngineNotFound(
                "no llama-server on PATH and no xllamacpp wheel; pip install xllamacpp "
                "or install llama.cpp and set engine.binary"
            )
        return wheel

    def launch_command(self, params: Params, *, host: str, port: int) -> LaunchCommand:
        """``[server, --model M, --host H, --port P, --alias NAME, *fixed flags, *params]``.

        Fixed flags (engine.flags) come first in their spec order, then params sorted by name;
        each is ``--name value``; bools follow the catalogue's forms (``--no-name`` or omission
        when false); flash-attn also takes true/false as on/off. Raises EngineNotFound (see
        ``server_prefix``).
        """
        argv = [
            *self.server_prefix(),
            "--model",
            str(Path(self.spec.model).expanduser()),
            "--host",
            host,
            "--port",
            str(port),
            "--alias",
            self.spec.served_model_name,
        ]
        for name, value in self.spec.flags.items():
            argv += render_flag(name, value)
        for name in sorted(params):
            argv += render_flag(name, params[name])
        return LaunchCommand(argv=argv, env={}, host=host, port=port)

    def user_command(
        self, params: Params, *, host: str = "127.0.0.1", port: int = 8080
    ) -> LaunchCommand:
        """``llama-server --model M --host H --port P --alias NAME …`` for the user's own llama.cpp
        build: the same flags as ``launch_command`` (fixed flags, then params) in current
        llama-server's spelling (mlock/mmap become ``--load-mode``, see ``user_flags``).

        The program is engine.binary when it names the user's own build, else ``llama-server``
        (never the xllamacpp stand-in; see ``STAND_IN_NOTE``). Pure: nothing is resolved on PATH.
        """
        binary = self.spec.binary
        program = binary if binary and binary != XLLAMACPP else "llama-server"
        argv = [
            program,
            "--model",
            str(Path(self.spec.model).expanduser()),
            "--host",
            host,
            "--port",
            str(port),
            "--alias",
            self.spec.served_model_name,
        ]
        argv += user_flags({**self.spec.flags, **params}, order=[*self.spec.flags, *sorted(params)])
        return LaunchCommand(argv=argv, env={}, host=host, port=port)

    def endpoint(self, host: str, port: int) -> Endpoint:
        """``http://host:port`` (IPv6 hosts bracketed) and the served model name (--alias)."""
        h = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return Endpoint(base_url=f"http://{h}:{port}", model=self.spec.served_model_name)

    # ---- preflight -------------------------------------------------------------------------

    def model_context_length(self) -> int | None:
        """The GGUF's ``<arch>.context_length`` (read once, cached); None when unreadable."""
        if not self._model_ctx_read:
            self._model_ctx_read = True
            self._model_ctx = read_context_length(Path(self.spec.model).expanduser())
        return self._model_ctx

    def effective_flags(self, params: Params) -> dict[str, ParamValue | None]:
        """Catalogue defaults, overridden by engine.flags, overridden by ``params``."""
        merged: dict[str, ParamValue | None] = {n: f.default for n, f in CATALOGUE.items()}
        merged.update(self.spec.flags)
        merged.update(params)
        return merged

    def preflight(self, params: Params, workload: Workload) -> list[str]:
        """Reasons these params cannot serve ``workload`` (empty = launch).

        Checks: threads / threads-batch / threads-http ≥ 1 or -1 (auto); parallel ≥ 1 or -1 (auto =
        4 slots); batch-size, ubatch-size ≥ 1 (a ubatch-size above batch-size is not
        rejected: llama.cpp clamps it to batch-size in llama_context, and the server starts); cache types and
        flash-attn among their choices; a quantized V cache needs flash-attn (llama.cpp refuses
        "quantized V cache requires flash_attn"); and llama.cpp's slot rules (``slot_layout``):
        one request (input_tokens + output_tokens) must fit a slot's n_ctx_slot, and with a
        unified KV cache the requests in flight at the workload's highest concurrency level
        (at most one per slot) must fit n_ctx together. Without a unified cache more requests
        than slots just wait, so concurrency does not matter. ctx-size 0 is the model's context
        length (read from the GGUF; the context checks are skipped when the file cannot be read).
        For request-rate workloads only the one-request check applies (how many are in flight
        is not known before the run).
        """
        f = self.effective_flags(params)
        reasons: list[str] = []

        def as_int(name: str) -> int | None:
            v = f.get(name)
            if v is None or isinstance(v, bool):
                return None
            try:
                iv = int(v)
            except (TypeError, ValueError):
                return None
            return iv if iv == v else None

        for name in _INT_RANGES:
            v = as_int(name)
            if name != "ctx-size" and v is not None and not _int_allowed(name, v):
                reasons.append(f"{name} = {v}: {_int_range_text(name)}")
        for name in ("cache-type-k", "cache-type-v", "flash-attn", "load-mode", "fit"):
            choice = f.get(name)
            info = CATALOGUE[name]
            if name == "flash-attn" and isinstance(choice, bool):
                choice = "on" if choice else "off"
            if choice is not None and info.choices and choice not in info.choices:
                reasons.append(f"{name} = {choice!r}: use one of {', '.join(info.choices)}")
        fa = f.get("flash-attn")
        if f.get("cache-type-v") in _QUANTIZED_CACHE and fa in ("off", False):
            reasons.append(
                f"cache-type-v {f['cache-type-v']} with flash-attn off: llama.cpp needs "
                "flash attention for a quantized V cache; use flash-attn on/auto or "
                "cache-type-v f16"
            )

        ctx = as_int("ctx-size")
        if ctx is not None and ctx < 0:
            reasons.append(f"ctx-size = {ctx}: use ≥ 0 (0 = the model's context length)")
        reasons += self._context_reasons(params, workload)
        return reasons

    def slot_layout(self, params: Params) -> SlotLayout | None:
        """llama-server's slot/KV layout for ``params`` over engine.flags and the defaults (see
        the module function ``slot_layout``); None when it cannot be known before launch."""
        f = self.effective_flags(params)
        ctx, parallel = _as_int(f.get("ctx-size")), _as_int(f.get("parallel"))
        unified = f.get("kv-unified")
        if ctx is None or parallel is None:
            return None
        return slot_layout(
            ctx,
            parallel,
            unified if isinstance(unified, bool) else None,
            self.model_context_length(),
            fit=f.get("fit") != "off",
        )

    def _context_reasons(self, params: Params, workload: Workload) -> list[str]:
        layout = self.slot_layout(params)
        if layout is None:
            return []
        f = self.effective_flags(params)
        per_request = workload.input_tokens + workload.output_tokens
        request_text = (
            f"input_tokens {workload.input_tokens} + output_tokens {workload.output_tokens} = "
            f"{per_request}"
        )
        setting = _layout_text(f, layout, self.model_context_length())
        n_ctx_train = self.model_context_length()
        if per_request > layout.n_ctx_slot:
            if n_ctx_train is not None and per_request > n_ctx_train:
                return [
                    f"one request ({request_text} tokens) is longer than the model's context "
                    f"length {n_ctx_train}: llama-server caps every slot at it; lower "
                    "workload.input_tokens or workload.output_tokens"
                ]
            need = ctx_size_for(layout, per_request, 1)
            return [
                f"one request ({request_text} tokens) does not fit a slot: {setting}; "
                f"raise ctx-size to ≥ {need}" + ("" if layout.kv_unified else " or lower parallel")
            ]
        if not layout.kv_unified or workload.concurrency is None:
            return []
        level = max(workload.concurrency)
        in_flight = min(level, layout.slots)
        if in_flight * per_request <= layout.n_ctx:
            return []
        serves = layout.max_in_flight(per_request)
        need = ctx_size_for(layout, per_request, in_flight)
        return [
            f"concurrency {level} puts {in_flight} requests × {per_request} tokens "
            f"({request_text}) = {in_flight * per_request} tokens in flight, more than the "
            f"unified KV cache holds: {setting}; llama-server would fail them all with "
            f'"Context size has been exceeded." (it serves concurrency ≤ {serves}); raise '
            f"ctx-size to ≥ {need}, or lower parallel to {max(1, serves)}, or lower "
            "workload.concurrency"
        ]

    def effective_params(self, params: Params, workload: Workload) -> Params:
        """The canonical form of ``params``: every flag llama-server will run with (defaults,
        engine.flags, params), with equivalent spellings made equal, so two params that the
        engine runs identically compare equal.

        Canonicalised: parallel -1 → 4 with kv-unified true; ctx-size → the n_ctx llama.cpp
        really allocates (``slot_layout``: 0 → the model's length, padding to 256, the split
        across non-unified slots); kv-unified unset → its value; ubatch-size → at most
        batch-size (llama.cpp clamps it); flash-attn true/false → on/off; integral floats →
        ints. Flags whose default depends on the machine stay as given. ``workload`` is not used
        by llama.cpp's rules (kept for engines whose effective flags depend on it).
        """
        f = self.effective_flags(params)
        out: dict[str, ParamValue] = {}
        for name, value in f.items():
            if value is None:
                continue
            info = CATALOGUE.get(name)
            if isinstance(value, float) and value.is_integer() and info and info.type == "int":
                value = int(value)
            if name == "flash-attn" and isinstance(value, bool):
                value = "on" if value else "off"
            out[name] = value
        layout = self.slot_layout(params)
        if layout is not None:
            out["parallel"] = layout.slots
            out["kv-unified"] = layout.kv_unified
            out["ctx-size"] = layout.n_ctx
        elif _as_int(out.get("parallel")) not in (None, -1):
            out.setdefault("kv-unified", False)
        batch, ubatch = _as_int(out.get("batch-size")), _as_int(out.get("ubatch-size"))
        if batch is not None and ubatch is not None and batch >= 1 and ubatch > batch:
            out["ubatch-size"] = batch
        return out

    # ---- spec checks -----------------------------------------------------------------------

    def check_spec(self, spec: StudySpec) -> list[Problem]:
        """Problems only llama.cpp can see: ``check_space(spec.space) + check_engine()``, plus
        what needs the workload too (``check_workload``)."""
        problems = self.check_space(spec.space) + self.check_engine()
        if not any(p.loc == "engine.model" for p in problems):
            problems += self.check_workload(spec)
        return problems

    def check_workload(self, spec: StudySpec) -> list[Problem]:
        """What the workload asks that this model and these flags can never serve, known before
        any launch (the model's n_ctx_train is read from the GGUF):

        - ``workload.input_tokens``: one request (input + output tokens) longer than the model's
          context length (llama-server caps every slot at it; no flag helps);
        - ``engine.flags.<flag>`` or ``workload.concurrency``: the baseline (llama-server's
          defaults with engine.flags) cannot serve the workload (``preflight`` of no params), e.g.
          a fixed ctx-size smaller than one request;
        - ``space.params.ctx-size``: no ctx-size value of the space holds one request, even on
          one slot.
        """
        w = spec.workload
        per_request = w.input_tokens + w.output_tokens
        n_ctx_train = self.model_context_length()
        if n_ctx_train is not None and per_request > n_ctx_train:
            return [
                Problem(
                    "workload.input_tokens",
                    f"input_tokens {w.input_tokens} + output_tokens {w.output_tokens} = "
                    f"{per_request} tokens per request is more than the model's context length "
                    f"{n_ctx_train} (read from {self.spec.model}); llama-server caps every slot "
                    "at it, so no flag can serve it: lower workload.input_tokens or "
                    "workload.output_tokens, or use a model with a longer context",
                )
            ]
        problems: list[Problem] = []
        baseline = self._context_reasons({}, w)
        if baseline:
            fixed = [n for n in ("ctx-size", "parallel", "kv-unified") if n in self.spec.flags]
            loc = f"engine.flags.{fixed[0]}" if fixed else "workload.concurrency"
            problems.append(
                Problem(
                    loc,
                    "the baseline (llama-server's defaults with engine.flags) cannot serve this "
                    f"workload: {baseline[0]}",
                )
            )
        ctx = spec.space.params.get("ctx-size")
        values = _ctx_values(ctx)
        if values and "ctx-size" not in self.spec.flags:
            best = max(
                (n_ctx_train or 0) if v == 0 else min(_pad(v), n_ctx_train or _pad(v))
                for v in values
            )
            if 0 < best < per_request:
                problems.append(
                    Problem(
                        "space.params.ctx-size",
                        f"no ctx-size in the space holds one request of {per_request} tokens "
                        f"(input_tokens {w.input_tokens} + output_tokens {w.output_tokens}); the "
                        f"largest gives a slot {best} tokens even with parallel 1: allow "
                        f"ctx-size ≥ {_pad(per_request)} (or 0 for the model's length)",
                    )
                )
        return problems

    def check_space(self, space: SearchSpace) -> list[Problem]:
        """Problems of the search space alone, at ``space.params.<name>``: unknown or reserved flag
        names (with the closest known name), a param kind that cannot drive the flag (with the
        kind that can), values llama.cpp never runs (e.g. parallel 0).

        Usable when the rest of the spec is invalid, so every problem is reported at once.
        """
        problems: list[Problem] = []
        for name, param in space.params.items():
            loc = f"space.params.{name}"
            msg = _name_problem(name)
            if msg is None:
                msg = _param_type_problem(CATALOGUE[name], param)
            if msg:
                problems.append(Problem(loc, msg))
        return problems

    def check_engine(self) -> list[Problem]:
        """Problems of the ``engine`` section alone: fixed flags, model file, tokenizer, binary.

        Usable even when the rest of the spec is invalid, so every problem is reported at once.
        """
        problems: list[Problem] = []
        for name, value in self.spec.flags.items():
            loc = f"engine.flags.{name}"
            msg = _name_problem(name)
            if msg:
                problems.append(Problem(loc, msg))
                continue
            msg = _value_problem(CATALOGUE[name], value)
            if msg:
                problems.append(Problem(loc, msg))
        engine = self.spec
        model = Path(engine.model).expanduser()
        fix = (
            "generate a test model with `servetune make-model --size tiny --out DIR` "
            "or give a GGUF path"
        )
        if model.is_dir():
            inside = sorted(p.name for p in model.glob("*.gguf"))[:3]
            hint = f" (it holds {', '.join(inside)})" if inside else ""
            problems.append(
                Problem(
                    "engine.model",
                    f"{engine.model} is a directory{hint}; engine.model takes the GGUF file "
                    f"itself; {fix}",
                )
            )
        elif not model.is_file():
            problems.append(Problem("engine.model", f"{engine.model} does not exist; {fix}"))
        elif not _is_gguf(model):
            problems.append(Problem("engine.model", f"{engine.model} is not a GGUF file; {fix}"))
        else:
            damaged = gguf_size_problem(model)
            if damaged:
                problems.append(
                    Problem("engine.model", f"{engine.model} {damaged}; copy or download it again")
                )
        if engine.tokenizer is not None:
            msg = _tokenizer_problem(Path(engine.tokenizer).expanduser())
            if msg:
                problems.append(Problem("engine.tokenizer", f"{engine.tokenizer} {msg}"))
        try:
            LlamaCppEngine(engine, which=self._which).server_prefix()
        except EngineNotFound as e:
            problems.append(Problem("engine.binary", str(e)))
        return problems

    # ---- failures --------------------------------------------------------------------------

    def classify_failure(
        self, log_text: str, returncode: int | None, params: Params | None = None
    ) -> tuple[FailureKind, str]:
        """Why llama-server (or the wheel) failed, from its log and exit status.

        Only evidence counts (``error_lines``): the exit status and the lines logged as errors,
        never warnings. Checked in order on the error lines: invalid flags → INVALID_ARGS; port
        bind → PORT_IN_USE; the kernel's OOM record for the engine (written into the log by
        deploy/local.py) → HOST_OOM; KV cache / context creation → KV_CACHE_TOO_SMALL; allocation
        failures → CUDA_OOM when CUDA is named, else HOST_OOM; model load → MODEL_LOAD_FAILED;
        anything else → ENGINE_CRASHED with the exit status or signal (a bare SIGKILL is not
        evidence of OOM) and the last error line (UNKNOWN while the process still runs). Each
        rule matches the wordings of several llama.cpp releases (fixtures in
        tests/unit/data/llamacpp_logs name their release). The reason is the evidence line
        without llama.cpp's prefix; for KV_CACHE_TOO_SMALL it says what to change, never
        something ``params`` (over engine.flags and the defaults) already does.
        """
        flags = self.effective_flags(params or {})
        return classify_llamacpp_log(log_text, returncode, flags)


# ---- helpers -------------------------------------------------------------------------------


def _pad(n: int) -> int:
    return -(-n // CTX_PAD) * CTX_PAD


@dataclass(frozen=True)
class SlotLayout:
    """How llama-server lays out its KV cache for one set of flags.

    ``slots``: requests decoded at once; ``kv_unified``: one KV buffer shared by every slot;
    ``n_ctx``: KV cells in total (tokens held by all slots together); ``n_ctx_slot``: the most
    tokens (prompt + output) one request may hold, as the server logs it
    (``load_model: initializing, n_slots = …, n_ctx_slot = …, kv_unified = …``).
    """

    slots: int
    kv_unified: bool
    n_ctx: int
    n_ctx_slot: int

    def max_in_flight(self, tokens_per_request: int) -> int:
        """How many requests of ``tokens_per_request`` tokens can be in flight at once without
        llama-server failing them (0 when one does not fit a slot)."""
        if tokens_per_request > self.n_ctx_slot:
            return 0
        if not self.kv_unified:
            return self.slots  # each slot owns its share; more requests wait in the queue
        return min(self.slots, self.n_ctx // tokens_per_request)


def slot_layout(
    ctx_size: int,
    parallel: int,
    kv_unified: bool | None,
    n_ctx_train: int | None,
    *,
    fit: bool = True,
) -> SlotLayout | None:
    """llama-server's slot and context layout for ``--ctx-size``, ``--parallel``,
    ``--kv-unified`` (None = unset) and the model's ``n_ctx_train``; None when it depends on an
    unknown ``n_ctx_train`` (ctx-size 0) or a value llama.cpp never runs.

    Rules (src/llama-context.cpp, tools/server/server-context.cpp; each checked against the real
    server in tests/integration/test_llamacpp_local.py):

    - parallel -1 (auto) = 4 slots and a unified KV cache, whatever --kv-unified says; an explicit
      parallel leaves kv-unified off unless it is set.
    - ctx-size 0 = the model's n_ctx_train for a unified buffer. Without one it depends on
      ``--fit`` (``fit``; on by default): with fit on, each slot gets n_ctx_train; with fit off,
      n_ctx_train is split across the slots (measured with xllamacpp 2026.10.11549 on a
      4096-token model: ``--parallel 3`` logs n_ctx_slot = 4096, with ``--fit off`` 1536; the
      wheel's llama.cpp logs "context size unset and KV cache not unified -> using %u for %u
      sequences" when it does so). Fit may lower an unset ctx-size further when device memory is
      short; that is not modelled.
    - n_ctx is padded up to a multiple of 256. Unified: every slot may use all n_ctx cells, the
      slots together at most n_ctx (beyond it the server answers "Context size has been
      exceeded." to every active request). Not unified: each slot gets
      pad256(n_ctx / slots) cells of its own and n_ctx becomes slots × that.
    - The server caps a slot at n_ctx_train ("the slot context … exceeds the training context of
      the model … - capping").
    """
    if parallel == -1:
        slots, unified = _AUTO_SLOTS, True
    elif parallel >= 1:
        slots, unified = parallel, bool(kv_unified)
    else:
        return None
    if ctx_size < 0:
        return None
    if ctx_size == 0:
        if not n_ctx_train:
            return None
        ctx_size = n_ctx_train * slots if fit and not unified else n_ctx_train
    n_ctx = _pad(ctx_size)
    if unified:
        seq = n_ctx
    else:
        seq = _pad(n_ctx // slots)
        n_ctx = seq * slots
    if n_ctx_train:
        seq = min(seq, n_ctx_train)
    return SlotLayout(slots=slots, kv_unified=unified, n_ctx=n_ctx, n_ctx_slot=seq)


def _as_int(v: object) -> int | None:
    """``v`` as an int when it is an integral number (not a bool), else None."""
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return int(v) if int(v) == v else None


def _layout_text(
    flags: Mapping[str, ParamValue | None], layout: SlotLayout, n_ctx_train: int | None
) -> str:
    """The flags and what llama-server makes of them, for a reason line."""
    ctx = _as_int(flags.get("ctx-size"))
    parallel = _as_int(flags.get("parallel"))
    ctx_text = f"ctx-size {ctx}" + (f" (the model's {n_ctx_train})" if ctx == 0 else "")
    par_text = f"parallel {parallel}" + (" (auto = 4 slots)" if parallel == -1 else "")
    kv = "a unified KV cache" if layout.kv_unified else "a KV share per slot"
    return (
        f"{ctx_text}, {par_text} and {kv} give n_ctx {layout.n_ctx}, n_ctx_slot "
        f"{layout.n_ctx_slot} per request"
    )


def ctx_size_for(layout: SlotLayout, tokens_per_request: int, in_flight: int) -> int:
    """The smallest ctx-size that lets ``in_flight`` requests of ``tokens_per_request`` tokens run
    with ``layout``'s slots and KV mode (a multiple of 256)."""
    if layout.kv_unified:
        return _pad(max(1, in_flight) * tokens_per_request)
    return layout.slots * _pad(tokens_per_request)


def render_flag(name: str, value: ParamValue) -> list[str]:
    """One flag as argv items: ``["--name", "value"]``; bools by the catalogue's forms."""
    if isinstance(value, bool):
        if name == "flash-attn":
            return ["--flash-attn", "on" if value else "off"]
        if name in CATALOGUE and CATALOGUE[name].type != "bool":
            return [f"--{name}", "on" if value else "off"]
        on, off = _BOOL_FORMS.get(name, (f"--{name}", None))
        form = on if value else off
        return [form] if form else []
    info = CATALOGUE.get(name)
    if isinstance(value, float) and value.is_integer() and info is not None and info.type == "int":
        value = int(value)
    if isinstance(value, float):
        return [f"--{name}", repr(value)]
    return [f"--{name}", str(value)]


def _load_mode(mlock: ParamValue | None, mmap: ParamValue | None) -> str:
    """--load-mode for the older --mlock / --no-mmap pair (llama-server's --load-mode help:
    mmap, mlock, mmap+mlock, none)."""
    mapped = mmap is not False
    if mlock is True:
        return "mmap+mlock" if mapped else "mlock"
    return "mmap" if mapped else "none"


def user_flags(flags: Mapping[str, ParamValue], order: list[str] | None = None) -> list[str]:
    """``flags`` as argv for current llama-server, in ``order`` (default: as given).

    Like ``render_flag``, except that ``mlock`` and ``mmap`` (gone from current llama-server)
    become one ``--load-mode`` (an explicit load-mode wins); nothing is printed for them when
    they keep llama-server's defaults."""
    names = list(dict.fromkeys(order if order is not None else flags))
    argv: list[str] = []
    legacy = {n: flags[n] for n in ("mlock", "mmap") if n in flags}
    for name in names:
        if name in ("mlock", "mmap"):
            if name != next(n for n in names if n in legacy) or "load-mode" in flags:
                continue
            mode = _load_mode(legacy.get("mlock"), legacy.get("mmap"))
            if mode != "mmap":  # mmap is what llama-server's auto mode does on a CPU
                argv += ["--load-mode", mode]
            continue
        argv += render_flag(name, flags[name])
    return argv


def read_context_length(path: Path) -> int | None:
    """``<general.architecture>.context_length`` of a GGUF file, or None when it cannot be read."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        value = reader.fields[f"{arch}.context_length"].contents()
        return int(value)
    except (OSError, KeyError, ValueError, TypeError) as e:
        logger.debug("cannot read the context length of %s: %s", path, e)
        return None


def _ctx_values(param: Param | None) -> list[int]:
    """The ctx-size values a search-space param can take that bound its largest (ints only;
    an int range gives its high end)."""
    if isinstance(param, ChoiceParam):
        return [v for v in param.values if isinstance(v, int) and not isinstance(v, bool)]
    if isinstance(param, IntParam):
        return [param.high]
    return []


_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_GGUF_SCALAR |= {11: "<q", 12: "<d"}
"""struct formats of GGUF's scalar value types (8 = string, 9 = array)."""


class _Cursor:
    """Little-endian reads over a GGUF file's bytes; raises IndexError past the end."""

    def __init__(self, data: bytes | mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> int | float:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise IndexError(self.pos)
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value  # type: ignore[no-any-return]

    def string(self) -> str:
        n = int(self.take("<Q"))
        if self.pos + n > len(self.data):
            raise IndexError(self.pos)
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = int(self.take("<I")), int(self.take("<Q"))
            if etype in _GGUF_SCALAR and etype != 8:
                size = struct.calcsize(_GGUF_SCALAR[etype]) * count
                if self.pos + size > len(self.data):
                    raise IndexError(self.pos)
                self.pos += size
                return None
            for _ in range(count):
                self.value(etype)
            return None
        if vtype not in _GGUF_SCALAR:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.take(_GGUF_SCALAR[vtype])


def gguf_size_problem(path: Path) -> str | None:
    """Why the GGUF file at ``path`` cannot be loaded whole, as the end of a sentence starting
    with its path (None when its header parses and its size covers every tensor's data).

    Reads the header, metadata and tensor infos (GGUF v2/v3: ggml docs/gguf.md), computes where
    the last tensor's data ends (data start aligned to ``general.alignment``, default 32; each
    tensor's bytes from ``gguf.GGML_QUANT_SIZES``) and compares it with the file size: a copy or
    download cut short is caught before llama-server fails on it."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return "is empty"
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        return f"cannot be read: {e}"
    cur = _Cursor(data)
    try:
        if bytes(data[:4]) != b"GGUF":
            return "is not a GGUF file"
        cur.pos = 4
        version = int(cur.take("<I"))
        if version < 2:
            return None  # GGUF v1 (2023) uses 32-bit counts; llama.cpp no longer loads it anyway
        n_tensors, n_kv = int(cur.take("<Q")), int(cur.take("<Q"))
        alignment = 32
        for _ in range(n_kv):
            key = cur.string()
            value = cur.value(int(cur.take("<I")))
            if key == "general.alignment" and isinstance(value, int):
                alignment = value or 32
        end = 0
        for _ in range(n_tensors):
            cur.string()
            dims = [int(cur.take("<Q")) for _ in range(int(cur.take("<I")))]
            ggml_type, offset = int(cur.take("<I")), int(cur.take("<Q"))
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            elements = 1
            for d in dims:
                elements *= d
            end = max(end, offset + elements // block * type_size)
        start = -(-cur.pos // alignment) * alignment
    except IndexError:
        return (
            f"is truncated: it ends at byte {size:,}, inside its header (metadata and tensor list)"
        )
    except (ValueError, KeyError) as e:
        return f"is damaged: its header cannot be read ({e})"
    finally:
        data.close()
    need = start + end
    if size < need:
        return (
            f"is truncated: its tensor data ends at byte {need:,} but the file has {size:,} "
            f"bytes ({need - size:,} missing)"
        )
    return None


def _tokenizer_problem(path: Path) -> str | None:
    """Why ``path`` is not a loadable Hugging Face tokenizer (directory or tokenizer.json), as the
    end of a sentence starting with the path; None when ``tokenizers`` loads it."""
    fix = "point to a tokenizer directory or its tokenizer.json, or use null to count tokens with "
    fix += "the server"
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            return f"is a directory without tokenizer.json; {fix}"
    elif path.is_file():
        file = path
    else:
        return f"does not exist; {fix}"
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception for unreadable or foreign JSON
        return f"is not a loadable tokenizer: tokenizers cannot read {file.name} ({e}); {fix}"
    return None


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


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


# ---- failure classification ---------------------------------------------------------------

_LOG_PREFIX = re.compile(r"^\s*\d+\.\d+\.\d+\.\d+\s+([A-Z])\s+")
"""llama.cpp's log prefix with timestamps and level (common/log.cpp, 2024-09 on):
``0.17.703.671 E `` (E error, W warning, I info, D debug)."""

_OLD_SERVER_LEVEL = re.compile(r"^\s*(ERR|WARN|INFO|VERB|DEBUG)\s+\[\s*[\w:~]+\]\s+")
"""The llama.cpp server's own log format of 2024 (examples/server/utils.hpp, before common/log):
``ERR [              load_model] unable to load model | tid=…``."""

_WARNING = re.compile(r"^(warning|warn)\b|^W\s", re.IGNORECASE)
"""A warning without a level prefix: ``warning: failed to mlock …`` (fprintf in older releases)."""

_ERRORISH = re.compile(
    r"error|fail|unable|insufficient|out of memory|bad_alloc|abort|terminat|exception|couldn't|"
    r"cannot|can't|invalid|unknown value|unrecognized|unsupported|requires|killed|usage:|"
    r"GGML_ASSERT|segmentation fault",
    re.IGNORECASE,
)

_NOT_FATAL = re.compile(
    r"failed to (mlock|munlock)|of pinned memory|retrying with smaller batch|"
    r"available cells in kv cache|error loading state|failed to restore|"
    r"failed to load prompt from cache|memory for prompt cache state",
    re.IGNORECASE,
)
"""Messages llama.cpp prints, at whatever level, and then goes on: mlock (src/llama-mmap.cpp
"warning: failed to mlock …", fprintf in older releases), pinned host memory (ggml-cuda.cu
"failed to allocate … of pinned memory", a warning then a debug line; ggml-sycl logs it with
GGML_LOG_ERROR as "WARNING: …"), decode retries with a smaller batch, and prompt-cache restores
(server: "state_read_meta: failed to find N available cells in kv cache", logged at level E while
serving, as seen with xllamacpp 2026.10.11549)."""

_SERVETUNE_OOM = "servetune: out-of-memory evidence:"
"""How deploy/local.py writes the kernel's OOM record for the engine into its log."""

_RULES: tuple[tuple[FailureKind, re.Pattern[str]], ...] = (
    (
        FailureKind.INVALID_ARGS,
        re.compile(
            r"error: (invalid argument|unrecognized arguments|argument |unknown value|"
            r"unknown argument|invalid value|"
            r"the following arguments are required)|error while handling argument|invalid choice|"
            r"unknown value for|unsupported cache type|requires flash_attn|--model is required",
            re.IGNORECASE,
        ),
    ),
    (
        FailureKind.PORT_IN_USE,
        re.compile(
            r"couldn't bind|address already in use|failed to bind|eaddrinuse", re.IGNORECASE
        ),
    ),
    (
        FailureKind.HOST_OOM,
        re.compile(re.escape(_SERVETUNE_OOM)),
    ),
    (
        FailureKind.KV_CACHE_TOO_SMALL,
        re.compile(
            r"kv[ _]cache|failed to initialize the context|llama_kv_cache_init", re.IGNORECASE
        ),
    ),
    (
        FailureKind.CUDA_OOM,
        re.compile(
            r"(cuda\w*|cudaMalloc).*(out of memory|failed to allocate)|"
            r"(out of memory|failed to allocate).*\bcuda",
            re.IGNORECASE,
        ),
    ),
    (
        FailureKind.HOST_OOM,
        re.compile(
            r"failed to allocate|out of memory|bad_alloc|insufficient memory|"
            r"cannot allocate memory|MemoryError",
            re.IGNORECASE,
        ),
    ),
    (
        FailureKind.MODEL_LOAD_FAILED,
        re.compile(
            r"failed to load model|error loading model|unable to load model|failed to open gguf|"
            r"invalid magic|unknown model architecture",
            re.IGNORECASE,
        ),
    ),
)


_ALLOC_SIZE = re.compile(
    r"attempted to allocate|buffer of size|allocating .* on device", re.IGNORECASE
)
"""An allocation failure line that says how much was asked for."""

_SIGNALS = {6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM"}


def _signal_of(returncode: int | None) -> int | None:
    """The signal that ended the process: ``-N`` from Popen, or ``128 + N`` from a shell."""
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    if 128 < returncode <= 128 + 64:
        return returncode - 128
    return None


def _exit_text(returncode: int) -> str:
    sig = _signal_of(returncode)
    if sig is None:
        return f"exited with status {returncode}"
    return f"killed by {_SIGNALS.get(sig, f'signal {sig}')} (exit status {returncode})"


def _kv_cache_reason(hit: str, errors: list[str], flags: Mapping[str, ParamValue | None]) -> str:
    """What to do about a KV cache / context that llama.cpp could not create, with the evidence:
    ``hit`` plus the first error line giving the size it tried to allocate, when there is one.

    The advice never repeats what the failing flags already do: "lower parallel" only with more
    than one slot, a quantized cache type only when K or V is not quantized yet."""
    evidence = hit
    size = next((x for x in errors if x != hit and _ALLOC_SIZE.search(x)), None)
    if size is not None:
        evidence += f"; {size}"
    if re.search(r"alloc|memory", evidence, re.IGNORECASE):
        what = "the KV cache these flags ask for could not be allocated"
    else:
        what = "llama.cpp could not create the context (KV cache) these flags ask for"
    ctx = _as_int(flags.get("ctx-size"))
    parallel = _as_int(flags.get("parallel"))
    steps = ["lower ctx-size" if ctx else "set ctx-size below the model's context length"]
    if parallel is None or parallel == -1 or parallel > 1:
        steps.append("lower parallel")
    unquantized = [
        n for n in ("cache-type-k", "cache-type-v") if flags.get(n) not in _QUANTIZED_CACHE
    ]
    if unquantized:
        fa = flags.get("flash-attn")
        note = "; a quantized V cache needs flash-attn" if fa in ("off", False) else ""
        steps.append(f"use a quantized {'/'.join(unquantized)} (e.g. q8_0{note})")
    advice = ", or ".join([", ".join(steps[:-1]), steps[-1]] if len(steps) > 1 else steps)
    return f"{what} ({evidence}): {advice}"


def _clean(line: str) -> str:
    line = _LOG_PREFIX.sub("", line)
    return _OLD_SERVER_LEVEL.sub("", line).strip()


def error_lines(log_text: str) -> list[str]:
    """The lines of an engine log that can be evidence of a failure, without their prefixes.

    A line counts when llama.cpp logged it as an error (level ``E``, or ``ERR`` in the 2024
    server format), or when it carries no level and reads as an error (stderr of the process:
    ``terminate called …``, ``error: …``, argparse's usage errors). Warnings and info lines never
    count, whatever they say (``W … failed to mlock … Cannot allocate memory`` is a warning:
    llama.cpp goes on without the lock), nor do messages llama.cpp goes on after whatever their
    level (``_NOT_FATAL``) or lines that start with "warning"."""
    out: list[str] = []
    for raw in log_text.splitlines():
        prefixed = _LOG_PREFIX.match(raw)
        old = _OLD_SERVER_LEVEL.match(raw)
        line = _clean(raw)
        if not line:
            continue
        if prefixed is not None and prefixed.group(1) != "E":
            continue
        if old is not None and old.group(1) != "ERR":
            continue
        if _WARNING.match(line) or _NOT_FATAL.search(line):
            continue
        if line.startswith(_SERVETUNE_OOM) or _ERRORISH.search(line):
            out.append(line)
    return out


def classify_llamacpp_log(
    log_text: str,
    returncode: int | None,
    flags: Mapping[str, ParamValue | None] | None = None,
) -> tuple[FailureKind, str]:
    """(FailureKind, evidence line) for a llama.cpp start-up log; see ``classify_failure``.

    ``flags``: the flags the engine ran with (for advice that never repeats them)."""
    lines = [x for x in (_clean(y) for y in log_text.splitlines()) if x]
    errors = error_lines(log_text)
    usage = any(x.startswith("usage:") for x in lines)
    for kind, pattern in _RULES:
        hit = next((x for x in errors if pattern.search(x)), None)
        if hit is not None:
            if kind is FailureKind.KV_CACHE_TOO_SMALL:
                return kind, _kv_cache_reason(hit, errors, flags or {})
            return kind, hit
    if returncode == 2 and usage:
        return FailureKind.INVALID_ARGS, errors[-1] if errors else "the engine printed its usage"
    if returncode is None:
        return FailureKind.UNKNOWN, errors[-1] if errors else (
            lines[-1] if lines else "no log output"
        )
    evidence = errors[-1] if errors else (lines[-1] if lines else "no log output")
    if _signal_of(returncode) == 9:
        return FailureKind.ENGINE_CRASHED, (
            f"{_exit_text(returncode)} with no evidence of running out of memory (no OOM record "
            f"from the kernel, no allocation error in the log); last line: {evidence}"
        )
    return FailureKind.ENGINE_CRASHED, f"{_exit_text(returncode)}: {evidence}"
