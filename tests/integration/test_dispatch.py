"""The manager's dispatch over a private Redis: StudySupervisor, RemoteRunner and Ingestor.

Workers here are scripted in the test with the cluster APIs (a real ARQ Worker on the worker's
queue, real heartbeats in the Registry, real events on the stream); one runs ``run_trial`` on
the tiny llama.cpp model as a worker does, the others answer as a test needs (hang, hand back).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.worker import func

from servetune.bench.builtin import BuiltinClient
from servetune.cluster import keys
from servetune.cluster.events import EventReader, send_event
from servetune.cluster.models import (
    Heartbeat,
    RunningTrial,
    TrialEvent,
    TrialEventKind,
    TrialJob,
    WorkerInfo,
    utc_now,
)
from servetune.cluster.queue import JOB_FUNCTION, arq_pool, close_worker, worker_settings
from servetune.cluster.redis import connect
from servetune.cluster.registry import Registry
from servetune.cluster.tasks import cancel_and_wait
from servetune.core.spec import StudySpec
from servetune.core.study import FailureKind, TrialResult, TrialRole, TrialState
from servetune.deploy.local import LocalDeployment
from servetune.engines import get_engine
from servetune.errors import StudyBusy
from servetune.manager.dispatch import RemoteRunner
from servetune.manager.ingest import Ingestor
from servetune.manager.supervisor import StudySupervisor
from servetune.runner import TrialContext, run_trial
from servetune.settings import Settings
from servetune.store.repo import LeaseOwner, StudyStore
from servetune.study_session import build_deployment
from tests.integration.study_helpers import small_spec
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

HEARTBEAT_S = 0.3

Behaviour = Callable[["ScriptedWorker", TrialJob], Awaitable[TrialResult | None]]
"""What a scripted worker does with a job: the result to send (None: send nothing)."""


def failed(reason: str = "scripted") -> TrialResult:
    """A quick finished trial that counts for the budget (the scripted workers' default)."""
    return TrialResult(
        state=TrialState.FAIL, failure_kind=FailureKind.BENCHMARK_FAILED, failure_reason=reason
    )


async def answer(worker: ScriptedWorker, job: TrialJob) -> TrialResult | None:
    await asyncio.sleep(0.05)
    return failed(f"ran on {worker.worker_id}")


async def hang(worker: ScriptedWorker, job: TrialJob) -> TrialResult | None:
    await asyncio.Event().wait()
    return None


async def real_trial(worker: ScriptedWorker, job: TrialJob) -> TrialResult | None:
    """What a worker does: ``run_trial`` with the job's spec on a local deployment."""
    spec = job.spec
    engine = get_engine(spec.engine)
    log_dir = worker.data_dir / "logs" / job.study_name
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = TrialContext(
        spec=spec,
        engine=engine,
        deployment=LocalDeployment(host="127.0.0.1", stop_timeout_s=5),
        client=BuiltinClient.for_spec(spec),
        log_dir=log_dir,
        label=job.study_name,
        study_id=job.study_id,
        trial_id=job.trial_id,
    )
    return await run_trial(ctx, job.params, job.number)


class ScriptedWorker:
    """A worker written with the cluster APIs: registers, heartbeats with its running jobs,
    pops jobs from its queue with a real ARQ Worker and reports STARTED, then RESULT (or
    cancelled when ARQ aborts the job)."""

    def __init__(
        self, url: str, settings: Settings, worker_id: str, behave: Behaviour, data_dir: Path
    ) -> None:
        self.url = url
        self.settings = settings
        self.worker_id = worker_id
        self.behave = behave
        self.data_dir = data_dir
        self.jobs: list[TrialJob] = []
        self.aborted: list[str] = []
        self.running: dict[str, RunningTrial] = {}
        self.beating = True
        self.info = WorkerInfo(
            id=worker_id,
            hostname=f"host-{worker_id}",
            pid=os.getpid(),
            version="test",
            engines=["llamacpp"],
            deployments=["local"],
            cpu_count=4,
            memory_total_gib=8.0,
            max_parallel=1,
            started_at=utc_now(),
        )

    async def __aenter__(self) -> ScriptedWorker:
        self.r = await connect(self.url)
        self.registry = Registry(self.r, self.settings)
        await self.registry.register(self.info)
        await self.beat()
        self.pool = await arq_pool(self.url)
        fn = func(self._job, name=JOB_FUNCTION)  # type: ignore[arg-type]
        self.arq = worker_settings(self.pool, self.worker_id, [fn], max_jobs=1)
        self.tasks = [asyncio.create_task(self._beats()), asyncio.create_task(self.arq.async_run())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_and_wait(self.tasks, 30, grace_s=1)
        await close_worker(self.arq)
        await self.r.aclose()

    async def beat(self) -> None:
        running = list(self.running.values())
        await self.registry.beat(
            Heartbeat(worker_id=self.worker_id, sent_at=utc_now(), running=running)
        )

    async def _beats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if self.beating:
                await self.beat()

    async def send(self, job: TrialJob, kind: TrialEventKind, **fields: Any) -> None:
        event = TrialEvent(
            kind=kind,
            job_id=job.job_id,
            study_id=job.study_id,
            trial_id=job.trial_id,
            number=job.number,
            attempt=job.attempt,
            worker_id=self.worker_id,
            **fields,
        )
        await send_event(self.r, event)

    async def _job(self, ctx: dict[str, Any], payload: dict[str, Any]) -> None:
        job = TrialJob.model_validate(payload)
        self.jobs.append(job)
        self.running[job.job_id] = RunningTrial(
            job_id=job.job_id,
            study_id=job.study_id,
            trial_id=job.trial_id,
            number=job.number,
            started_at=utc_now(),
        )
        try:
            await self.send(job, TrialEventKind.STARTED, pid=12345)
            result = await self.behave(self, job)
            if result is not None:
                await self.send(job, TrialEventKind.RESULT, result=result)
        except asyncio.CancelledError:
            self.aborted.append(job.job_id)
            cancelled = TrialResult(
                state=TrialState.FAIL,
                failure_kind=FailureKind.CANCELLED,
                failure_reason="aborted by the manager",
            )
            await self.send(job, TrialEventKind.RESULT, result=cancelled)
            raise
        finally:
            self.running.pop(job.job_id, None)


@pytest.fixture
def settings(tmp_path: Path, private_redis: RedisServer) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        db_url=f"sqlite:///{tmp_path / 'studies.db'}",
        redis_url=private_redis.url,
        heartbeat_s=HEARTBEAT_S,
        lease_ttl_s=3.0,
        host_name="manager-a",
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[StudyStore]:
    s = StudyStore(settings.db_url)
    yield s
    s.close()


def run(settings: Settings, body: Callable[[aioredis.Redis], Awaitable[None]]) -> None:
    """Run ``body(r)`` in a fresh event loop with a client of the test's private Redis."""

    async def main() -> None:
        assert settings.redis_url is not None
        r = await connect(settings.redis_url)
        try:
            await body(r)
        finally:
            await r.aclose()

    asyncio.run(main())


@contextlib.asynccontextmanager
async def workers(
    settings: Settings, tmp_path: Path, **behaviours: Behaviour
) -> AsyncIterator[dict[str, ScriptedWorker]]:
    assert settings.redis_url is not None
    async with contextlib.AsyncExitStack() as stack:
        started = {}
        for wid, behave in behaviours.items():
            w = ScriptedWorker(settings.redis_url, settings, wid, behave, tmp_path / wid)
            started[wid] = await stack.enter_async_context(w)
        yield started


@contextlib.asynccontextmanager
async def supervisor(
    settings: Settings, store: StudyStore, r: aioredis.Redis
) -> AsyncIterator[StudySupervisor]:
    sup = StudySupervisor(settings, store, r)
    await sup.start()
    try:
        yield sup
    finally:
        await sup.stop()


def create(store: StudyStore, spec_doc: dict[str, Any], name: str) -> int:
    spec = StudySpec.model_validate(spec_doc)
    return store.create_study(name, spec, spec_doc, executor="manager").id


async def wait_until(done: Callable[[], bool], timeout_s: float = 10) -> None:
    """Poll ``done()`` every 50 ms; TimeoutError after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            if done():
                return
            await asyncio.sleep(0.05)


async def finished(sup: StudySupervisor, study_id: int, timeout_s: float = 60) -> None:
    await wait_until(lambda: study_id not in sup.running(), timeout_s)


def placed(job_id: str) -> str:
    """A job id without its random tail: ``trial-<trial_id>-<attempt>[.<n>]``."""
    head, tail = job_id.rsplit("-", 1)
    assert len(tail) == 8 and int(tail, 16) >= 0, job_id
    return head


def event(kind: TrialEventKind, trial_id: int, study_id: int, **fields: Any) -> TrialEvent:
    return TrialEvent(
        kind=kind,
        job_id=f"trial-{trial_id}-1",
        study_id=study_id,
        trial_id=trial_id,
        number=0,
        worker_id="w1",
        **fields,
    )


async def pending(r: aioredis.Redis) -> int:
    info = await r.xpending(keys.EVENTS, keys.EVENTS_GROUP)
    return int(info["pending"])


# ---- the Ingestor ----------------------------------------------------------------------------
def test_a_redelivered_result_is_stored_once(
    settings: Settings, store: StudyStore, tiny_model: Any
) -> None:
    async def body(r: aioredis.Redis) -> None:
        study_id = create(store, small_spec(tiny_model), "twice")
        trial = store.add_trial(study_id, 0, TrialRole.BASELINE, {})
        assert trial.id is not None
        first = failed("the first delivery")
        await send_event(r, event(TrialEventKind.RESULT, trial.id, study_id, result=first))
        await send_event(
            r, event(TrialEventKind.RESULT, trial.id, study_id, result=failed("again"))
        )
        ingestor = Ingestor(store, EventReader(r, "manager@a"), runner=None)
        assert await ingestor.drain() == 2
        [stored] = store.trials(study_id)
        assert stored.result is not None and stored.result.failure_reason == "the first delivery"
        assert await pending(r) == 0

    run(settings, body)


def test_a_manager_killed_before_its_ack_stores_the_result_once(
    settings: Settings, store: StudyStore, tiny_model: Any
) -> None:
    async def body(r: aioredis.Redis) -> None:
        study_id = create(store, small_spec(tiny_model), "restart")
        trial = store.add_trial(study_id, 0, TrialRole.BASELINE, {})
        assert trial.id is not None
        result = failed("measured while the manager restarted")
        await send_event(r, event(TrialEventKind.RESULT, trial.id, study_id, result=result))
        # the first manager read the entry and committed it, then died before acknowledging it
        [(_entry, got, _raw)] = await EventReader(r, "manager@a").read(block_ms=100)
        assert got is not None and got.result is not None
        store.finish_trial(trial.id, got.result)
        assert await pending(r) == 1
        # the restarted manager (same consumer name) reads its pending entries first
        restarted = Ingestor(store, EventReader(r, "manager@a"), runner=None)
        assert await restarted.drain() == 1
        assert await pending(r) == 0
        assert [t.result for t in store.trials(study_id)] == [store.trials(study_id)[0].result]
        assert store.trials(study_id)[0].state is TrialState.FAIL

    run(settings, body)


def test_a_database_error_leaves_the_entry_unacknowledged(
    settings: Settings, store: StudyStore, tiny_model: Any
) -> None:
    async def body(r: aioredis.Redis) -> None:
        study_id = create(store, small_spec(tiny_model), "dberror")
        trial = store.add_trial(study_id, 0, TrialRole.BASELINE, {})
        assert trial.id is not None
        with sqlite3.connect(settings.db_url.removeprefix("sqlite:///")) as db:
            db.execute("DROP TABLE trials")  # a real database failure, not a missing row
        await send_event(r, event(TrialEventKind.RESULT, trial.id, study_id, result=failed()))
        ingestor = Ingestor(store, EventReader(r, "manager@a"), runner=None)
        await ingestor.step(block_ms=100)
        assert await pending(r) == 1  # not stored, so not acknowledged: retried later

    run(settings, body)


def test_a_rejected_job_fails_its_trial_with_the_reason(
    settings: Settings, store: StudyStore, tiny_model: Any
) -> None:
    async def body(r: aioredis.Redis) -> None:
        study_id = create(store, small_spec(tiny_model), "rejected")
        trial = store.add_trial(study_id, 0, TrialRole.BASELINE, {})
        assert trial.id is not None
        why = "payload.params: Input should be a valid dictionary"
        await send_event(r, event(TrialEventKind.REJECTED, trial.id, study_id, reason=why))
        await Ingestor(store, EventReader(r, "manager@a"), runner=None).drain()
        [stored] = store.trials(study_id)
        assert stored.failure_kind is FailureKind.UNKNOWN
        assert stored.result is not None and why in (stored.result.failure_reason or "")

    run(settings, body)


# ---- the RemoteRunner ------------------------------------------------------------------------
async def _run_one(
    settings: Settings, store: StudyStore, r: aioredis.Redis, spec_doc: dict[str, Any], name: str
) -> tuple[int, TrialResult]:
    """Run one trial through a RemoteRunner fed by an Ingestor; (trial id, result)."""
    study_id = create(store, spec_doc, name)
    study = store.get_study(study_id)
    trial = store.add_trial(study_id, 0, TrialRole.BASELINE, {})
    assert trial.id is not None
    assert settings.redis_url is not None
    pool = await arq_pool(settings.redis_url)
    runner = RemoteRunner(store, pool, Registry(r, settings), settings)
    ingestor = Ingestor(store, EventReader(r, "manager@a"), runner)
    reading = asyncio.create_task(ingestor.run(block_ms=100))
    engine = get_engine(study.spec.engine)
    ctx = TrialContext(
        spec=study.spec,
        engine=engine,
        deployment=build_deployment(study.spec, engine, name),
        client=BuiltinClient.for_spec(study.spec),
        log_dir=settings.data_dir,
        label=name,
        study_id=study_id,
        trial_id=trial.id,
    )
    try:
        async with asyncio.timeout(30):
            return trial.id, await runner(ctx, {}, 0)
    finally:
        await cancel_and_wait({reading}, 30, grace_s=1)
        await pool.aclose()


def test_a_lost_worker_s_trial_is_retried_on_another(
    settings: Settings, store: StudyStore, tiny_model: Any, tmp_path: Path
) -> None:
    async def body(r: aioredis.Redis) -> None:
        async with workers(settings, tmp_path, a=hang) as ws:
            ws["a"].beating = False  # it stops heartbeating mid-trial: offline after 3 beats
            async with workers(settings, tmp_path, b=answer):
                trial_id, result = await _run_one(
                    settings, store, r, small_spec(tiny_model), "lost"
                )
        assert result.failure_reason == "ran on b"
        assert [placed(j.job_id) for j in ws["a"].jobs] == [f"trial-{trial_id}-1"]
        assert store.trial_workers(store.get_study("lost").id) == {trial_id: "b"}

    run(settings, body)


def test_a_trial_lost_twice_fails_worker_lost(
    settings: Settings, store: StudyStore, tiny_model: Any, tmp_path: Path
) -> None:
    async def body(r: aioredis.Redis) -> None:
        async def vanish(worker: ScriptedWorker, job: TrialJob) -> TrialResult | None:
            return None  # the job ends without a result, as if the worker was restarted

        async with workers(settings, tmp_path, a=vanish):
            _, result = await _run_one(settings, store, r, small_spec(tiny_model), "lost2")
        assert result.failure_kind is FailureKind.WORKER_LOST
        assert "vanished" in (result.failure_reason or "")

    run(settings, body)


def test_a_handed_back_trial_runs_on_another_worker_as_the_same_attempt(
    settings: Settings, store: StudyStore, tiny_model: Any, tmp_path: Path
) -> None:
    async def body(r: aioredis.Redis) -> None:
        async def hand_back(worker: ScriptedWorker, job: TrialJob) -> TrialResult | None:
            await worker.send(job, TrialEventKind.HANDED_BACK, reason="SIGTERM")
            return None  # a stopping worker that still heartbeats (not yet marked draining)

        later: dict[str, ScriptedWorker] = {}
        done = asyncio.Event()

        async def second_worker(a: ScriptedWorker) -> None:
            await wait_until(lambda: len(a.jobs) == 1 and not a.running)
            await asyncio.sleep(3 * HEARTBEAT_S)  # meanwhile only the stopping worker is there
            async with workers(settings, tmp_path, b=answer) as ws:
                later.update(ws)
                await done.wait()

        async def trial() -> tuple[int, TrialResult]:
            try:
                return await _run_one(settings, store, r, small_spec(tiny_model), "back2")
            finally:
                done.set()

        async with workers(settings, tmp_path, a=hand_back) as ws:
            (trial_id, result), _ = await asyncio.gather(trial(), second_worker(ws["a"]))
        assert result.failure_reason == "ran on b"
        assert [placed(j.job_id) for j in ws["a"].jobs] == [f"trial-{trial_id}-1"]
        assert [(placed(j.job_id), j.attempt) for j in later["b"].jobs] == [
            (f"trial-{trial_id}-1.1", 1)
        ]

    run(settings, body)


def test_a_handed_back_trial_waits_for_its_only_worker_to_restart(
    settings: Settings, store: StudyStore, tiny_model: Any, tmp_path: Path
) -> None:
    async def body(r: aioredis.Redis) -> None:
        async def hand_back_once(worker: ScriptedWorker, job: TrialJob) -> TrialResult | None:
            if len(worker.jobs) == 1:
                await worker.send(job, TrialEventKind.HANDED_BACK, reason="SIGTERM")
                return None
            return await answer(worker, job)

        async def restart(w: ScriptedWorker) -> None:
            await wait_until(lambda: len(w.jobs) == 1 and not w.running)
            await asyncio.sleep(4 * HEARTBEAT_S)  # several placement polls: not placed there
            assert len(w.jobs) == 1
            w.info = w.info.model_copy(update={"started_at": utc_now()})  # a new process
            await w.registry.register(w.info)

        async with workers(settings, tmp_path, a=hand_back_once) as ws:
            (trial_id, result), _ = await asyncio.gather(
                _run_one(settings, store, r, small_spec(tiny_model), "back"), restart(ws["a"])
            )
        assert result.failure_reason == "ran on a"
        jobs = [(placed(j.job_id), j.attempt) for j in ws["a"].jobs]
        assert jobs == [(f"trial-{trial_id}-1", 1), (f"trial-{trial_id}-1.1", 1)]

    run(settings, body)


# ---- a measured result beats one the manager made up -----------------------------------------
def measured(note: str = "measured") -> TrialResult:
    """A COMPLETE result as a worker sends it."""
    return TrialResult(
        state=TrialState.COMPLETE, feasible=True, objective_values=[42.0], notes=[note]
    )


def test_a_late_result_of_attempt_1_wins_while_attempt_2_runs(
    settings: Settings, store: StudyStore, tiny_model: Any, tmp_path: Path
) -> None:
    async def body(r: aioredis.Redis) -> None:
        async def slow(worker: ScriptedWorker, job: TrialJob) -> TrialResult | None:
            worker.beating = False  # so slow it misses heartbeats: declared lost
            await wait_until(lambda: bool(ws["b"].running), timeout_s=20)
            return measured("attempt 1")

        async with workers(settings, tmp_path, a=slow, b=hang) as ws:
            trial_id, result = await _run_one(settings, store, r, small_spec(tiny_model), "late")
            await wait_until(lambda: bool(ws["b"].aborted))
        assert result == measured("attempt 1")
        assert [placed(j) for j in ws["b"].aborted] == [f"trial-{trial_id}-2"]
        [stored] = store.trials(store.get_study("late").id)
        assert stored.state is TrialState.COMPLETE and stored.result == measured("attempt 1")

    run(settings, body)


class Published:
    """A LivePublisher that keeps what it is given."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []

    async def publish(self, study_id: int, payload: dict[str, Any]) -> None:
        self.payloads.append(payload)


def test_a_result_after_worker_lost_replaces_the_manager_s_fail(
    settings: Settings,
    store: StudyStore,
    tiny_model: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body(r: aioredis.Redis) -> None:
        async def vanish(worker: ScriptedWorker, job: TrialJob) -> TrialResult | None:
            return None

        async with workers(settings, tmp_path, a=vanish):
            trial_id, lost = await _run_one(settings, store, r, small_spec(tiny_model), "lost")
        assert lost.failure_kind is FailureKind.WORKER_LOST and lost.synthesized
        store.finish_trial(trial_id, lost)  # what the loop saves
        study_id = store.get_study("lost").id
        late = event(TrialEventKind.RESULT, trial_id, study_id, result=measured("first"))
        later = event(TrialEventKind.RESULT, trial_id, study_id, result=measured("second"))
        await send_event(r, late)
        await send_event(r, later)
        live = Published()
        await Ingestor(store, EventReader(r, "manager@a"), None, live).drain()
        [stored] = store.trials(study_id)
        assert stored.state is TrialState.COMPLETE and stored.result is not None
        assert stored.result.objective_values == [42.0] and not stored.result.synthesized
        first, note = stored.result.notes  # the first measured result stays
        assert first == "first"
        assert "after the manager had declared the trial lost" in note
        assert "worker_lost" in note and "trial-" in note
        assert live.payloads[0]["trial"]["state"] == "COMPLETE"
        assert await pending(r) == 0

    caplog.set_level("WARNING", logger="servetune.manager.ingest")
    run(settings, body)
    assert any("replaces the stored FAIL worker_lost" in m for m in caplog.messages)


def test_a_late_result_after_a_user_cancel_keeps_the_cancel(
    settings: Settings, store: StudyStore, tiny_model: Any
) -> None:
    async def body(r: aioredis.Redis) -> None:
        study_id = create(store, small_spec(tiny_model), "cancelled")
        trial = store.add_trial(study_id, 0, TrialRole.BASELINE, {})
        assert trial.id is not None
        cancel = TrialResult(
            state=TrialState.FAIL,
            failure_kind=FailureKind.CANCELLED,
            failure_reason="study cancelled by the user",
        )
        store.finish_trial(trial.id, cancel)
        await send_event(r, event(TrialEventKind.RESULT, trial.id, study_id, result=measured()))
        await Ingestor(store, EventReader(r, "manager@a"), runner=None).drain()
        [stored] = store.trials(study_id)
        assert stored.result == cancel
        assert store.replace_synthesized_result(trial.id, measured()) is None

    run(settings, body)


def test_a_trial_waits_for_a_worker_that_fits(
    settings: Settings,
    store: StudyStore,
    tiny_model: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body(r: aioredis.Redis) -> None:
        async def late_worker() -> None:
            await asyncio.sleep(0.5)
            async with workers(settings, tmp_path, late=answer):
                await asyncio.sleep(3)

        arriving = asyncio.create_task(late_worker())
        _, result = await _run_one(settings, store, r, small_spec(tiny_model), "waits")
        await cancel_and_wait({arriving}, 30, grace_s=1)
        assert result.failure_reason == "ran on late"

    caplog.set_level("INFO", logger="servetune.manager.dispatch")
    run(settings, body)
    waits = [m for m in caplog.messages if "waiting for a worker with" in m]
    assert len(waits) == 1, waits  # said once, not at every poll
    assert "CPU thread" in waits[0] and "free (engine llamacpp, deployment local)" in waits[0]


# ---- the StudySupervisor ---------------------------------------------------------------------
def test_a_study_runs_on_two_workers_in_parallel(
    settings: Settings, store: StudyStore, tiny_model: Any, tmp_path: Path
) -> None:
    async def body(r: aioredis.Redis) -> None:
        doc = small_spec(tiny_model, trials=3)
        doc["budget"]["parallel"] = 2
        study_id = create(store, doc, "fleet")
        async with (
            workers(settings, tmp_path, a=real_trial, b=real_trial) as ws,
            supervisor(settings, store, r) as sup,
        ):
            live = sup.subscribe(study_id)
            assert await anext(live) == {"type": "study", "status": "running"}
            await sup.submit(study_id)
            await finished(sup, study_id, timeout_s=90)
            seen = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    async for message in live:
                        seen.append(message)
            await live.aclose()
        trials = store.trials(study_id)
        assert store.get_study(study_id).status == "finished"
        assert len(trials) == 3 and all(t.state is TrialState.COMPLETE for t in trials)
        assert set(store.trial_workers(study_id).values()) == {"a", "b"}
        assert sum(len(w.jobs) for w in ws.values()) == 3
        kinds = {m["type"] for m in seen}
        assert {"trial", "phase", "study"} <= kinds
        assert seen[-1] == {"type": "study", "status": "finished"}

    run(settings, body)


def test_a_study_reusing_a_deleted_study_s_ids_runs_every_trial(
    settings: Settings, store: StudyStore, tiny_model: Any, tmp_path: Path
) -> None:
    """SQLite hands a deleted study's ids (study and trials) out again: the new study's jobs
    must not meet the old ones' ARQ keys, and the old study's events must not touch it."""

    async def body(r: aioredis.Redis) -> None:
        doc = small_spec(tiny_model, trials=2)
        async with (
            workers(settings, tmp_path, a=answer) as ws,
            supervisor(settings, store, r) as sup,
        ):
            first = create(store, doc, "first")
            await sup.submit(first)
            await finished(sup, first)
            old_trials = [t.id for t in store.trials(first)]
            old = ws["a"].jobs[0]
            store.delete_study(first)
            second = create(store, doc, "second")
            assert second == first  # the precondition: SQLite reused the id
            # a late event of the deleted study's job names the same ids: it must be dropped
            await send_event(
                r,
                TrialEvent(
                    kind=TrialEventKind.RESULT,
                    job_id=old.job_id,
                    study_id=first,
                    trial_id=old.trial_id,
                    number=old.number,
                    worker_id="a",
                    result=measured("of the deleted study"),
                ),
            )
            await asyncio.sleep(0.5)  # read (and dropped) while the new study has no trials
            await sup.submit(second)
            await finished(sup, second)
        trials = store.trials(second)
        assert [t.id for t in trials] == old_trials  # the trial ids were reused too
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
        assert all(t.failure_kind is FailureKind.BENCHMARK_FAILED for t in trials), trials
        assert all(t.result and t.result.failure_reason == "ran on a" for t in trials)
        ids = [j.job_id for j in ws["a"].jobs]
        assert len(ids) == 4 and len(set(ids)) == 4  # every trial ran, each job id new

    run(settings, body)


def test_an_event_of_another_job_is_not_applied_to_a_trial_in_flight(
    settings: Settings, store: StudyStore, tiny_model: Any, tmp_path: Path
) -> None:
    async def body(r: aioredis.Redis) -> None:
        async def stray_first(worker: ScriptedWorker, job: TrialJob) -> TrialResult | None:
            other = job.model_copy(update={"job_id": f"trial-{job.trial_id}-1-0badc0de"})
            await worker.send(other, TrialEventKind.RESULT, result=measured("stray"))
            await asyncio.sleep(3 * HEARTBEAT_S)
            return failed("the real one")

        async with workers(settings, tmp_path, a=stray_first):
            _, result = await _run_one(settings, store, r, small_spec(tiny_model), "s")
        assert result.failure_reason == "the real one"
        [stored] = store.trials(store.get_study("s").id)
        assert stored.result is not None and stored.result.failure_reason == "the real one"

    run(settings, body)


def test_a_held_lease_makes_submit_say_busy(
    settings: Settings, store: StudyStore, tiny_model: Any
) -> None:
    async def body(r: aioredis.Redis) -> None:
        study_id = create(store, small_spec(tiny_model), "held")
        other = LeaseOwner(owner_id="cli-run", host="another-host", pid=1)
        store.acquire_lease(study_id, other, ttl_s=60)
        async with supervisor(settings, store, r) as sup:
            with pytest.raises(StudyBusy, match="another-host"):
                await sup.submit(study_id)
            with pytest.raises(StudyBusy):
                await sup.resume(study_id)
            assert sup.running() == set()

    run(settings, body)


def test_cancel_aborts_the_job_on_the_worker(
    settings: Settings, store: StudyStore, tiny_model: Any, tmp_path: Path
) -> None:
    async def body(r: aioredis.Redis) -> None:
        study_id = create(store, small_spec(tiny_model), "cancel")
        async with workers(settings, tmp_path, a=hang) as ws, supervisor(settings, store, r) as sup:
            await sup.submit(study_id)
            await wait_until(lambda: bool(ws["a"].running))
            async with asyncio.timeout(10):
                await sup.cancel(study_id)
            assert study_id not in sup.running()
            assert ws["a"].aborted == [ws["a"].jobs[0].job_id]
        [trial] = store.trials(study_id)
        assert trial.failure_kind is FailureKind.CANCELLED
        assert store.get_study(study_id).status == "cancelled"

    run(settings, body)


@pytest.mark.parametrize("meanwhile", ["finished", "still running"])
def test_a_restarted_manager_resumes_without_running_a_trial_twice(
    settings: Settings, store: StudyStore, tiny_model: Any, tmp_path: Path, meanwhile: str
) -> None:
    """The manager stops mid-trial; the trial finishes while it is down (its RESULT is
    ingested at the next start) or still runs when it returns (adopted): either way it is run
    once, stored once, and the resumed study finishes."""

    async def body(r: aioredis.Redis) -> None:
        release = asyncio.Event()

        async def slow(worker: ScriptedWorker, job: TrialJob) -> TrialResult | None:
            if job.number == 0:
                await release.wait()
            return await answer(worker, job)

        study_id = create(store, small_spec(tiny_model, trials=2), "restart")
        async with workers(settings, tmp_path, a=slow) as ws:
            async with supervisor(settings, store, r) as first:
                await first.submit(study_id)
                await wait_until(lambda: bool(ws["a"].running))
            # the manager is down: its study is still running, and so is the trial
            assert store.get_study(study_id).status == "running"
            assert store.get_study(study_id).lease is None
            if meanwhile == "finished":
                release.set()
                await wait_until(lambda: not ws["a"].running)
            async with supervisor(settings, store, r) as second:
                assert study_id in second.running()  # resumed at start
                release.set()
                await finished(second, study_id)
        trials = store.trials(study_id)
        assert store.get_study(study_id).status == "finished"
        assert [t.number for t in trials] == [0, 1]
        assert trials[0].failure_kind is FailureKind.BENCHMARK_FAILED  # measured, not interrupted
        assert len(ws["a"].jobs) == 2  # trial 0 was not run again

    run(settings, body)
