"""The ARQ job a worker runs: one ``TrialJob`` payload in, ``run_trial`` on this host, events out.

Every job ends with exactly one RESULT, HANDED_BACK or REJECTED event on the events stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError

from servetune.bench.builtin import BuiltinClient
from servetune.cluster.events import send_event
from servetune.cluster.logs import EngineLogTailer, log_context
from servetune.cluster.models import (
    LogSource,
    RunningTrial,
    TrialEvent,
    TrialEventKind,
    TrialJob,
    utc_now,
)
from servetune.core.spec import LocalDeploymentSpec, StudySpec
from servetune.core.study import FailureKind, TrialResult, TrialState
from servetune.deploy.base import Deployment, RunningEngine
from servetune.deploy.local import LocalDeployment
from servetune.engines import get_engine
from servetune.engines.base import Engine
from servetune.errors import ServetuneError
from servetune.runner import TrialContext, run_trial
from servetune.settings import Settings
from servetune.study_session import build_deployment
from servetune.worker import ENGINE_LOGGER
from servetune.worker.heartbeat import TrialsSnapshot

log = logging.getLogger(__name__)
engine_log = logging.getLogger(ENGINE_LOGGER)

JOB_FUNCTION = "run_trial_job"
"""The ARQ function name the manager enqueues (``cluster.queue``)."""

CTX_KEY = "servetune"
"""Key of the ``WorkerRuntime`` in ARQ's per-worker ``ctx`` dict."""

RESULT_SEND_DEADLINE_S = 600.0
"""How long a final event (RESULT, HANDED_BACK, REJECTED) is retried while Redis is down, s."""

_PHASE_SEND_TRIES = 3


@dataclass
class RunningJob:
    """A trial this worker is running: its job, the engines it launched, its current phase."""

    job: TrialJob
    started_at: datetime
    task: asyncio.Task[Any] | None = None
    engines: list[RunningEngine] = field(default_factory=list)
    phase: str = "queued"
    """The last phase before "stopping" (queued, starting, benchmarking): where the trial was
    when it was interrupted (``run_trial`` enters "stopping" on its way out)."""
    handing_back: bool = False

    def as_running_trial(self) -> RunningTrial:
        """The heartbeat's view of it."""
        return RunningTrial(
            job_id=self.job.job_id,
            study_id=self.job.study_id,
            trial_id=self.job.trial_id,
            number=self.job.number,
            started_at=self.started_at,
        )


@dataclass
class WorkerRuntime:
    """What every job of one worker process shares (stored in ARQ's ``ctx[CTX_KEY]``).

    ``redis`` is the worker's async redis-py client (events go through it); ``engines_file``
    records the process groups of the engines running now (``record_engines``), so the next
    incarnation of this worker kills them if this one is SIGKILLed (``main.kill_leftover_engines``).
    ``draining`` is set on SIGTERM: running jobs are handed back, none is started.
    ``trials`` is what the heartbeat thread reads: ``publish_trials`` refreshes it whenever
    ``running`` or ``draining`` changes (the thread never touches ``running`` itself).
    """

    settings: Settings
    worker_id: str
    redis: Any
    engines_file: Path
    running: dict[str, RunningJob] = field(default_factory=dict)
    draining: bool = False
    stopped_by: str = "SIGTERM"
    senders: set[asyncio.Task[None]] = field(default_factory=set)
    trials: TrialsSnapshot = field(default_factory=TrialsSnapshot)

    def running_trials(self) -> list[RunningTrial]:
        """Every trial in progress, for the heartbeat."""
        return [r.as_running_trial() for r in self.running.values()]

    def publish_trials(self) -> None:
        """Hand the running trials and the draining flag to the heartbeat thread (``trials``)."""
        self.trials.publish(self.running_trials(), self.draining)

    def record_engines(self) -> None:
        """Write the process groups of every live local engine to ``engines_file`` (atomically).

        Each entry: ``{"pgid", "marker", "job_id"}``; ``marker`` is text the engine's command
        line holds (the model), so a reused process group id is never killed by mistake.
        An unwritable file is logged, never raised (the engines still die with the worker
        through PR_SET_PDEATHSIG).
        """
        entries = [
            {"pgid": e.pgid, "marker": r.job.spec.engine.model, "job_id": r.job.job_id}
            for r in self.running.values()
            for e in r.engines
            if isinstance(e.pgid, int) and e.returncode() is None
        ]
        tmp = self.engines_file.with_name(self.engines_file.name + ".tmp")
        try:
            self.engines_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entries), encoding="utf-8")
            os.replace(tmp, self.engines_file)
        except OSError as e:
            log.warning("cannot record engine process groups in %s: %s", self.engines_file, e)

    def hand_back_all(self, stopped_by: str = "SIGTERM") -> int:
        """A stop's first step (``stopped_by``: the signal's name, for the events): mark the
        worker draining and cancel every running job, which stops its engine and sends
        HANDED_BACK. Returns how many jobs were cancelled."""
        self.draining = True
        self.stopped_by = stopped_by
        self.publish_trials()
        count = 0
        for running in self.running.values():
            running.handing_back = True
            if running.task is not None and not running.task.done():
                running.task.cancel()
                count += 1
        return count


