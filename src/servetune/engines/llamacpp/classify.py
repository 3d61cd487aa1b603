"""llama.cpp start-up failures: log lines → FailureKind and evidence, with advice for a KV cache
that could not be created that never repeats the flags it ran with.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from servetune.core.study import FailureKind, ParamValue
from servetune.engines.llamacpp.flags import _QUANTIZED_CACHE
from servetune.engines.llamacpp.preflight import _as_int

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
