"""The manager's Runner: places each trial on a worker through its ARQ queue and awaits the result.

``place`` is the pure placement rule; ``RemoteRunner`` enqueues, watches the worker and re-places.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Awaitable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from arq.connections import ArqRedis

from servetune.cluster import keys
from servetune.cluster.models import TrialEvent, TrialJob
from servetune.cluster.queue import abort_trial, enqueue_trial, forget_job, job_state
from servetune.cluster.redis import redis_errors
from servetune.cluster.registry import Registry, WorkerStatus
from servetune.cluster.tasks import raise_if_cancelled
from servetune.core.spec import StudySpec, Workload
from servetune.core.study import FailureKind, Params, Trial, TrialNeeds, TrialResult, TrialState
from servetune.engines import get_engine
from servetune.errors import ServetuneError
from servetune.runner import TrialContext
from servetune.settings import Settings
from servetune.store.repo import StudyStore

log = logging.getLogger(__name__)

ABORT_WAIT_S = 10.0
"""How long a cancelled trial waits for its worker's cancelled RESULT, s."""
TIMEOUT_MARGIN_S = 60.0
"""Slack added to a job's worst-case duration (queueing on the worker, log flushing), s."""
RUNS_PER_TRIAL = 3
"""``run_trial`` runs a trial at most three times: a retry, then an outside-load re-run."""
VANISHED_CHECKS = 2
"""Consecutive checks (one per heartbeat) a job must be missing before its worker counts as lost."""


def worst_case_benchmark_s(workload: Workload) -> float:
    """The longest one benchmark of ``workload`` may take, s: the sum over its load levels of

    ``ceil(warmup_requests / c) × request_timeout_s`` (warm-up waves) + the measured part +
    ``request_timeout_s`` (the last requests draining), where the measured part is
    ``duration_s`` when set, else ``ceil(num_requests / c) × request_timeout_s`` at concurrency
    ``c``, or ``num_requests / rate`` (arrivals) at a Poisson rate (``c`` = 1 for warm-up then).
    """
    timeout_s = workload.request_timeout_s
    total_s = 0.0
    for level in workload.levels():
        c = level.concurrency or 1
        warmup_s = math.ceil(workload.warmup_requests / c) * timeout_s
        if workload.duration_s is not None:
            measured_s = workload.duration_s
        elif level.concurrency is not None:
            measured_s = math.ceil((workload.num_requests or 0) / c) * timeout_s
        else:
            rate = level.request_rate_per_s or 1.0
            measured_s = (workload.num_requests or 0) / rate
        total_s += warmup_s + measured_s + timeout_s
    return total_s


def job_timeout_s(spec: StudySpec) -> float:
    """The worker gives up on a trial job after this many seconds.

    ``RUNS_PER_TRIAL × (deployment.startup_timeout_s + worst_case_benchmark_s(workload) +
    deployment.stop_timeout_s) + TIMEOUT_MARGIN_S``: ``run_trial`` may run the candidate up to
    three times (an infrastructure retry and an outside-load re-run), each launching, benchmarking
    and stopping an engine at its limits.
    """
    d = spec.deployment
    one_run_s = d.startup_timeout_s + worst_case_benchmark_s(spec.workload) + d.stop_timeout_s
    return RUNS_PER_TRIAL * one_run_s + TIMEOUT_MARGIN_S


def describe_needs(needs: TrialNeeds, engine: str, deployment: str) -> str:
    """``2 CPU threads and 1 GPU free (engine vllm, deployment local)`` for log lines."""
    gpus = f" and {needs.gpus} GPU{'s' if needs.gpus != 1 else ''}" if needs.gpus else ""
    threads = f"{needs.cpu_threads} CPU thread{'s' if needs.cpu_threads != 1 else ''}"
    return f"{threads}{gpus} free (engine {engine}, deployment {deployment})"