class _Outbox:
    """One job's events, sent in order by one task (a job's STARTED never overtakes its PHASE).

    PHASE and STARTED are tried a few times; final events are retried until
    ``RESULT_SEND_DEADLINE_S`` passes, so a short Redis outage loses no result.
    """

    def __init__(self, rt: WorkerRuntime) -> None:
        self._rt = rt
        self._queue: asyncio.Queue[TrialEvent | None] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())
        rt.senders.add(self._task)
        self._task.add_done_callback(rt.senders.discard)

    def put(self, event: TrialEvent) -> None:
        self._queue.put_nowait(event)

    async def close(self) -> None:
        """Send what is queued, then end (shielded: a second cancel leaves the sending going)."""
        self._queue.put_nowait(None)
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        while (event := await self._queue.get()) is not None:
            await _send(self._rt, event)


async def _send(rt: WorkerRuntime, event: TrialEvent) -> bool:
    final = event.kind not in (TrialEventKind.PHASE, TrialEventKind.STARTED)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RESULT_SEND_DEADLINE_S
    delay_s = 0.2
    tries = 0
    while True:
        tries += 1
        try:
            await send_event(rt.redis, event)
            return True
        except (ServetuneError, RedisError, OSError) as e:
            if (not final and tries >= _PHASE_SEND_TRIES) or loop.time() >= deadline:
                level = logging.ERROR if final else logging.WARNING
                log.log(level, "could not send %s event of job %s: %s", event.kind, event.job_id, e)
                return False
            log.warning(
                "sending %s event of job %s failed (%s); retrying", event.kind, event.job_id, e
            )
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, 5.0)


def _event(rt: WorkerRuntime, job: TrialJob, kind: TrialEventKind, **extra: Any) -> TrialEvent:
    return TrialEvent(
        kind=kind,
        job_id=job.job_id,
        study_id=job.study_id,
        trial_id=job.trial_id,
        number=job.number,
        attempt=job.attempt,
        worker_id=rt.worker_id,
        **extra,
    )


def describe_errors(e: ValidationError) -> str:
    """Pydantic's errors as ``field: message`` pairs joined by ``; `` (input values left out,
    so a large or secret payload never reaches the log)."""
    parts = []
    for err in e.errors(include_url=False, include_input=False):
        loc = ".".join(str(x) for x in err["loc"]) or "payload"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _readable_ids(payload: Any, job_id: str | None) -> dict[str, Any] | None:
    """The ids a REJECTED event needs, when the payload has them with the right types."""
    if not isinstance(payload, dict):
        return None
    ids: dict[str, Any] = {}
    for name in ("study_id", "trial_id", "number"):
        value = payload.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        ids[name] = value
    jid = payload.get("job_id")
    ids["job_id"] = jid if isinstance(jid, str) and jid else job_id
    if not ids["job_id"]:
        return None
    attempt = payload.get("attempt")
    ids["attempt"] = attempt if isinstance(attempt, int) and attempt >= 1 else 1
    return ids


async def _reject(
    rt: WorkerRuntime, payload: Any, job_id: str | None, reason: str
) -> dict[str, Any]:
    label = job_id or (payload.get("job_id") if isinstance(payload, dict) else None) or "?"
    log.error("rejected job %s: %s", label, reason)
    ids = _readable_ids(payload, job_id)
    if ids is not None:
        event = TrialEvent(
            kind=TrialEventKind.REJECTED, worker_id=rt.worker_id, reason=reason, **ids
        )
        await _send(rt, event)
    return {"outcome": "rejected", "reason": reason}


