"""run_trial: the one place where an Engine, a Deployment and a BenchmarkClient meet.

It turns params into a TrialResult and maps every error on the way to a FailureKind; the study
loop (and, later, a worker) calls it and never sees a foreign exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from servetune.core.metrics import LoadLevel, RequestRecord, summarize
from servetune.core.slo import check_slos, request_bounds
from servetune.core.spec import StudySpec, Workload
from servetune.core.study import FailureKind, Params, TrialResult, TrialState
from servetune.deploy.base import Deployment, RunningEngine
from servetune.engines.base import Endpoint, Engine
from servetune.engines.readiness import wait_ready
from servetune.errors import EngineStartFailed, ServetuneError

log = logging.getLogger(__name__)

RETRYABLE = frozenset(
    {
        FailureKind.PORT_IN_USE,
        FailureKind.ENGINE_CRASHED,
        FailureKind.WORKER_LOST,
        FailureKind.UNKNOWN,
    }
)
"""Infrastructure failure kinds retried once with the same params (DESIGN.md §3)."""


class BenchmarkClient(Protocol):
    """Drives an endpoint with a workload and returns every request's record, per load level."""

    async def run(
        self, endpoint: Endpoint, workload: Workload
    ) -> list[tuple[LoadLevel, list[RequestRecord]]]:
        """Benchmark every level of ``workload`` in order (warm-up records flagged)."""
        ...


@dataclass
class TrialContext:
    """What every trial of one study shares.

    ``on_started`` is called with the engine handle right after launch (the loop records the
    pid so a resumed study can kill a survivor); ``on_phase`` receives short phase names.
    """

    spec: StudySpec
    engine: Engine
    deployment: Deployment
    client: BenchmarkClient
    log_dir: Path
    label: str = "study"
    on_started: Callable[[RunningEngine], None] | None = None
    on_phase: Callable[[str], None] | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def _fail(kind: FailureKind, reason: str, **extra: object) -> TrialResult:
    return TrialResult(state=TrialState.FAIL, failure_kind=kind, failure_reason=reason, **extra)


async def run_trial(ctx: TrialContext, params: Params, number: int) -> TrialResult:
    """Deploy ``params``, benchmark them and score the result; retry an infrastructure failure once.

    Never raises for a trial-level problem: every failure is a FAIL TrialResult with its
    FailureKind and a readable reason. Re-raises ``asyncio.CancelledError`` after stopping the
    engine (the caller records the trial as cancelled).
    """
    result = await _run_once(ctx, params, number, attempt=1)
    if result.state is TrialState.FAIL and result.failure_kind in RETRYABLE:
        log.warning(
            "%s trial %d: %s (%s); retrying once",
            ctx.label,
            number,
            result.failure_kind,
            result.failure_reason,
        )
        first = result
        result = await _run_once(ctx, params, number, attempt=2)
        note = f"retried once after {first.failure_kind}: {first.failure_reason}"
        result = result.model_copy(update={"notes": [note, *result.notes]})
    return result


def _phase(ctx: TrialContext, name: str) -> None:
    if ctx.on_phase:
        ctx.on_phase(name)


