"""Rule-based start-up failure classification shared by the GPU engines (vLLM, SGLang).

Each engine lists ``Rule``s (pattern → FailureKind, evidence wording, direction); ``classify``
applies them to the log tail and the exit status and returns one ``Classification``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from servetune.core.feasibility import Direction
from servetune.core.study import FailureKind


@dataclass(frozen=True)
class Classification:
    """Why an engine failed: ``kind`` (stable code), ``reason`` (evidence line plus what to do)
    and ``directions`` (which flag to move which way, most useful first; empty when none)."""

    kind: FailureKind
    reason: str
    directions: tuple[Direction, ...] = ()

    @property
    def direction(self) -> Direction | None:
        """The first (most useful) direction, or None."""
        return self.directions[0] if self.directions else None


@dataclass(frozen=True)
class Rule:
    """``pattern`` found in a log line proves ``kind``; ``advice`` is appended to the evidence;
    ``directions`` say which flag to move. ``context`` (optional) must also match some log line
    for the rule to apply (e.g. a CUDA OOM only counts as a graph-capture OOM after "Capture")."""

    kind: FailureKind
    pattern: re.Pattern[str]
    advice: str = ""
    directions: tuple[Direction, ...] = ()
    context: re.Pattern[str] | None = None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def clean_lines(log_text: str, prefix: re.Pattern[str] | None = None) -> list[str]:
    """Non-empty log lines without ANSI colour codes, surrounding space and the engine's log
    ``prefix`` (process tag, level, timestamp, source location)."""
    out = []
    for line in log_text.splitlines():
        x = _ANSI.sub("", line).strip()
        if prefix is not None:
            x = prefix.sub("", x).strip()
        if x:
            out.append(x)
    return out


def classify(
    rules: Sequence[Rule],
    log_text: str,
    returncode: int | None,
    *,
    ready: re.Pattern[str],
    engine: str,
    prefix: re.Pattern[str] | None = None,
    skip: re.Pattern[str] | None = None,
) -> Classification:
    """Apply ``rules`` in order to ``log_text``; the first rule that matches wins, with its last
    matching line as evidence (the exception line after a traceback's source line).

    Without a match: a log showing the server ready (``ready``) → ENGINE_CRASHED "died after it
    was ready" when it exited, STARTUP_TIMEOUT "opened its port but never generated" while it
    runs; the deployment's out-of-memory record (``OOM_EVIDENCE_PREFIX``, the kernel's OOM kill of
    the engine) → HOST_OOM; a bare SIGKILL (-9/137) → ENGINE_CRASHED; still running → UNKNOWN;
    otherwise ENGINE_CRASHED with the last error-looking line.
    """
    lines: list[str] = []
    evidence: list[str] = []
    for raw in clean_lines(log_text):
        line = prefix.sub("", raw).strip() if prefix is not None else raw
        if not line:
            continue
        lines.append(line)
        if skip is None or not skip.search(raw):
            evidence.append(line)
    for rule in rules:
        if rule.context is not None and not any(rule.context.search(x) for x in evidence):
            continue
        hit = next((x for x in reversed(evidence) if rule.pattern.search(x)), None)
        if hit is not None:
            reason = f"{hit}{'; ' + rule.advice if rule.advice else ''}"
            return Classification(rule.kind, reason, rule.directions)
    errors = [x for x in evidence if _ERRORISH.search(x)]
    last = errors[-1] if errors else (lines[-1] if lines else "no log output")
    was_ready = any(ready.search(x) for x in lines)
    if returncode is None:
        if was_ready:
            return Classification(
                FailureKind.STARTUP_TIMEOUT,
                f"{engine} opened its port and said it was ready but never answered a "
                f"generation (last line: {lines[-1]}); the model may be too slow on this GPU, "
                "or a worker hung: check the trial log",
            )
        return Classification(FailureKind.UNKNOWN, last)
    oom = next((x for x in lines if x.startswith(OOM_EVIDENCE_PREFIX)), None)
    if oom is not None:  # the kernel's record, written into the log by the deployment
        return Classification(FailureKind.HOST_OOM, oom)
    if returncode in (-9, 137):  # a bare SIGKILL proves no out-of-memory (issue 6): retried once
        return Classification(
            FailureKind.ENGINE_CRASHED,
            f"killed by SIGKILL (exit status {returncode}) with no out-of-memory record"
            + (f"; last error: {errors[-1]}" if errors else ""),
        )
    if was_ready:
        return Classification(
            FailureKind.ENGINE_CRASHED,
            f"{engine} died after it was ready (exit status {returncode}): {last}",
        )
    return Classification(FailureKind.ENGINE_CRASHED, f"exited with status {returncode}: {last}")


OOM_EVIDENCE_PREFIX = "servetune: out-of-memory evidence:"
"""How a deployment writes the kernel's OOM record for the engine into its log (deploy/local.py
writes it; only such evidence or an allocation error makes a failure host_oom)."""

_ERRORISH = re.compile(
    r"error|exception|traceback|fail|out of memory|killed|abort|invalid|unrecognized|"
    r"not supported|must be|cannot|can't",
    re.IGNORECASE,
)

PORT_IN_USE = re.compile(
    r"address already in use|errno 98|eaddrinuse|error while attempting to bind", re.IGNORECASE
)
"""Uvicorn/asyncio bind failures (``[Errno 98] error while attempting to bind on address ...:
address already in use``), the wording both vLLM and SGLang print through uvicorn."""

UNRECOGNIZED_ARGS = re.compile(
    r"error: unrecognized arguments|error: argument [-\w/ ]+: (invalid|expected|ambiguous)|"
    r"error: ambiguous option|error: the following arguments are required",
    re.IGNORECASE,
)
"""argparse's own rejections (exit status 2), as both engines parse their flags with argparse."""
