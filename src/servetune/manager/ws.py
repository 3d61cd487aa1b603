"""The manager's WebSockets: a study's live trial changes, and a worker's live log lines.

Both close cleanly when the client goes away (the pub/sub subscription is released at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import AwareDatetime, TypeAdapter, ValidationError

from servetune.cluster import keys
from servetune.cluster.logs import level_no, parse_live, passes, read_logs
from servetune.cluster.models import LogRecord
from servetune.cluster.tasks import cancel_and_wait
from servetune.errors import StudyNotFound
from servetune.manager.auth import SUBPROTOCOL_PREFIX
from servetune.manager.deps import ManagerState, manager_state
from servetune.manager.schemas import StudyPublic, TrialPublic

log = logging.getLogger(__name__)

router = APIRouter(tags=["websockets"])

CLOSE_NOT_FOUND = 4404
"""Close code when the study does not exist (the reason says so)."""
CLOSE_BAD_REQUEST = 1008
"""Close code (policy violation) for a bad path or query value; the reason names it and the fix."""
REASON_MAX_BYTES = 123
"""The longest close reason a WebSocket close frame carries, bytes (UTF-8)."""

_AWARE = TypeAdapter(AwareDatetime)


async def _refuse(ws: WebSocket, reason: str) -> None:
    """Close an accepted socket with ``CLOSE_BAD_REQUEST`` and ``reason`` (cut to fit)."""
    cut = reason.encode()[:REASON_MAX_BYTES].decode(errors="ignore")
    await ws.close(code=CLOSE_BAD_REQUEST, reason=cut)


async def _accept(ws: WebSocket) -> None:
    """Accept, choosing the ``bearer.…`` subprotocol when the client offered it (browsers fail
    a connection whose offered subprotocol is not chosen)."""
    offered = [p for p in ws.scope.get("subprotocols") or [] if p.startswith(SUBPROTOCOL_PREFIX)]
    await ws.accept(subprotocol=offered[0] if offered else None)


async def _until_disconnect(ws: WebSocket, work: Awaitable[None]) -> None:
    """Run ``work`` until it ends or the client disconnects, whichever comes first.

    Once the client is gone, errors of ``work`` (a send on the closed socket) are dropped;
    otherwise they propagate.
    """

    async def wait_disconnect() -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return

    worker = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait([worker, watcher], return_when=asyncio.FIRST_COMPLETED)
        if worker.done() and not watcher.done():
            exc = worker.exception()
            if exc is not None and not isinstance(exc, WebSocketDisconnect):
                raise exc
    finally:
        await cancel_and_wait((worker, watcher), 5.0, grace_s=0.5)


def _snapshot(state: ManagerState, study_id: int) -> dict[str, Any]:
    store = state.store
    record = store.get_study(study_id)
    workers = store.trial_workers(study_id)
    trials = [
        TrialPublic(**dict(t), worker_id=workers.get(t.id) if t.id else None)
        for t in store.list_trials(study_id)
    ]
    return {
        "type": "snapshot",
        "study": StudyPublic.of(record, state.supervisor.running()).model_dump(mode="json"),
        "trials": [t.model_dump(mode="json") for t in trials],
    }


FINAL_STATUSES = ("finished", "failed", "cancelled", "interrupted")
"""Study statuses after which the study's live stream closes (1000)."""


@router.websocket("/ws/studies/{study_ref}")
async def study_updates(ws: WebSocket, study_ref: str) -> None:
    """First ``{"type": "snapshot", "study": …, "trials": […]}``, then the supervisor's live
    messages (``trial``, ``phase``, ``study``…) as they happen, until a ``study`` message with
    a final status; then a normal close. A study not running here gets the snapshot and a
    normal close; an unknown one a close with code 4404; an id that is not a number a close
    with code 1008 and the reason."""
    state = manager_state(ws)
    await _accept(ws)
    if not study_ref.isascii() or not study_ref.isdigit() or len(study_ref) > 18:
        await _refuse(
            ws, f"study id {study_ref[:40]!r} is not a number; GET /api/studies lists ids"
        )
        return
    study_id = int(study_ref)
    updates = state.supervisor.subscribe(study_id)
    try:
        try:
            await anext(aiter(updates))  # the stored status: subscribed from here on
            snapshot = await asyncio.to_thread(_snapshot, state, study_id)
        except (StudyNotFound, StopAsyncIteration) as e:
            await ws.close(code=CLOSE_NOT_FOUND, reason=str(e)[:120] or "no such study")
            return
        await ws.send_json(snapshot)
        if study_id not in state.supervisor.running():
            await ws.close()
            return

        async def forward() -> None:
            async for message in updates:
                await ws.send_json(message)
                if message.get("type") == "study" and message.get("status") in FINAL_STATUSES:
                    break
            await ws.close()  # the study ended: a normal close (1000)

        await _until_disconnect(ws, forward())
    finally:
        aclose = getattr(updates, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def _records(data: bytes | str) -> list[LogRecord]:
    """The log records of one live-channel message (``parse_live``); [] for one that is not a
    JSON list of log records (logged)."""
    try:
        return parse_live(data)
    except ValidationError as e:
        log.warning("dropped a live log message that is not a list of log records: %s", e)
        return []


@router.websocket("/ws/workers/{worker_id}/logs")
async def worker_logs(ws: WebSocket, worker_id: str) -> None:
    """First ``{"type": "logs", "records": [recent…]}``, then one ``logs`` message per batch
    shipped by the worker, and ``{"type": "ping"}`` every 20 s while quiet.

    Query ``level`` (DEBUG … CRITICAL, any case) and ``since`` (an aware ISO time: write ``Z``
    or ``%2B00:00`` for +00:00) filter the recent and the live records as on
    GET /api/workers/{id}/logs; a bad value closes the socket with code 1008 and the reason.
    """

    state = manager_state(ws)
    await _accept(ws)
    level = ws.query_params.get("level")
    since_text = ws.query_params.get("since")
    try:
        min_level = level_no(level)
        since: datetime | None = None
        if since_text is not None:
            try:
                since = _AWARE.validate_python(since_text)
            except ValidationError as e:
                raise ValueError(
                    f"since: {since_text[:40]!r} is not a time with a zone; write e.g. "
                    "2026-01-01T12:00:00Z (Z or %2B00:00 for +00:00)"
                ) from e
    except ValueError as e:
        await _refuse(ws, str(e))
        return

    pubsub = state.redis.pubsub()
    try:
        await pubsub.subscribe(keys.worker_logs_live(worker_id))
        recent = await read_logs(state.redis, worker_id, level=level, since=since)
        await ws.send_json({"type": "logs", "records": [r.model_dump(mode="json") for r in recent]})

        async def forward() -> None:
            loop = asyncio.get_running_loop()
            last_sent = loop.time()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    records = [
                        r.model_dump(mode="json")
                        for r in _records(message["data"])
                        if passes(r, min_level, since)
                    ]
                    if records:
                        await ws.send_json({"type": "logs", "records": records})
                        last_sent = loop.time()
                if loop.time() - last_sent >= state.ws_ping_s:
                    await ws.send_json({"type": "ping"})
                    last_sent = loop.time()

        await _until_disconnect(ws, forward())
    finally:
        with contextlib.suppress(Exception):
            await pubsub.unsubscribe()
        with contextlib.suppress(Exception):
            await pubsub.aclose()