def place(
    needs: TrialNeeds,
    workers: Sequence[WorkerStatus],
    placed: Mapping[str, Sequence[TrialNeeds]],
    *,
    engine: str | None = None,
    deployment: str | None = None,
    avoid: Collection[str] = (),
) -> str | None:
    """The id of the worker to run a trial needing ``needs`` on, or None when none has room now.

    A worker qualifies when it is online or busy (not offline, not draining), lists ``engine``
    and ``deployment`` (when given) in its ``WorkerInfo``, and, after what ``placed`` says the
    manager already runs there, still has a free slot (``max_parallel``), the GPUs
    (``len(info.gpus)``) and the CPU threads (``cpu_count``). A trial needing more threads than a
    worker has runs there only alone. Among those: workers not in ``avoid`` first (a re-placed
    trial goes elsewhere when it can), then the one running fewest trials, then the most free
    threads, then the smallest id (deterministic).
    """
    fits: list[tuple[bool, int, int, str]] = []
    for status in workers:
        info = status.info
        if status.state == "offline":
            continue
        if status.last_heartbeat is not None and status.last_heartbeat.draining:
            continue
        if engine is not None and engine not in info.engines:
            continue
        if deployment is not None and deployment not in info.deployments:
            continue
        there = placed.get(info.id, ())
        if len(there) >= info.max_parallel:
            continue
        free_gpus = len(info.gpus) - sum(n.gpus for n in there)
        if needs.gpus > free_gpus:
            continue
        free_threads = info.cpu_count - sum(n.cpu_threads for n in there)
        if needs.cpu_threads > free_threads and (there or needs.cpu_threads <= info.cpu_count):
            continue
        fits.append((info.id in avoid, len(there), -free_threads, info.id))
    return min(fits)[3] if fits else None


@dataclass(frozen=True)
class _Signal:
    """What the Ingestor tells a waiting trial: its result is stored, or it was handed back."""

    kind: Literal["result", "handed_back"]
    job_id: str
    result: TrialResult | None = None
    reason: str = ""


@dataclass
class _Flight:
    """One trial this runner is waiting for: its current job and the worker's signals."""

    study_id: int
    study_name: str
    trial_id: int
    number: int
    params: Params
    spec: StudySpec
    needs: TrialNeeds
    attempt: int = 1
    placements: int = 0
    job: TrialJob | None = None
    job_ids: set[str] = field(default_factory=set)
    """Every job id this runner placed (or adopted) for the trial: their events are its own."""
    signals: asyncio.Queue[_Signal] = field(default_factory=asyncio.Queue)
    incarnation: _Incarnation | None = None


_Incarnation = tuple[int, datetime]
"""One run of a worker process: its ``(pid, started_at)`` from ``WorkerInfo``."""


class _Resolved(Exception):
    """Internal: a result of an earlier placement arrived while the trial waited for a worker."""

    def __init__(self, result: TrialResult) -> None:
        self.result = result
        super().__init__("resolved while waiting for a worker")


@dataclass
class _Seen:
    """What the liveness checks of one job saw: misses in a row, the last heartbeat's time."""

    missing: int = 0
    last_beat: datetime | None = None


class WorkerLost(Exception):
    """Internal: the worker of the current job is gone; ``reason`` says how it was noticed."""

    def __init__(self, worker_id: str, reason: str) -> None:
        self.worker_id = worker_id
        self.reason = reason
        super().__init__(reason)


