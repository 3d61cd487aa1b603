"""The trial events stream against a private redis-server: unacknowledged entries come back after a
restart of the reader, acknowledged ones never; a dead consumer's entries can be claimed; broken
entries are handed back as None and logged; a Redis restart loses the group, the reader makes it
again and keeps reading.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis.asyncio

from servetune.cluster import keys
from servetune.cluster.events import EventReader, publish_study, send_event
from servetune.cluster.models import TrialEvent, TrialEventKind
from servetune.cluster.redis import connect
from servetune.core.study import FailureKind, TrialResult, TrialState
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

T = TypeVar("T")


def _event(trial_id: int, kind: TrialEventKind = TrialEventKind.PHASE) -> TrialEvent:
    result = None
    if kind is TrialEventKind.RESULT:
        result = TrialResult(
            state=TrialState.FAIL, failure_kind=FailureKind.CANCELLED, failure_reason="aborted"
        )
    return TrialEvent(
        kind=kind,
        job_id=f"trial-{trial_id}-1",
        study_id=1,
        trial_id=trial_id,
        number=trial_id,
        worker_id="w1",
        phase="benchmarking" if kind is TrialEventKind.PHASE else None,
        result=result,
    )


def _run(url: str, scenario: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        r = connect(url)
        try:
            return await scenario(r)
        finally:
            await r.aclose()

    return asyncio.run(main())


def test_an_event_is_read_as_the_same_event_and_once_acked_is_never_read_again(
    private_redis: RedisServer,
) -> None:
    async def scenario(r: redis.asyncio.Redis) -> None:
        sent = _event(5, TrialEventKind.RESULT)
        entry_id = await send_event(r, sent)
        reader = EventReader(r, "manager-a")
        [(read_id, event, raw)] = await reader.read(block_ms=100)
        assert (read_id, event) == (entry_id, sent)
        assert TrialEvent.model_validate_json(raw) == sent
        await reader.ack(read_id)
        await reader.ack(read_id)  # twice is harmless
        assert await reader.read(block_ms=50) == []
        assert await EventReader(r, "manager-a").read(block_ms=50) == []  # restarted: nothing

    _run(private_redis.url, scenario)


def test_events_written_before_any_manager_read_them_are_delivered(
    private_redis: RedisServer,
) -> None:
    async def scenario(r: redis.asyncio.Redis) -> list[int]:
        for n in range(3):
            await send_event(r, _event(n))
        entries = await EventReader(r, "manager-a").read(block_ms=100)
        return [e.trial_id for _, e, _ in entries if e is not None]

    assert _run(private_redis.url, scenario) == [0, 1, 2]


def test_an_entry_read_but_not_acked_comes_back_first_after_the_reader_restarts(
    private_redis: RedisServer,
) -> None:
    async def scenario(r: redis.asyncio.Redis) -> list[list[int]]:
        for n in (1, 2, 3):
            await send_event(r, _event(n))
        first = EventReader(r, "manager-a")
        entries = await first.read(block_ms=100)
        await first.ack(entries[0][0])  # 1 stored; 2 and 3 read, then the manager died
        await send_event(r, _event(4))
        again = EventReader(r, "manager-a")
        rounds = []
        for _ in range(3):
            batch = await again.read(block_ms=100, count=1)
            rounds.append([e.trial_id for _, e, _ in batch if e is not None])
            for entry_id, _, _ in batch:
                await again.ack(entry_id)
        return rounds

    assert _run(private_redis.url, scenario) == [[2], [3], [4]]


def test_claim_stale_takes_over_the_entries_of_a_dead_consumer(private_redis: RedisServer) -> None:
    async def scenario(r: redis.asyncio.Redis) -> tuple[list[int], list[int], int]:
        await send_event(r, _event(1))
        await send_event(r, _event(2))
        dead = EventReader(r, "manager-dead")
        assert len(await dead.read(block_ms=100)) == 2  # never acked: it was killed
        alive = EventReader(r, "manager-alive")
        assert await alive.claim_stale(min_idle_ms=60_000) == []  # not idle long enough
        await asyncio.sleep(0.15)
        claimed = await alive.claim_stale(min_idle_ms=100)
        for entry_id, _, _ in claimed:
            await alive.ack(entry_id)
        left_for_dead = await EventReader(r, "manager-dead").read(block_ms=50)
        pending = await r.xpending(keys.EVENTS, keys.EVENTS_GROUP)
        return (
            [e.trial_id for _, e, _ in claimed if e is not None],
            [e.trial_id for _, e, _ in left_for_dead if e is not None],
            pending["pending"],
        )

    assert _run(private_redis.url, scenario) == ([1, 2], [], 0)


def test_an_entry_that_is_not_a_trial_event_gives_none_and_is_logged(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(r: redis.asyncio.Redis) -> list[tuple[bool, bytes]]:
        await r.xadd(keys.EVENTS, {b"event": b"{not json"})
        await r.xadd(keys.EVENTS, {b"event": json.dumps({"kind": "exploded"}).encode()})
        await r.xadd(keys.EVENTS, {b"other": b"1"})
        await send_event(r, _event(7))
        entries = await EventReader(r, "manager-a").read(block_ms=100)
        return [(event is None, raw) for _, event, raw in entries]

    with caplog.at_level(logging.ERROR, logger="servetune.cluster.events"):
        got = _run(private_redis.url, scenario)
    assert [none for none, _ in got] == [True, True, True, False]
    assert got[0][1] == b"{not json" and got[2][1] == b""
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3 and "not a valid TrialEvent" in logged[0]
    assert "no 'event' field" in logged[2]


def test_after_redis_restarts_the_reader_makes_the_group_again_and_keeps_reading(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(r: redis.asyncio.Redis) -> list[int]:
        reader = EventReader(r, "manager-a")
        await send_event(r, _event(1))
        [(entry_id, _, _)] = await reader.read(block_ms=100)
        await reader.ack(entry_id)
        private_redis.kill()
        restart = asyncio.create_task(asyncio.to_thread(private_redis.start))
        assert await reader.read(block_ms=100) == []  # waits for Redis, finds no group, makes it
        await restart
        await send_event(r, _event(2))
        return [e.trial_id for _, e, _ in await reader.read(block_ms=100) if e is not None]

    with caplog.at_level(logging.WARNING, logger="servetune.cluster.events"):
        assert _run(private_redis.url, scenario) == [2]
    assert any("creating it again" in r.getMessage() for r in caplog.records)


def test_publish_study_reaches_a_live_subscriber(private_redis: RedisServer) -> None:
    async def scenario(r: redis.asyncio.Redis) -> object:
        pubsub = r.pubsub()
        try:
            await pubsub.subscribe(keys.study_live(4))
            await pubsub.get_message(timeout=1)  # the subscribe confirmation
            await publish_study(r, 4, {"type": "study", "status": "running"})
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
            assert message is not None
            return json.loads(message["data"])
        finally:
            await pubsub.aclose()

    assert _run(private_redis.url, scenario) == {"type": "study", "status": "running"}
