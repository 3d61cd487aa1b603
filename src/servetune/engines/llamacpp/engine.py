"""The llama.cpp Engine adapter: catalogue (flags.py), command (launch.py), pre-flight
(preflight.py, gguf_info.py) and log classifier (classify.py) behind the Engine protocol.

It launches ``llama-server`` when one is installed, else the same flags through the xllamacpp wheel.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

from servetune.core.space import SearchSpace
from servetune.core.spec import LlamaCppEngineSpec, Problem, StudySpec, Workload
from servetune.core.study import FailureKind, Params, ParamValue, TrialNeeds
from servetune.engines.base import Endpoint, FlagInfo, LaunchCommand
from servetune.engines.llamacpp.classify import classify_llamacpp_log
from servetune.engines.llamacpp.flags import (
    _INT_RANGES,
    _QUANTIZED_CACHE,
    CATALOGUE,
    _int_allowed,
    _int_range_text,
    _name_problem,
    _param_type_problem,
    _value_problem,
)
from servetune.engines.llamacpp.gguf_info import _is_gguf, gguf_size_problem, read_context_length
from servetune.engines.llamacpp.launch import SERVER_MODULE, XLLAMACPP, render_flag, user_flags
from servetune.engines.llamacpp.preflight import (
    SlotLayout,
    _as_int,
    _ctx_values,
    _layout_text,
    _pad,
    _tokenizer_problem,
    ctx_size_for,
    slot_layout,
)
from servetune.errors import EngineNotFound


def default_threads() -> int:
    """The thread count llama-server uses when ``--threads`` is unset or -1: the host's physical
    cores (llama.cpp common/common.cpp ``cpu_get_num_math`` → ``cpu_get_num_physical_cores``,
    which counts distinct sibling sets under /sys/devices/system/cpu; psutil reads the same),
    capped at the logical cores ``os.cpu_count()``; the logical count when psutil cannot tell.
    Hybrid Intel CPUs (llama.cpp counts only their performance cores) are not special-cased:
    the larger count only makes the scheduler more careful."""
    logical = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    return max(1, min(physical, logical))


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

    def needs(self, params: Params, workload: Workload) -> TrialNeeds:
        """CPU threads one llama-server with ``params`` (over engine.flags and the defaults)
        keeps busy: the larger of ``threads`` and ``threads-batch`` (prompt processing; unset =
        ``threads``), where unset or -1 is llama-server's own default (``default_threads``),
        capped at this host's logical cores (``os.cpu_count()``). No GPU is counted (a llama.cpp
        trial offloading layers shares whatever GPU the host has). ``workload`` is unused."""
        f = self.effective_flags(params)
        cores = os.cpu_count() or 1

        def count(name: str, fallback: int) -> int:
            v = _as_int(f.get(name))
            return v if v is not None and v >= 1 else fallback

        threads = count("threads", default_threads())
        batch = count("threads-batch", threads)
        return TrialNeeds(cpu_threads=max(1, min(max(threads, batch), cores)))

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