class RemoteRunner:
    """A ``Runner`` (``await runner(ctx, params, number) -> TrialResult``) that runs trials on workers.

    ``store`` records which worker runs a trial; ``pool`` is an ``ArqRedis`` with the JSON
    serializer; ``registry`` says which workers are online and what they have. Each call places
    the trial (``place``, waiting while no worker fits), enqueues a ``TrialJob``
    (``job_id = trial-<trial_id>-<attempt>[.<n>]-<8 random hex>``: a hand-back adds ``.<n>``,
    and the random tail makes every placement's id new, never one a deleted study's trial with
    the same database id used before, see ``new_job_id``; ``timeout_s`` =
    ``job_timeout_s(spec)``), and awaits the RESULT the ``Ingestor`` hands to ``resolve``.
    Every ``settings.heartbeat_s`` it checks the worker: offline in the registry (three missed
    heartbeats) or the job missing from its queue and its heartbeat for ``VANISHED_CHECKS``
    checks → the trial is placed once more (attempt 2, on another worker when one fits), and
    after a second loss it ends FAIL ``worker_lost`` with the reasons (``synthesized=True``: a
    result a worker measured later replaces it, see ``Ingestor``). A RESULT of any placement
    of the trial resolves it (the first one stored wins) and the job still running for it is
    aborted. A HANDED_BACK trial is placed again at once, on another worker when one fits, and
    never counts as an attempt; the worker that handed it back (it is stopping) gets no trial
    until it registers again as a new process (another ``pid`` or ``started_at``). Cancelled: the job is aborted, the worker's
    cancelled RESULT awaited for up to ``ABORT_WAIT_S``, and CancelledError re-raised. While
    Redis is unreachable (RedisUnavailable) the trial keeps waiting and the call is retried at
    the next heartbeat: an outage never fails a trial by itself.
    ``ctx.study_id`` and ``ctx.trial_id`` must be set (the loop sets them; ValueError if not).
    """

    def __init__(
        self, store: StudyStore, pool: ArqRedis, registry: Registry, settings: Settings
    ) -> None:
        self.store = store
        self.pool = pool
        self.registry = registry
        self.settings = settings
        self._flights: dict[int, _Flight] = {}
        self._placed: dict[str, dict[int, TrialNeeds]] = {}
        self._detached: set[int] = set()
        self._room = asyncio.Event()
        self._incarnations: dict[str, _Incarnation] = {}
        self._stopping: dict[str, _Incarnation] = {}

    # ---- the Runner ----------------------------------------------------------------------
    async def __call__(self, ctx: TrialContext, params: Params, number: int) -> TrialResult:
        """Run trial ``number`` (``ctx.trial_id``) with ``params`` on a worker; its result."""
        if ctx.study_id is None or ctx.trial_id is None:
            raise ValueError(
                "RemoteRunner needs ctx.study_id and ctx.trial_id (the study loop sets them)"
            )
        flight = _Flight(
            study_id=ctx.study_id,
            study_name=ctx.label,
            trial_id=ctx.trial_id,
            number=number,
            params=params,
            spec=ctx.spec,
            needs=ctx.engine.needs(params, ctx.spec.workload),
        )
        return await self._fly(flight)

    def running(self) -> dict[int, str | None]:
        """Trial id → worker id (None while waiting for a worker) of every trial in flight."""
        return {tid: f.job.worker_id if f.job else None for tid, f in self._flights.items()}

    def detach(self, study_id: int) -> None:
        """Make a cancellation of ``study_id``'s trials leave their jobs running (manager stop)."""
        self._detached.add(study_id)

    # ---- adopting trials a previous manager placed -----------------------------------------
    async def adopt(self, running_trials: list[Trial]) -> dict[int, Awaitable[TrialResult]]:
        """Trial id → awaitable result for each of ``running_trials`` still alive on a worker.

        A trial is alive when a live heartbeat lists it, or its job (``trial-<id>-<attempt>``,
        attempts 1-2 and their hand-backs) is queued or in progress on a worker's queue; it is
        then watched like a fresh placement (lost worker → attempt 2, …). Others are left out
        (the loop marks them FAIL interrupted).
        """
        adopted: dict[int, Awaitable[TrialResult]] = {}
        if not running_trials:
            return adopted
        workers = await self.registry.workers()
        self._remember(workers)
        for trial in running_trials:
            if trial.id is None or trial.study_id is None or trial.state is not TrialState.RUNNING:
                continue
            found = await self._find_job(trial.id, workers)
            if found is None:
                log.info("trial id %d is not running on any worker; not adopted", trial.id)
                continue
            job_id, worker_id = found
            study = await asyncio.to_thread(self.store.get_study, trial.study_id)
            spec = study.spec
            needs = get_engine(spec.engine).needs(trial.params, spec.workload)
            attempt = _attempt_of(job_id)
            flight = _Flight(
                study_id=trial.study_id,
                study_name=study.name,
                trial_id=trial.id,
                number=trial.number,
                params=trial.params,
                spec=spec,
                needs=needs,
                attempt=attempt,
                placements=1,
                incarnation=self._incarnations.get(worker_id),
                job_ids={job_id},
            )
            flight.job = TrialJob(
                job_id=job_id,
                study_id=trial.study_id,
                study_name=study.name,
                trial_id=trial.id,
                number=trial.number,
                attempt=attempt,
                params=trial.params,
                spec=spec,
                needs=needs,
                timeout_s=job_timeout_s(spec),
                worker_id=worker_id,
            )
            log.info(
                "study %s trial %d: adopted (job %s on worker %s)",
                study.name,
                trial.number,
                job_id,
                worker_id,
            )
            self._placed.setdefault(worker_id, {})[trial.id] = needs  # it occupies the worker
            adopted[trial.id] = asyncio.ensure_future(self._fly(flight))
        return adopted

    async def _find_job(self, trial_id: int, workers: list[WorkerStatus]) -> tuple[str, str] | None:
        for w in workers:
            if w.state != "offline" and w.last_heartbeat is not None:
                for r in w.last_heartbeat.running:
                    if r.trial_id == trial_id:
                        return r.job_id, w.info.id
        prefix = f"trial-{trial_id}-"
        started_key = keys.arq_in_progress("")
        for w in workers:
            if w.state == "offline":
                continue
            with redis_errors(self.pool, f"listing the jobs of trial id {trial_id}"):
                queued = await self.pool.zrange(keys.queue(w.info.id), 0, -1)
                started = [k async for k in self.pool.scan_iter(match=f"{started_key}{prefix}*")]
            candidates = [_text(m) for m in queued] + [
                _text(k).removeprefix(started_key) for k in started
            ]
            for job_id in candidates:
                if not job_id.startswith(prefix):
                    continue
                if await job_state(self.pool, job_id, w.info.id) in ("queued", "in_progress"):
                    return job_id, w.info.id
        return None

    # ---- what the Ingestor reports ---------------------------------------------------------
    def owns(self, event: TrialEvent) -> bool | None:
        """Whether ``event`` belongs to a trial in flight here: True when its study and job id
        are ones this runner placed for the trial (any attempt), False when the trial is in
        flight but the event is not of it (another study's job that reused the id), None
        when the trial is not in flight here (the caller checks the database then)."""
        flight = self._flights.get(event.trial_id)
        if flight is None:
            return None
        return event.study_id == flight.study_id and event.job_id in flight.job_ids

    def resolve(self, event: TrialEvent, result: TrialResult) -> bool:
        """The trial's result is stored: wake its caller. True when a call was waiting for it."""
        flight = self._flights.get(event.trial_id)
        if flight is None or not self.owns(event):
            return False
        flight.signals.put_nowait(_Signal("result", event.job_id, result=result))
        return True

    def handed_back(self, event: TrialEvent) -> bool:
        """The worker gave the trial back (SIGTERM): place it again. True when it was waited for."""
        flight = self._flights.get(event.trial_id)
        if flight is None or flight.job is None or flight.job.job_id != event.job_id:
            return False
        if event.study_id != flight.study_id:
            return False
        reason = event.reason or "the worker is stopping"
        flight.signals.put_nowait(_Signal("handed_back", event.job_id, reason=reason))
        return True

    # ---- internals -------------------------------------------------------------------------
    async def _fly(self, flight: _Flight) -> TrialResult:
        self._flights[flight.trial_id] = flight
        losses: list[WorkerLost] = []
        try:
            while True:
                try:
                    if flight.job is None:
                        await self._enqueue(flight, avoid={lost.worker_id for lost in losses})
                    return await self._watch(flight)
                except _Resolved as done:
                    return done.result
                except WorkerLost as e:
                    losses.append(e)
                    self._unplace(flight)
                    await self._forget(flight.job)
                    if flight.attempt >= 2:
                        return TrialResult(
                            state=TrialState.FAIL,
                            failure_kind=FailureKind.WORKER_LOST,
                            failure_reason="; then ".join(lost.reason for lost in losses),
                            synthesized=True,
                        )
                    log.warning(
                        "study %s trial %d: %s; placing it again (attempt 2)",
                        flight.study_name,
                        flight.number,
                        e,
                    )
                    flight.attempt = 2
                    flight.placements = 0
                    flight.job = None
        except asyncio.CancelledError:
            await self._abort(flight)
            raise
        finally:
            self._unplace(flight)
            self._flights.pop(flight.trial_id, None)

    async def _enqueue(self, flight: _Flight, avoid: Collection[str]) -> None:
        spec = flight.spec
        worker_id = await self._place(flight, avoid)
        flight.placements += 1
        suffix = f".{flight.placements - 1}" if flight.placements > 1 else ""
        job = TrialJob(
            job_id=new_job_id(flight.trial_id, flight.attempt, suffix),
            study_id=flight.study_id,
            study_name=flight.study_name,
            trial_id=flight.trial_id,
            number=flight.number,
            attempt=flight.attempt,
            params=flight.params,
            spec=spec,
            needs=flight.needs,
            timeout_s=job_timeout_s(spec),
            worker_id=worker_id,
        )
        flight.job = job
        flight.job_ids.add(job.job_id)
        while True:
            try:
                await enqueue_trial(self.pool, job)
                break
            except ServetuneError as e:  # Redis unreachable: the trial waits, it is not lost
                log.warning("enqueuing job %s failed (retrying): %s", job.job_id, e)
                await asyncio.sleep(self.settings.heartbeat_s)
        raise_if_cancelled()
        try:
            await asyncio.to_thread(self.store.set_trial_worker, flight.trial_id, worker_id)
        except ServetuneError as e:  # display only: the job is placed either way
            log.warning("trial id %d: could not record its worker: %s", flight.trial_id, e)
        log.info(
            "study %s trial %d: placed on worker %s (job %s, timeout %.0f s)",
            flight.study_name,
            flight.number,
            worker_id,
            job.job_id,
            job.timeout_s,
        )

    async def _place(self, flight: _Flight, avoid: Collection[str]) -> str:
        spec = flight.spec
        engine, deployment = spec.engine.kind, spec.deployment.kind
        waiting = False
        while True:
            self._room.clear()
            try:
                workers = await self.registry.workers()
            except ServetuneError as e:  # Redis unreachable: no worker known for now
                log.warning("listing workers failed (retrying): %s", e)
                workers = []
            raise_if_cancelled()
            self._remember(workers)
            workers = [w for w in workers if not self._is_stopping(w)]
            early = _queued_result(flight)
            if early is not None:
                raise _Resolved(early)
            placed = {w: list(n.values()) for w, n in self._placed.items()}
            worker_id = place(
                flight.needs,
                workers,
                placed,
                engine=engine,
                deployment=deployment,
                avoid=avoid,
            )
            if worker_id is not None:
                self._placed.setdefault(worker_id, {})[flight.trial_id] = flight.needs
                flight.incarnation = self._incarnations.get(worker_id)
                return worker_id
            if not waiting:
                log.info(
                    "study %s trial %d: waiting for a worker with %s; %d worker(s) known",
                    flight.study_name,
                    flight.number,
                    describe_needs(flight.needs, engine, deployment),
                    len(workers),
                )
                waiting = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout=self._poll_s())

    def _remember(self, workers: Sequence[WorkerStatus]) -> None:
        """Note which process each listed worker runs as now (for ``_is_stopping``)."""
        for w in workers:
            self._incarnations[w.info.id] = (w.info.pid, w.info.started_at)

    def _is_stopping(self, status: WorkerStatus) -> bool:
        """True while ``status`` is the same process that handed a trial back (it is stopping);
        a worker that registered again since (a new process) is forgiven."""
        wid = status.info.id
        stopping = self._stopping.get(wid)
        if stopping is None:
            return False
        if stopping == (status.info.pid, status.info.started_at):
            return True
        del self._stopping[wid]
        log.info("worker %s registered again; it takes trials again", wid)
        return False

    def _poll_s(self) -> float:
        return min(self.settings.heartbeat_s, 1.0)

    def _unplace(self, flight: _Flight) -> None:
        for there in self._placed.values():
            if there.pop(flight.trial_id, None) is not None:
                self._room.set()

    async def _watch(self, flight: _Flight) -> TrialResult:
        """Wait for the current job's result; raise WorkerLost when its worker is gone."""
        seen = _Seen()
        while True:
            job = flight.job
            assert job is not None
            try:
                signal = await asyncio.wait_for(
                    flight.signals.get(), timeout=self.settings.heartbeat_s
                )
            except TimeoutError:
                stored = await self._stored_result(flight)
                if stored is not None:  # ingested by another manager process
                    return stored
                try:
                    await self._check_worker(job, seen)
                except WorkerLost:
                    raise
                except ServetuneError as e:  # Redis unreachable: nothing known, ask again
                    log.warning("checking worker %s failed (retrying): %s", job.worker_id, e)
                raise_if_cancelled()
                continue
            if signal.result is not None:
                if signal.job_id != job.job_id:  # an earlier placement finished after all
                    log.warning(
                        "study %s trial %d: job %s delivered its result after it was placed "
                        "again; keeping that result and aborting job %s on worker %s",
                        flight.study_name,
                        flight.number,
                        signal.job_id,
                        job.job_id,
                        job.worker_id,
                    )
                    await self._abort_job(job)
                return signal.result
            if signal.kind == "handed_back":
                log.warning(
                    "study %s trial %d: worker %s handed it back (%s); placing it again, "
                    "not on that worker until it registers again",
                    flight.study_name,
                    flight.number,
                    job.worker_id,
                    signal.reason,
                )
                if flight.incarnation is not None:
                    self._stopping[job.worker_id] = flight.incarnation
                self._unplace(flight)
                await self._enqueue(flight, avoid={job.worker_id})
                seen = _Seen()

    async def _check_worker(self, job: TrialJob, seen: _Seen) -> None:
        """One liveness check of the current job's worker; raises WorkerLost when it is gone.

        Offline in the registry → lost at once; not registered at all (a restarted Redis lost
        it until its next heartbeat) → a miss. Otherwise a job that is neither queued nor listed
        in a heartbeat sent since the previous check is missing from that heartbeat; missing
        from ``VANISHED_CHECKS`` heartbeats in a row → lost (ARQ keeps a killed worker's job
        ``in_progress`` for days, so only the heartbeat tells that it still runs).
        """
        status = await self.registry.worker(job.worker_id)
        if status is None:  # Redis lost its data (restarted): the worker re-registers
            self._miss(job, seen, "not registered")
            return
        if status.state == "offline":
            raise WorkerLost(
                job.worker_id,
                f"worker {job.worker_id} went offline (no heartbeat for 3 × "
                f"{self.settings.heartbeat_s:g} s) while running job {job.job_id}",
            )
        beat = status.last_heartbeat
        if beat is not None and any(r.job_id == job.job_id for r in beat.running):
            seen.missing = 0
            return
        state = await job_state(self.pool, job.job_id, job.worker_id)
        if state == "queued":
            seen.missing = 0
            return
        fresh = beat is not None and beat.sent_at != seen.last_beat
        seen.last_beat = beat.sent_at if beat is not None else None
        if state == "in_progress" and not fresh:
            return  # no new heartbeat to tell yet
        self._miss(job, seen, f"job {state}")

    @staticmethod
    def _miss(job: TrialJob, seen: _Seen, what: str) -> None:
        """Count one check that did not find the job; WorkerLost after VANISHED_CHECKS."""
        seen.missing += 1
        if seen.missing >= VANISHED_CHECKS:
            raise WorkerLost(
                job.worker_id,
                f"job {job.job_id} vanished from worker {job.worker_id} ({what}, missing "
                f"from its heartbeat {seen.missing} times in a row)",
            )

    async def _stored_result(self, flight: _Flight) -> TrialResult | None:
        try:
            trials = await asyncio.to_thread(self.store.trials, flight.study_id)
        except ServetuneError as e:
            log.warning("study %s: reading its trials failed: %s", flight.study_name, e)
            return None
        for t in trials:
            if t.id == flight.trial_id and t.state.is_finished() and t.result is not None:
                return t.result
        return None

    async def _abort(self, flight: _Flight) -> None:
        """Abort the current job and wait up to ABORT_WAIT_S for the worker's RESULT."""
        job = flight.job
        if job is None or flight.study_id in self._detached:
            return
        try:
            async with asyncio.timeout(ABORT_WAIT_S):
                await self._abort_job(job)
                while True:
                    if (await flight.signals.get()).result is not None:
                        return
        except TimeoutError:
            log.warning(
                "study %s trial %d: worker %s sent no result within %.0f s of the abort",
                flight.study_name,
                flight.number,
                job.worker_id,
                ABORT_WAIT_S,
            )

    async def _forget(self, job: TrialJob | None) -> None:
        """Remove a lost job from its worker's queue (ARQ would keep it in progress for days)."""
        if job is None:
            return
        try:
            await forget_job(self.pool, job.job_id, job.worker_id)
        except ServetuneError as e:
            log.warning("forgetting job %s of worker %s failed: %s", job.job_id, job.worker_id, e)

    async def _abort_job(self, job: TrialJob) -> None:
        try:
            await abort_trial(self.pool, job, job.worker_id, timeout_s=0.1)
        except TimeoutError:
            pass  # the worker's RESULT says how it ended
        except ServetuneError as e:
            log.warning("aborting job %s on worker %s failed: %s", job.job_id, job.worker_id, e)


def _queued_result(flight: _Flight) -> TrialResult | None:
    """The first result signalled to ``flight`` while it had no job (others are dropped)."""
    while not flight.signals.empty():
        signal = flight.signals.get_nowait()
        if signal.result is not None:
            return signal.result
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def new_job_id(trial_id: int, attempt: int, suffix: str = "") -> str:
    """A job id never used before: ``trial-<trial_id>-<attempt><suffix>-<8 random hex>``.

    ``suffix`` is ``.<n>`` for the n-th hand-back of an attempt, else empty. The random tail
    (32 bits) keeps a new study whose database ids repeat a deleted one's (SQLite reuses them)
    from meeting that study's ARQ job and result keys still in Redis.
    """
    return f"trial-{trial_id}-{attempt}{suffix}-{secrets.token_hex(4)}"


def _attempt_of(job_id: str) -> int:
    """The attempt number in ``trial-<id>-<attempt>[.<n>][-<hex>]`` (1 when unreadable)."""
    try:
        return max(1, int(job_id.split("-")[2].split(".")[0]))
    except (IndexError, ValueError):
        return 1