def validate_job(rt: WorkerRuntime, payload: Any) -> TrialJob | str:
    """The ``TrialJob`` in ``payload``, or why it is refused (a wrong type, a missing or extra
    field, or a job placed on another worker)."""
    if not isinstance(payload, dict):
        return f"payload: expected a JSON object, got {type(payload).__name__}"
    try:
        job = TrialJob.model_validate(payload)
    except ValidationError as e:
        return describe_errors(e)
    if job.worker_id != rt.worker_id:
        return f"worker_id: the job is for worker {job.worker_id!r}, this is {rt.worker_id!r}"
    return job


async def run_trial_job(ctx: dict[str, Any], payload: Any) -> dict[str, Any]:
    """ARQ job: validate ``payload`` as a ``TrialJob``, run it with ``run_trial``, report events.

    ``ctx[CTX_KEY]`` is the worker's ``WorkerRuntime``. An invalid payload (not an object, a
    wrong type, a missing or extra field) is logged at ERROR as ``rejected job …: <errors>``,
    answered with a REJECTED event when its ids are readable, and never run. Otherwise the
    events stream gets PHASE events, STARTED (with the engine pid) per launch, and exactly one
    of: RESULT (any outcome; FAIL ``cancelled`` when the job was aborted; FAIL
    ``startup_timeout``/``benchmark_failed`` naming ``job.timeout_s`` when it ran out of time)
    or HANDED_BACK (the worker got SIGTERM). The engine is stopped before the event is sent.
    Returns a small JSON-able summary (ARQ keeps it as the job result); re-raises the
    ``CancelledError`` of an abort (ARQ records the job as aborted).
    """
    rt: WorkerRuntime = ctx[CTX_KEY]
    job_id = ctx.get("job_id")
    checked = validate_job(rt, payload)
    if isinstance(checked, str):
        return await _reject(rt, payload, job_id if isinstance(job_id, str) else None, checked)
    job = checked
    running = RunningJob(job=job, started_at=utc_now(), task=asyncio.current_task())
    outbox = _Outbox(rt)
    if rt.draining:
        outbox.put(_event(rt, job, TrialEventKind.HANDED_BACK, reason="the worker is stopping"))
        await outbox.close()
        return {"outcome": "handed_back", "trial_id": job.trial_id}
    rt.running[job.job_id] = running
    rt.publish_trials()
    context = log_context(
        study_id=job.study_id,
        trial_id=job.trial_id,
        trial_number=job.number,
        source=LogSource.TRIAL,
    )
    tailers: list[EngineLogTailer] = []
    try:
        with context:
            log.info(
                "study %s trial %d (job %s, attempt %d): starting",
                job.study_name,
                job.number,
                job.job_id,
                job.attempt,
            )
            try:
                result = await _run_with_timeout(rt, job, running, outbox, tailers)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                await _stop_engines(running)
                if running.handing_back or rt.draining:
                    reason = (
                        f"worker {rt.worker_id} stopped ({rt.stopped_by}) while the trial was "
                        f"{running.phase}; its engine was stopped"
                    )
                    log.warning(
                        "study %s trial %d handed back: %s", job.study_name, job.number, reason
                    )
                    outbox.put(_event(rt, job, TrialEventKind.HANDED_BACK, reason=reason))
                    return {"outcome": "handed_back", "trial_id": job.trial_id}
                reason = f"cancelled: the job was aborted while the trial was {running.phase}"
                log.warning("study %s trial %d %s", job.study_name, job.number, reason)
                result = _failure(running, FailureKind.CANCELLED, reason)
                outbox.put(_event(rt, job, TrialEventKind.RESULT, result=result))
                raise
            except Exception as e:  # a bug or an unreadable spec: still one RESULT, never silence
                log.exception("study %s trial %d: the worker failed", job.study_name, job.number)
                await _stop_engines(running)
                result = _failure(running, FailureKind.UNKNOWN, f"the worker failed: {e!r}")
            log.info(
                "study %s trial %d: %s%s",
                job.study_name,
                job.number,
                result.state.value,
                f" {result.failure_kind.value}: {result.failure_reason}"
                if result.failure_kind
                else "",
            )
            outbox.put(_event(rt, job, TrialEventKind.RESULT, result=result))
            return {"outcome": "result", "trial_id": job.trial_id, "state": result.state.value}
    finally:
        for tailer in tailers:
            with contextlib.suppress(Exception):
                await asyncio.shield(tailer.stop())
        rt.running.pop(job.job_id, None)
        rt.publish_trials()
        rt.record_engines()
        await outbox.close()