async def _run_once(ctx: TrialContext, params: Params, number: int, attempt: int) -> TrialResult:
    spec = ctx.spec
    started_at = _now()
    problems = spec.space.violations(params) if set(params) >= _constraint_names(spec) else []
    problems += ctx.engine.preflight(params, spec.workload)
    if problems:
        log.info("%s trial %d rejected before launch: %s", ctx.label, number, "; ".join(problems))
        return _fail(
            FailureKind.PREFLIGHT_REJECTED,
            "; ".join(problems),
            started_at=started_at,
            finished_at=_now(),
        )

    host, port = ctx.deployment.reserve_port()
    command = ctx.engine.launch_command(params, host=host, port=port)
    suffix = f"-attempt{attempt}" if attempt > 1 else ""
    log_path = ctx.log_dir / f"trial-{number:04d}{suffix}.log"
    common = {"launch_argv": command.argv, "log_path": str(log_path), "started_at": started_at}
    log.info("%s trial %d: launching %s", ctx.label, number, command.display())
    _phase(ctx, "starting")
    t0 = time.perf_counter()
    try:
        running = await ctx.deployment.start(command, log_path)
    except ServetuneError as e:
        return _fail(
            FailureKind.ENGINE_CRASHED,
            f"could not spawn the engine: {e}",
            finished_at=_now(),
            **common,
        )
    try:
        if ctx.on_started:
            ctx.on_started(running)
        endpoint = ctx.engine.endpoint(host, port)
        try:
            await wait_ready(endpoint, running, ctx.engine, spec.deployment.startup_timeout_s)
        except EngineStartFailed as e:
            log.info("%s trial %d failed to start: %s", ctx.label, number, e)
            return _fail(
                e.kind,
                e.reason,
                finished_at=_now(),
                engine_start_s=time.perf_counter() - t0,
                **common,
            )
        start_s = time.perf_counter() - t0
        log.info("%s trial %d: ready in %.2f s; benchmarking", ctx.label, number, start_s)
        _phase(ctx, "benchmarking")
        t1 = time.perf_counter()
        try:
            levels = await ctx.client.run(endpoint, spec.workload)
        except ServetuneError as e:
            return _fail(
                FailureKind.BENCHMARK_FAILED,
                str(e),
                finished_at=_now(),
                engine_start_s=start_s,
                **common,
            )
        bench_s = time.perf_counter() - t1
        code = running.returncode()
        if code is not None:
            kind, reason = ctx.engine.classify_failure(running.log_text(), code)
            if kind is FailureKind.UNKNOWN:
                kind = FailureKind.ENGINE_CRASHED
            return _fail(
                kind,
                f"engine exited ({code}) during the benchmark: {reason}",
                finished_at=_now(),
                engine_start_s=start_s,
                benchmark_s=bench_s,
                **common,
            )
        return _score(ctx, levels, started_at, start_s, bench_s, common)
    finally:
        _phase(ctx, "stopping")
        await asyncio.shield(running.stop())


def _constraint_names(spec: StudySpec) -> set[str]:
    return {n for c in spec.space.parsed_constraints() for n in c.names()}


def _score(
    ctx: TrialContext,
    levels: Sequence[tuple[LoadLevel, list[RequestRecord]]],
    started_at: datetime,
    start_s: float,
    bench_s: float,
    common: dict[str, object],
) -> TrialResult:
    spec = ctx.spec
    bounds = request_bounds(spec.slos)
    metrics = [
        summarize(level, records, bounds, spec.workload.prompt_token_tolerance)
        for level, records in levels
    ]
    # The built-in client's own load per level (client_loop_lag_p99_ms, client_cpu_fraction).
    loads = getattr(ctx.client, "client_load", None) or []
    if len(loads) == len(metrics):
        metrics = [
            m.model_copy(update=x.metrics_fields()) for m, x in zip(metrics, loads, strict=True)
        ]
    notes: list[str] = []
    for m in metrics:
        if m.prompt_token_mismatches:
            notes.append(
                f"{m.level.label}: {m.prompt_token_mismatches} prompt(s) differ from {spec.workload.input_tokens} "
                f"tokens by more than {spec.workload.prompt_token_tolerance} (server mean "
                f"{m.mean_prompt_tokens})"
            )
        if (
            m.mean_output_tokens is not None
            and abs(m.mean_output_tokens - spec.workload.output_tokens) > 0.5
        ):
            notes.append(
                f"{m.level.label}: mean output {m.mean_output_tokens:.1f} tokens, asked for "
                f"{spec.workload.output_tokens}"
            )
    if all(m.completed == 0 for m in metrics):
        kinds: dict[str, int] = {}
        for m in metrics:
            for k, n in m.failed_by_kind.items():
                kinds[k] = kinds.get(k, 0) + n
        return _fail(
            FailureKind.BENCHMARK_FAILED,
            f"no request succeeded (failures by kind: {kinds})",
            metrics=metrics,
            finished_at=_now(),
            engine_start_s=start_s,
            benchmark_s=bench_s,
            notes=notes,
            **common,
        )
    report = check_slos(spec.slos, metrics, spec.workload.max_error_rate)
    values = spec.objective.values(metrics)
    return TrialResult(
        state=TrialState.COMPLETE,
        metrics=metrics,
        slo_report=report,
        feasible=report.feasible and values is not None,
        objective_values=values,
        finished_at=_now(),
        engine_start_s=start_s,
        benchmark_s=bench_s,
        notes=notes,
        **common,
    )


Runner = Callable[[TrialContext, Params, int], Awaitable[TrialResult]]
"""Signature of ``run_trial`` (a worker-side implementation must match it)."""
