"""The manager's reader of the workers' events stream: results into the database, then acked.

Ingestion is idempotent by trial id; an entry is acknowledged only after its database commit.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from servetune.cluster.events import EventReader
from servetune.cluster.models import TrialEvent, TrialEventKind
from servetune.cluster.tasks import raise_if_cancelled
from servetune.core.study import FailureKind, Trial, TrialResult, TrialState
from servetune.errors import ServetuneError, StudyBusy, StudyNotFound
from servetune.manager.dispatch import RemoteRunner
from servetune.store.repo import StudyStore

log = logging.getLogger(__name__)

RETRY_MAX_S = 30.0
"""Longest pause between two tries of an entry whose database write failed, s."""


class LivePublisher(Protocol):
    """Where live views get a study's changes (the supervisor: pub/sub on ``study_live``)."""

    async def publish(self, study_id: int, payload: dict[str, Any]) -> None:
        """Send ``payload`` to the live viewers of ``study_id``; never raises."""
        ...


class Ingestor:
    """Reads ``TrialEvent`` entries with ``reader`` and applies them, then acknowledges them.

    - RESULT → ``store.finish_trial`` (the first stored outcome wins: a redelivered RESULT never
      overwrites or duplicates) → ack → ``runner.resolve`` → a live ``{"type": "trial"}``. One
      exception: a measured result replaces an outcome the manager made up
      (``TrialResult.synthesized``, the FAIL ``worker_lost`` of a worker declared lost that was
      only slow), through ``store.replace_synthesized_result``, with a note saying so, logged
      at WARNING. A user's cancel and any earlier measured result are kept.
    - REJECTED (the worker refused the payload) → the trial FAIL ``unknown`` with the reason, like
      a RESULT.
    - STARTED → ``store.set_trial_worker`` (the engine pid stays on its host: it is only shown,
      live, never recorded for the local recovery to kill) → ack → a live ``{"type": "phase"}``.
    - PHASE → ack → a live ``{"type": "phase"}``; HANDED_BACK → ack → ``runner.handed_back``.

    An event is applied only to the trial it was meant for: its ``study_id`` (and number) must
    be the trial's, and for a trial in flight here its ``job_id`` one this manager placed for
    it (any attempt: a late result of an earlier attempt stays valid); others are logged and
    dropped (acknowledged), see ``RemoteRunner.owns``.
    Results of studies not running in this process are stored all the same (the manager was
    down). A database error leaves the entry unacknowledged and retried (backing off up to
    ``RETRY_MAX_S``); an entry of a deleted study is acknowledged and dropped. ``supervisor``
    (a ``LivePublisher``) may be None: nothing is published then.
    """

    def __init__(
        self,
        store: StudyStore,
        reader: EventReader,
        runner: RemoteRunner | None,
        supervisor: LivePublisher | None = None,
    ) -> None:
        self.store = store
        self.reader = reader
        self.runner = runner
        self.supervisor = supervisor
        self._retry: list[tuple[str, TrialEvent]] = []
        self._retry_s = 0.5
        self.ingested = 0
        """Entries applied and acknowledged since start (tests and logs)."""

    async def run(self, block_ms: int = 1000) -> None:
        """Read and apply entries until cancelled; Redis and database errors are retried."""
        while True:
            try:
                await self.step(block_ms)
            except asyncio.CancelledError:
                raise
            except ServetuneError as e:
                log.warning("reading the events stream failed (retrying in 1 s): %s", e)
                await asyncio.sleep(1.0)
            raise_if_cancelled()

    async def drain(self, block_ms: int = 100) -> int:
        """Apply every entry waiting now (pending ones first); how many were applied."""
        before = self.ingested
        while await self.step(block_ms) and not self._retry:
            pass
        return self.ingested - before

    async def step(self, block_ms: int = 1000) -> int:
        """One read (after retrying entries that failed before); how many entries it got."""
        if self._retry:
            retry, self._retry = self._retry, []
            for entry_id, failed in retry:
                await self._apply(entry_id, failed)
            if self._retry:
                await asyncio.sleep(self._retry_s)
                self._retry_s = min(2 * self._retry_s, RETRY_MAX_S)
                return len(retry)
            self._retry_s = 0.5
        entries = await self.reader.read(block_ms=block_ms, count=100)
        for entry_id, event, _raw in entries:
            if event is None:  # not a TrialEvent: logged by the reader; never retried
                await self.reader.ack(entry_id)
                continue
            await self._apply(entry_id, event)
        return len(entries)

    async def claim_stale(self, min_idle_ms: int) -> int:
        """Take over and apply entries another manager (a dead one) read but never acknowledged
        for ``min_idle_ms``; how many were taken over."""
        claimed = await self.reader.claim_stale(min_idle_ms)
        for entry_id, event, _raw in claimed:
            if event is None:
                await self.reader.ack(entry_id)
                continue
            await self._apply(entry_id, event)
        return len(claimed)

    async def _apply(self, entry_id: str, event: TrialEvent) -> None:
        try:
            stray = await self._stray(event)
            live, result = (None, None) if stray else await self._store(event)
        except StudyBusy as e:  # another manager owns the study now: leave it to them
            log.warning(
                "event %s of trial id %d left unacknowledged: %s", entry_id, event.trial_id, e
            )
            return
        except ServetuneError as e:
            if await self._study_gone(event.study_id):
                log.warning(
                    "event %s: study %d was deleted; dropping its %s event",
                    entry_id,
                    event.study_id,
                    event.kind.value,
                )
                await self.reader.ack(entry_id)
                return
            log.warning(
                "event %s (%s of trial id %d) not stored, retrying: %s",
                entry_id,
                event.kind.value,
                event.trial_id,
                e,
            )
            self._retry.append((entry_id, event))
            return
        await self.reader.ack(entry_id)
        if stray:
            return
        self.ingested += 1
        if self.runner is not None:
            if event.kind is TrialEventKind.HANDED_BACK:
                self.runner.handed_back(event)
            elif result is not None:
                self.runner.resolve(event, result)
        if live is not None and self.supervisor is not None:
            await self.supervisor.publish(event.study_id, live)

    async def _stray(self, event: TrialEvent) -> bool:
        """True (logged at WARNING) when ``event`` is not of the trial it names: the trial is
        in flight here under jobs other than ``event.job_id``, or belongs to another study or
        is gone (a deleted study's late job whose database ids were reused). Raises
        ServetuneError when the database cannot be read."""
        owns = self.runner.owns(event) if self.runner is not None else None
        if owns is None:
            trial = await asyncio.to_thread(self.store.find_trial, event.trial_id)
            owns = (
                trial is not None
                and trial.study_id == event.study_id
                and trial.number == event.number
            )
        if not owns:
            log.warning(
                "dropping the %s event of job %s (study id %d, trial id %d): it is not a job "
                "of that trial (a deleted study's, whose ids were reused?)",
                event.kind.value,
                event.job_id,
                event.study_id,
                event.trial_id,
            )
        return not owns

    async def _store(self, event: TrialEvent) -> tuple[dict[str, Any] | None, TrialResult | None]:
        """Write what ``event`` says to the database; the live message to publish after the ack
        and, for a result, the trial's stored outcome."""
        kind = event.kind
        if kind in (TrialEventKind.RESULT, TrialEventKind.REJECTED):
            result = _result_of(event)
            saved = await asyncio.to_thread(self.store.finish_trial, event.trial_id, result)
            if (
                kind is TrialEventKind.RESULT
                and saved.result is not None
                and saved.result.synthesized
                and not result.synthesized
            ):
                saved = await self._replace(event, saved, result)
            log.info(
                "study %d trial %d: %s from worker %s (%s)",
                event.study_id,
                event.number,
                kind.value,
                event.worker_id,
                saved.state.value,
            )
            live = {
                "type": "trial",
                "trial": saved.model_dump(mode="json"),
                "worker_id": event.worker_id,
            }
            return live, saved.result
        if kind is TrialEventKind.STARTED:
            await asyncio.to_thread(self.store.set_trial_worker, event.trial_id, event.worker_id)
            return _phase(event, "started"), None
        if kind is TrialEventKind.PHASE:
            return _phase(event, event.phase or "?"), None
        if kind is TrialEventKind.HANDED_BACK:
            return _phase(event, "handed back"), None
        return None, None

    async def _replace(self, event: TrialEvent, saved: Trial, result: TrialResult) -> Trial:
        """Store ``result`` (measured) over ``saved``'s made-up outcome; the trial as stored."""
        old = saved.result
        assert old is not None
        kind = old.failure_kind.value if old.failure_kind else old.state.value
        note = (
            f"measured by worker {event.worker_id} (job {event.job_id}) after the manager had "
            f"declared the trial lost; it replaces the manager's FAIL {kind}: "
            f"{old.failure_reason or 'no reason given'}"
        )
        measured = result.model_copy(update={"notes": [*result.notes, note]})
        replaced = await asyncio.to_thread(
            self.store.replace_synthesized_result, event.trial_id, measured
        )
        if replaced is None:  # stored otherwise meanwhile (another manager): keep that
            return saved
        log.warning(
            "study %d trial %d: %s measured by worker %s arrived after the trial was declared "
            "lost; it replaces the stored FAIL %s",
            event.study_id,
            event.number,
            result.state.value,
            event.worker_id,
            kind,
        )
        return replaced

    async def _study_gone(self, study_id: int) -> bool:
        try:
            await asyncio.to_thread(self.store.get_study, study_id)
        except StudyNotFound:
            return True
        except ServetuneError:
            return False
        return False


def _result_of(event: TrialEvent) -> TrialResult:
    """The outcome a RESULT or REJECTED event reports (a RESULT without one is FAIL unknown,
    ``synthesized``: a measured result of the trial that arrives later replaces it)."""
    if event.kind is TrialEventKind.RESULT and event.result is not None:
        return event.result
    if event.kind is TrialEventKind.REJECTED:
        reason = f"worker {event.worker_id} rejected the job: {event.reason or 'no reason given'}"
    else:
        reason = f"worker {event.worker_id} sent a result event without a result"
    return TrialResult(
        state=TrialState.FAIL,
        failure_kind=FailureKind.UNKNOWN,
        failure_reason=reason,
        finished_at=event.at,
        synthesized=event.kind is TrialEventKind.RESULT,  # nothing measured: made up here
    )


def _phase(event: TrialEvent, name: str) -> dict[str, Any]:
    return {
        "type": "phase",
        "trial_id": event.trial_id,
        "number": event.number,
        "phase": name,
        "worker_id": event.worker_id,
        "pid": event.pid,
        "at": event.at.isoformat(),
    }
