"""The manager's owner of running studies: one StudyLoop task per study, holding its DB lease.

It starts the Ingestor, resumes the studies a dead manager left, cancels, and feeds live views.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import redis.asyncio as aioredis
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from servetune.bench.builtin import BuiltinClient
from servetune.cluster import keys
from servetune.cluster.events import EventReader, publish_study
from servetune.cluster.queue import JSON_DESERIALIZER, JSON_SERIALIZER
from servetune.cluster.registry import Registry
from servetune.cluster.tasks import cancel_and_wait, raise_if_cancelled
from servetune.core.study import Params, Trial, TrialRole, TrialState
from servetune.engines import get_engine
from servetune.errors import ServetuneError, StudyBusy, check_resumable
from servetune.loop import LoopEvents, StudyLoop
from servetune.manager.dispatch import ABORT_WAIT_S, RemoteRunner
from servetune.manager.ingest import Ingestor
from servetune.runner import TrialContext
from servetune.settings import Settings
from servetune.slots import TrialSlots
from servetune.store.repo import StudyRecord, StudyStore
from servetune.study_session import build_deployment, holder_alive, holding_lease

log = logging.getLogger(__name__)

STOP_WAIT_S = 15.0
"""How long ``stop`` waits for the study loops, the Ingestor and the watchdog to end, s."""
CANCEL_WAIT_S = 15.0
"""How long ``cancel`` waits for a study's loop to record the cancellation, s."""
CANCEL_GRACE_S = ABORT_WAIT_S + 2.0
"""How long a cancelled loop may clean up before it is cancelled again, s: longer than a trial
waits for its worker's cancelled RESULT (``dispatch.ABORT_WAIT_S``), so that result is kept."""
STALE_CLAIM_MIN_MS = 60_000
"""Entries another manager read and left unacknowledged this long (ms) are taken over."""