def _failure(running: RunningJob, kind: FailureKind, reason: str) -> TrialResult:
    return TrialResult(
        state=TrialState.FAIL,
        failure_kind=kind,
        failure_reason=reason,
        started_at=running.started_at,
        finished_at=utc_now(),
    )


async def _stop_engines(running: RunningJob) -> None:
    """Stop every engine the job launched that still runs (idempotent)."""
    for engine in running.engines:
        try:
            await asyncio.shield(engine.stop())
        except (ServetuneError, OSError) as e:
            log.error("could not stop engine pid %s: %s", engine.pid, e)


async def _run_with_timeout(
    rt: WorkerRuntime,
    job: TrialJob,
    running: RunningJob,
    outbox: _Outbox,
    tailers: list[EngineLogTailer],
) -> TrialResult:
    ctx = await _trial_context(rt, job, running, outbox, tailers)
    try:
        async with asyncio.timeout(job.timeout_s):
            return await run_trial(ctx, job.params, job.number)
    except TimeoutError:
        await _stop_engines(running)
        phase = running.phase
        kind = (
            FailureKind.STARTUP_TIMEOUT
            if phase in ("queued", "starting")
            else FailureKind.BENCHMARK_FAILED
        )
        reason = (
            f"the trial's timeout of {job.timeout_s:g} s (TrialJob.timeout_s) passed while it was "
            f"{phase}; raise deployment.startup_timeout_s or shorten the workload"
        )
        log.warning("study %s trial %d: %s", job.study_name, job.number, reason)
        return _failure(running, kind, reason)


async def _trial_context(
    rt: WorkerRuntime,
    job: TrialJob,
    running: RunningJob,
    outbox: _Outbox,
    tailers: list[EngineLogTailer],
) -> TrialContext:
    spec = job.spec
    engine = get_engine(spec.engine)
    deployment = await asyncio.to_thread(worker_deployment, spec, engine, job.study_name)
    log_dir = rt.settings.study_logs_dir(job.study_name)
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)

    def on_started(engine_handle: RunningEngine) -> None:
        running.engines.append(engine_handle)
        rt.record_engines()
        outbox.put(_event(rt, job, TrialEventKind.STARTED, pid=engine_handle.pid))
        tailers.append(_tail(job, engine_handle.log_path))

    def on_phase(name: str) -> None:
        if name != "stopping":
            running.phase = name
        outbox.put(_event(rt, job, TrialEventKind.PHASE, phase=name))

    return TrialContext(
        spec=spec,
        engine=engine,
        deployment=deployment,
        client=BuiltinClient.for_spec(spec),
        log_dir=log_dir,
        label=job.study_name,
        on_started=on_started,
        on_phase=on_phase,
        study_id=job.study_id,
        trial_id=job.trial_id,
    )


def _tail(job: TrialJob, path: Path) -> EngineLogTailer:
    """Start shipping the engine's log lines (source ENGINE, this trial's context)."""
    with log_context(
        study_id=job.study_id,
        trial_id=job.trial_id,
        trial_number=job.number,
        source=LogSource.ENGINE,
    ):
        tailer = EngineLogTailer(path, engine_log)
        tailer.start()
    return tailer


def worker_deployment(spec: StudySpec, engine: Engine, study: str) -> Deployment:
    """The Deployment a worker uses for ``spec``: local engines die with the worker
    (``die_with_parent``); Docker and Kubernetes ones are built without removing "leftovers",
    which on a worker may be another trial of the same study running right now. Raises
    DeploymentError when the deployment cannot be built."""
    d = spec.deployment
    if isinstance(d, LocalDeploymentSpec):
        return LocalDeployment(host=d.host, stop_timeout_s=d.stop_timeout_s, die_with_parent=True)
    return build_deployment(spec, engine, study)
