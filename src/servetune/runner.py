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

from servetune.core.metrics import LoadLevel, RequestRecord, summarize, trial_warnings
from servetune.core.slo import check_slos, request_bounds
from servetune.core.spec import StudySpec, Workload
from servetune.core.study import FailureKind, Params, TrialResult, TrialState
from servetune.deploy.base import Deployment, RunningEngine
from servetune.engines.base import Endpoint, Engine
from servetune.engines.readiness import wait_ready
from servetune.errors import EngineStartFailed, ServetuneError
from servetune.hostload import OutsideLoadMeter, outside_cpu_fraction

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
    The loop gives each trial its own copy (``dataclasses.replace``) with ``study_id`` and
    ``trial_id`` (database ids) set, so trials in flight at once never share callbacks; a runner
    that executes elsewhere (a worker) sends them along.
    """

    spec: StudySpec
    engine: Engine
    deployment: Deployment
    client: BenchmarkClient
    log_dir: Path
    label: str = "study"
    on_started: Callable[[RunningEngine], None] | None = None
    on_phase: Callable[[str], None] | None = None
    study_id: int | None = None
    trial_id: int | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def _fail(kind: FailureKind, reason: str, **extra: object) -> TrialResult:
    return TrialResult(state=TrialState.FAIL, failure_kind=kind, failure_reason=reason, **extra)


async def run_trial(ctx: TrialContext, params: Params, number: int) -> TrialResult:
    """Deploy ``params``, benchmark them and score the result; retry an infrastructure failure once.

    Never raises for a trial-level problem: every failure is a FAIL TrialResult with its
    FailureKind and a readable reason. A COMPLETE trial measured while other processes used more
    than ``spec.deployment.max_outside_cpu_fraction`` of all CPU cores (``outside_cpu_fraction``,
    see ``servetune.hostload``) is re-run once on a fresh server; the less loaded COMPLETE run is
    kept, with a note giving both loads, and it keeps its ``outside_load`` warning if it too
    was loaded. Re-raises ``asyncio.CancelledError`` after stopping the
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
    limit = ctx.spec.deployment.max_outside_cpu_fraction
    if _loaded(result, limit):
        log.warning(
            "%s trial %d: other processes used %.0f%% of the CPU while it was measured; re-running",
            ctx.label,
            number,
            100 * (result.outside_cpu_fraction or 0.0),
        )
        first = result
        again = await _run_once(ctx, params, number, attempt=3)
        result = _less_loaded(first, again, limit)
    return result


def _loaded(result: TrialResult, limit: float) -> bool:
    """True for a COMPLETE trial measured while other processes used more than ``limit``."""
    return (
        result.state is TrialState.COMPLETE
        and result.outside_cpu_fraction is not None
        and result.outside_cpu_fraction > limit
    )


def _less_loaded(first: TrialResult, again: TrialResult, limit: float) -> TrialResult:
    """After an outside-load re-run: the re-run unless it failed or ran under more load.

    The kept result carries a note naming both loads (and the first run's throughput), so the
    re-run is visible; it keeps its own ``outside_load`` warning if it was loaded too.
    """
    f1 = first.outside_cpu_fraction or 0.0
    f2 = again.outside_cpu_fraction
    keep_first = again.state is not TrialState.COMPLETE or (f2 is not None and f2 > f1)
    kept = first if keep_first else again
    tps = f"{first.metrics[-1].output_tokens_per_s:.1f} tok/s" if first.metrics else "no metrics"
    second = (
        f"{f2:.0%}"
        if again.state is TrialState.COMPLETE and f2 is not None
        else f"{again.state.value} {again.failure_kind or ''}".strip()
    )
    note = (
        f"re-run once: other processes used {f1:.0%} of all CPU cores during the first "
        f"measurement ({tps}; limit {limit:.0%}), {second} during the re-run; kept the "
        f"{'first' if keep_first else 're-run'}"
    )
    return kept.model_copy(update={"notes": [note, *kept.notes]})


def _phase(ctx: TrialContext, name: str) -> None:
    if ctx.on_phase:
        ctx.on_phase(name)


async def _run_once(ctx: TrialContext, params: Params, number: int, attempt: int) -> TrialResult:
    spec = ctx.spec
    started_at = _now()
    problems = spec.space.violations(params) if set(params) >= _constraint_names(spec) else []
    # off the event loop: it may read the model file (llama.cpp: the GGUF's metadata), which
    # blocked the loop for 0.1-0.3 s per trial even with the 15 MB test model
    problems += await asyncio.to_thread(ctx.engine.preflight, params, spec.workload)
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
    except EngineStartFailed as e:  # a deployment that waits for readiness itself (OME)
        return _fail(e.kind, e.reason, finished_at=_now(), **common)
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
        base_url = getattr(running, "base_url", None)  # a deployment that resolves its own (OME)
        if base_url:
            endpoint = Endpoint(base_url=base_url, model=endpoint.model)
        try:
            await wait_ready(
                endpoint, running, ctx.engine, spec.deployment.startup_timeout_s, params=params
            )
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
        meter = OutsideLoadMeter()
        load0 = await asyncio.to_thread(meter.snapshot, running.pid, running.pgid)
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
        load1 = await asyncio.to_thread(meter.snapshot, running.pid, running.pgid)
        common["outside_cpu_fraction"] = outside_cpu_fraction(load0, load1)
        code = running.returncode()
        if code is not None:
            log_text = await asyncio.to_thread(running.log_text)  # a whole engine log
            kind, reason = ctx.engine.classify_failure(log_text, code, params)
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
    outside = common.get("outside_cpu_fraction")
    warnings = trial_warnings(
        metrics,
        outside if isinstance(outside, float) else None,
        spec.deployment.max_outside_cpu_fraction,
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
            warnings=warnings,
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
        warnings=warnings,
        **common,
    )


Runner = Callable[[TrialContext, Params, int], Awaitable[TrialResult]]
"""Signature of ``run_trial`` (a worker-side implementation must match it)."""