class StudySupervisor:
    """Runs the manager's studies: each in its own task, ``StudyLoop`` with a ``RemoteRunner``.

    ``redis`` is the fleet's ``redis.asyncio.Redis`` (bytes responses); ``registry`` defaults to
    ``Registry(redis, settings)`` and ``pool`` to an ``ArqRedis`` with the JSON serializer on
    ``redis``'s connections. A study is run while holding its database lease exactly as
    ``servetune run`` does (``study_session.holding_lease``), so a CLI run, this manager and
    another manager never run one study at once (``submit``/``resume`` raise StudyBusy).

    ``start()`` starts the ``Ingestor``, applies what is waiting in the events stream, then
    resumes every study with executor ``manager`` and status ``running`` whose lease holder is
    gone (a killed manager); trials still running on workers are adopted, not re-run.
    ``stop()`` detaches: loops stop without aborting jobs or writing anything, so the next
    start resumes them. Live messages (``subscribe``) are published on ``keys.study_live``.
    """

    def __init__(
        self,
        settings: Settings,
        store: StudyStore,
        redis: aioredis.Redis,
        registry: Registry | None = None,
        *,
        pool: ArqRedis | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.redis = redis
        self.registry = registry or Registry(redis, settings)
        self.pool = pool or ArqRedis(
            pool_or_conn=redis.connection_pool,
            job_serializer=JSON_SERIALIZER,
            job_deserializer=JSON_DESERIALIZER,
        )
        self.runner = RemoteRunner(store, self.pool, self.registry, settings)
        self.ingestor = Ingestor(
            store, EventReader(redis, consumer=f"manager@{settings.host_name}"), self.runner, self
        )
        self._studies: dict[int, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Ingest what is waiting, start the Ingestor and the watchdog, resume orphaned studies."""
        await self.ingestor.claim_stale(self._stale_ms())
        await self.ingestor.drain()
        self._tasks.append(asyncio.create_task(self.ingestor.run(), name="ingestor"))
        self._tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))
        for study in await asyncio.to_thread(self.store.list_studies, 10_000):
            if not isinstance(study, StudyRecord):
                continue
            if study.executor != "manager" or study.status != "running":
                continue
            if study.lease is not None and holder_alive(study.lease, self.settings):
                continue
            try:
                await self.resume(study.id)
                log.info("study %s: resumed (its manager was gone)", study.name)
            except ServetuneError as e:
                log.warning("study %s: not resumed: %s", study.name, e)

    async def stop(self) -> None:
        """Stop every loop without cancelling its trials (resumed at the next start), then the
        Ingestor and the watchdog."""
        self._stopping = True
        for study_id in list(self._studies):
            self.runner.detach(study_id)
            self.store.fence(study_id, "manager-stopping")  # the loop writes nothing more
        await cancel_and_wait(self._studies.values(), STOP_WAIT_S)
        await cancel_and_wait(self._tasks, STOP_WAIT_S)
        self._tasks.clear()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 1.0)

    # ---- studies -------------------------------------------------------------------------
    def running(self) -> set[int]:
        """Ids of the studies this manager runs now."""
        return {sid for sid, task in self._studies.items() if not task.done()}

    async def submit(self, study_id: int) -> None:
        """Take the study's lease and run its loop in a task; returns once the lease is held.

        Raises StudyBusy when another process (a CLI run, another manager) holds it,
        StudyNotFound for an unknown study. A study already running here is left alone.
        """
        if study_id in self.running():
            return
        study = await asyncio.to_thread(self.store.get_study, study_id)
        held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._run(study, held), name=f"study-{study_id}")
        self._studies[study_id] = task
        await asyncio.wait({held, task}, return_when=asyncio.FIRST_COMPLETED)
        if not held.done() and task.done():
            self._studies.pop(study_id, None)
            task.result()  # raises what stopped it (StudyBusy)
            raise ServetuneError(f"study {study.name} ended before it started")

    async def resume(self, study_id: int) -> None:
        """Run a stopped (cancelled, interrupted or failed) study again: ``submit``. Raises
        StudyNotResumable for a finished study (nothing written)."""
        study = await asyncio.to_thread(self.store.get_study, study_id)
        check_resumable(study.name, study.status)
        await self.submit(study_id)

    async def cancel(self, study_id: int) -> None:
        """Cancel the study's loop: its jobs are aborted, its trials end FAIL ``cancelled`` and
        the study ``cancelled``. Raises StudyBusy when another live process runs it; a study
        not running anywhere is left as it is."""
        task = self._studies.get(study_id)
        if task is None or task.done():
            study = await asyncio.to_thread(self.store.get_study, study_id)
            if study.lease is not None and holder_alive(study.lease, self.settings):
                raise StudyBusy(
                    f"study {study.name} is run by another process "
                    f"({study.lease.describe()}); cancel it there"
                )
            return
        if not await cancel_and_wait({task}, CANCEL_WAIT_S, grace_s=CANCEL_GRACE_S):
            log.warning("study %d: its loop did not stop within %.0f s", study_id, CANCEL_WAIT_S)

    # ---- live views ----------------------------------------------------------------------
    async def publish(self, study_id: int, payload: dict[str, Any]) -> None:
        """Send ``payload`` to the study's live viewers (pub/sub); a Redis error is only logged."""
        try:
            await publish_study(self.redis, study_id, payload)
        except (ServetuneError, RedisError) as e:
            log.debug("study %d: live message not sent: %s", study_id, e)

    async def subscribe(self, study_id: int) -> AsyncIterator[dict[str, Any]]:
        """Live messages of the study, as dicts, until the caller stops iterating.

        First ``{"type": "study", "status": …}`` (the stored status, once subscribed: what
        comes next is live), then what any manager publishes on ``keys.study_live``:
        ``{"type": "trial", "trial": <Trial JSON>}`` (started or finished),
        ``{"type": "phase", "trial_id", "number", "phase", "worker_id", "pid", "at"}``,
        ``{"type": "message", "text"}`` and ``{"type": "study", "status"}``.
        Pub/sub may miss messages (a reconnecting client re-reads the trials). Raises
        StudyNotFound for an unknown study.
        """
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(keys.study_live(study_id))
            study = await asyncio.to_thread(self.store.get_study, study_id)
            yield {"type": "study", "status": study.status}
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                raise_if_cancelled()
                if message is None or message.get("type") != "message":
                    continue
                try:
                    payload = json.loads(message["data"])
                except (ValueError, TypeError):
                    log.warning("study %d: unreadable live message skipped", study_id)
                    continue
                if isinstance(payload, dict):
                    yield payload
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.unsubscribe()
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    # ---- internals -----------------------------------------------------------------------
    async def _run(self, study: StudyRecord, held: asyncio.Future[None]) -> None:
        try:
            async with holding_lease(self.settings, self.store, study.id):
                held.set_result(None)
                loop = StudyLoop(
                    self.store,
                    study,
                    self._context(study),
                    runner=self.runner,
                    events=self._events(study.id),
                    adopt=self.runner.adopt,
                    slots=TrialSlots.unlimited(),
                )
                await self.publish(study.id, {"type": "study", "status": "running"})
                try:
                    await loop.run()
                finally:
                    status = (await asyncio.to_thread(self.store.get_study, study.id)).status
                    await self.publish(study.id, {"type": "study", "status": status})
        except asyncio.CancelledError:
            log.info("study %s: stopped", study.name)
        except StudyBusy as e:
            if not held.done():
                raise
            if self._stopping:
                log.info("study %s: left running for the next start of a manager", study.name)
            else:
                log.error("study %s: %s", study.name, e)
        except Exception:
            if not held.done():
                raise
            log.exception("study %s: its loop failed", study.name)
        finally:
            if self._studies.get(study.id) is asyncio.current_task():
                self._studies.pop(study.id, None)

    def _context(self, study: StudyRecord) -> TrialContext:
        """The loop's context; the engine is what matters here (needs, twins), the rest runs on
        workers."""
        spec = study.spec
        engine = get_engine(spec.engine)
        return TrialContext(
            spec=spec,
            engine=engine,
            deployment=build_deployment(spec, engine, study.name),
            client=BuiltinClient.for_spec(spec),
            log_dir=self.settings.study_logs_dir(study.name),
            label=study.name,
            study_id=study.id,
        )

    def _events(self, study_id: int) -> LoopEvents:
        def started(number: int, role: TrialRole, params: Params) -> None:
            trial = Trial(
                study_id=study_id,
                number=number,
                role=role,
                params=params,
                state=TrialState.RUNNING,
            )
            self._spawn(
                self.publish(study_id, {"type": "trial", "trial": trial.model_dump(mode="json")})
            )

        def finished(trial: Trial) -> None:
            self._spawn(
                self.publish(study_id, {"type": "trial", "trial": trial.model_dump(mode="json")})
            )

        def message(text: str) -> None:
            self._spawn(self.publish(study_id, {"type": "message", "text": text}))

        return LoopEvents(trial_started=started, trial_finished=finished, message=message)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _stale_ms(self) -> int:
        return max(STALE_CLAIM_MIN_MS, int(12 * self.settings.heartbeat_s * 1000))

    async def _watchdog(self) -> None:
        """Every heartbeat: take over events a dead manager left unacknowledged."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self.ingestor.claim_stale(self._stale_ms())
            except (ServetuneError, RedisError) as e:
                log.warning("claiming stale events failed: %s", e)
            raise_if_cancelled()
