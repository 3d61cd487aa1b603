"""Remote log sync against a real private redis-server: handler → stream + live channel → read_logs.

Includes the outage test: Redis killed and restarted under the handler, which must not block.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from servetune.cluster import keys
from servetune.cluster.logs import (
    EngineLogTailer,
    RedisLogHandler,
    log_context,
    parse_live,
    read_logs,
)
from servetune.cluster.models import LogRecord, LogSource
from servetune.settings import Settings
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path, **fields: Any) -> Settings:
    return Settings(data_dir=tmp_path, **fields)


def _read(url: str, worker_id: str, **filters: Any) -> list[LogRecord]:
    async def go() -> list[LogRecord]:
        r = redis.asyncio.Redis.from_url(url)
        try:
            return await read_logs(r, worker_id, **filters)
        finally:
            await r.aclose()

    return asyncio.run(go())


def _wait_for(
    url: str, worker_id: str, ok: Callable[[list[LogRecord]], bool], timeout_s: float = 5.0
) -> list[LogRecord]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = _read(url, worker_id, limit=1000)
        if ok(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.02)


@pytest.fixture
def loggers() -> Iterator[Callable[[str], logging.Logger]]:
    """Fresh loggers (DEBUG, not propagating to pytest's capture); handlers removed afterwards."""
    made: list[logging.Logger] = []

    def make(name: str) -> logging.Logger:
        log = logging.getLogger(name)
        log.setLevel(logging.DEBUG)
        log.propagate = False
        made.append(log)
        return log

    yield make
    for log in made:
        for handler in list(log.handlers):
            log.removeHandler(handler)
        log.propagate = True
        log.setLevel(logging.NOTSET)


def test_records_reach_the_stream_and_the_live_channel(
    private_redis: RedisServer, tmp_path: Path, loggers: Callable[[str], logging.Logger]
) -> None:
    worker_id = "w-" + uuid.uuid4().hex[:8]
    settings = _settings(tmp_path, worker_log_maxlen=50, worker_log_ttl_s=600)
    live = private_redis.client().pubsub()
    live.subscribe(keys.worker_logs_live(worker_id))
    assert live.get_message(timeout=1)["type"] == "subscribe"
    handler = RedisLogHandler(private_redis.url, worker_id, settings)
    worker_log = loggers("servetune.test_worker")
    bench_log = loggers("servetune.bench.test")
    deploy_log = loggers("servetune.deploy.test")
    for log in (worker_log, bench_log, deploy_log):
        log.addHandler(handler)
    try:
        worker_log.info("worker up on %s", "hôst-1\udcff")  # an undecodable byte, kept as '?'
        with log_context(study_id=3, trial_id=7, trial_number=2):
            worker_log.debug("trial line %d", 1)
            bench_log.warning("slow request")
            try:
                raise RuntimeError("engine gone")
            except RuntimeError:
                deploy_log.exception("stopping failed")
        records = _wait_for(private_redis.url, worker_id, lambda rs: len(rs) == 4)

        assert [(r.level, r.message.splitlines()[0], r.source) for r in records] == [
            ("INFO", "worker up on hôst-1?", LogSource.WORKER),
            ("DEBUG", "trial line 1", LogSource.TRIAL),
            ("WARNING", "slow request", LogSource.BENCHMARK),
            ("ERROR", "stopping failed", LogSource.DEPLOYMENT),
        ]
        assert "RuntimeError: engine gone" in records[3].message  # the traceback travels too
        assert {r.worker_id for r in records} == {worker_id}
        assert [(r.study_id, r.trial_id, r.trial_number) for r in records] == [
            (None, None, None),
            *[(3, 7, 2)] * 3,
        ]
        assert records[2].logger == "servetune.bench.test" and records[2].levelno == 30
        assert all(r.at.utcoffset() == timedelta(0) for r in records)

        # the live channel carried the same records, as JSON lists
        seen: list[LogRecord] = []
        deadline = time.monotonic() + 5
        while len(seen) < 4 and time.monotonic() < deadline:
            message = live.get_message(timeout=0.5)
            if message and message["type"] == "message":
                seen += parse_live(message["data"])
        assert seen == records

        # the stream expires after the configured silence, and keeps exactly the newest maxlen
        client = private_redis.client()
        assert 590_000 < client.pttl(keys.worker_logs(worker_id)) <= 600_000
        for i in range(120):
            worker_log.info("line %d", i)
        records = _wait_for(
            private_redis.url, worker_id, lambda rs: bool(rs) and rs[-1].message == "line 119"
        )
        assert client.xlen(keys.worker_logs(worker_id)) == 50
        assert [r.message for r in records] == [f"line {i}" for i in range(70, 120)]
        assert handler.dropped == 0
    finally:
        handler.close()
        live.close()


def test_read_logs_filters_and_order(
    private_redis: RedisServer, tmp_path: Path, loggers: Callable[[str], logging.Logger]
) -> None:
    worker_id = "w-" + uuid.uuid4().hex[:8]
    handler = RedisLogHandler(private_redis.url, worker_id, _settings(tmp_path))
    log = loggers("servetune.test_read")
    log.addHandler(handler)
    try:
        for i in range(20):
            with log_context(study_id=1, trial_id=100 + i % 2, trial_number=i % 2):
                log.log(logging.WARNING if i % 5 == 0 else logging.INFO, "early %d", i)
        early = _wait_for(private_redis.url, worker_id, lambda rs: len(rs) == 20)
        time.sleep(0.05)
        log.error("late 0")
        log.info("late 1")
        _wait_for(private_redis.url, worker_id, lambda rs: len(rs) == 22)
    finally:
        handler.close()
    url = private_redis.url

    newest = _read(url, worker_id, limit=5)
    assert [r.message for r in newest] == ["early 17", "early 18", "early 19", "late 0", "late 1"]
    warnings = _read(url, worker_id, level="warning")
    assert [r.message for r in warnings] == ["early 0", "early 5", "early 10", "early 15", "late 0"]
    of_trial = _read(url, worker_id, trial_id=101)
    assert [r.message for r in of_trial] == [f"early {i}" for i in range(1, 20, 2)]
    since = early[-1].at + timedelta(milliseconds=1)
    assert [r.message for r in _read(url, worker_id, since=since)] == ["late 0", "late 1"]
    assert _read(url, worker_id, since=since, level="ERROR", limit=1)[0].message == "late 0"
    assert _read(url, "nobody") == []

    with pytest.raises(ValueError, match="limit"):
        _read(url, worker_id, limit=1001)
    with pytest.raises(ValueError, match="limit"):
        _read(url, worker_id, limit=0)
    with pytest.raises(ValueError, match="level: 'loud'"):
        _read(url, worker_id, level="loud")
    with pytest.raises(ValueError, match=r"since: .* no time zone"):
        _read(url, worker_id, since=since.replace(tzinfo=None))


def test_redis_down_costs_the_caller_nothing_and_drops_are_reported(
    private_redis: RedisServer, tmp_path: Path, loggers: Callable[[str], logging.Logger]
) -> None:
    worker_id = "w-" + uuid.uuid4().hex[:8]
    settings = _settings(tmp_path, log_queue_max=200, worker_log_maxlen=5000)
    handler = RedisLogHandler(private_redis.url, worker_id, settings, max_backoff_s=0.2)
    log = loggers("servetune.test_outage")
    log.addHandler(handler)
    try:
        log.info("before")
        _wait_for(private_redis.url, worker_id, lambda rs: len(rs) == 1)
        private_redis.kill()

        durations_ns = []
        for i in range(3000):
            started = time.perf_counter_ns()
            log.info("down %d", i)
            durations_ns.append(time.perf_counter_ns() - started)
            if i % 500 == 0:
                time.sleep(0.1)  # let the shipper find Redis gone while records keep coming
        durations_ns.sort()
        p99_ms = durations_ns[int(len(durations_ns) * 0.99)] / 1e6
        assert p99_ms < 1.0, f"emit p99 {p99_ms:.3f} ms while Redis is down"
        assert handler.dropped >= 3000 - 200 - 500  # at most the queue and one batch survive
        assert handler._thread.is_alive()

        private_redis.start()  # empty again: nothing persisted
        records = _wait_for(
            private_redis.url,
            worker_id,
            lambda rs: any(r.message.startswith("dropped") for r in rs),
        )
        warnings = [r for r in records if r.message.startswith("dropped")]
        assert len(warnings) == 1, [r.message for r in records[-5:]]
        warning = warnings[0]
        assert warning.level == "WARNING" and warning.source == LogSource.WORKER
        dropped = int(warning.message.split()[1])
        assert warning.message == f"dropped {dropped} log records while Redis was unreachable"
        assert dropped == handler.dropped
        # every record logged while Redis was down is either stored or counted in the warning
        stored_down = [r for r in records if r.message.startswith("down ")]
        assert len(stored_down) + dropped == 3000
        # what survived kept its order, and the warning comes after the backlog it accounts for
        numbers = [int(r.message.split()[1]) for r in stored_down]
        assert numbers == sorted(numbers)
        assert records.index(warning) > records.index(stored_down[-1])
        log.info("after")  # and shipping goes on as before
        after = _wait_for(private_redis.url, worker_id, lambda rs: rs[-1].message == "after")
        assert after[-1].message == "after" and handler.dropped == dropped
    finally:
        handler.close()


def test_a_full_queue_is_reported_once_it_drains(
    private_redis: RedisServer, tmp_path: Path, loggers: Callable[[str], logging.Logger]
) -> None:
    worker_id = "w-" + uuid.uuid4().hex[:8]
    settings = _settings(tmp_path, log_queue_max=10, worker_log_maxlen=1000)
    handler = RedisLogHandler(private_redis.url, worker_id, settings)
    log = loggers("servetune.test_full")
    log.addHandler(handler)
    try:
        for i in range(300):  # far faster than one round trip per 10 records
            log.info("burst %d", i)
        records = _wait_for(
            private_redis.url,
            worker_id,
            lambda rs: bool(rs) and rs[-1].message.startswith("dropped"),
        )
    finally:
        handler.close()
    kept = [r for r in records if r.message.startswith("burst")]
    assert records[-1].message == (
        f"dropped {300 - len(kept)} log records: the in-memory log queue was full "
        "(log_queue_max=10; records were logged faster than shipped)"
    )
    assert 10 <= len(kept) < 300 and handler.dropped == 300 - len(kept)


def test_close_ships_what_is_queued_and_is_bounded_when_redis_is_gone(
    private_redis: RedisServer, tmp_path: Path, loggers: Callable[[str], logging.Logger]
) -> None:
    worker_id = "w-" + uuid.uuid4().hex[:8]
    settings = _settings(tmp_path, worker_log_maxlen=5000)
    handler = RedisLogHandler(private_redis.url, worker_id, settings)
    log = loggers("servetune.test_close")
    log.addHandler(handler)
    for i in range(1500):
        log.info("queued %d", i)
    handler.close()
    assert private_redis.client().xlen(keys.worker_logs(worker_id)) == 1500

    handler = RedisLogHandler(private_redis.url, worker_id, settings, flush_timeout_s=1.0)
    private_redis.kill()
    log.addHandler(handler)
    for i in range(100):
        log.info("lost %d", i)
    started = time.monotonic()
    handler.close()
    assert time.monotonic() - started < 1.5


def test_engine_output_is_shipped_with_the_trial_context(
    private_redis: RedisServer, tmp_path: Path, loggers: Callable[[str], logging.Logger]
) -> None:
    worker_id = "w-" + uuid.uuid4().hex[:8]
    handler = RedisLogHandler(private_redis.url, worker_id, _settings(tmp_path))
    engine_log = loggers("servetune.engine")
    engine_log.addHandler(handler)
    path = tmp_path / "trial-4.log"

    async def trial() -> None:
        with log_context(study_id=5, trial_id=44, trial_number=4):
            tailer = EngineLogTailer(path, engine_log, poll_s=0.02).start()
        await asyncio.sleep(0.05)  # the engine has not written its log yet
        with path.open("wb") as f:
            f.write(b"main: loading model\nsrv: listening on 127.0.0.1:8080\nsrv: partial")
            f.flush()
            await asyncio.sleep(0.1)
            f.write(b" line done\nslot 0: exiting")  # the engine dies mid-line
        await tailer.stop()

    try:
        asyncio.run(trial())
        records = _wait_for(private_redis.url, worker_id, lambda rs: len(rs) == 4)
    finally:
        handler.close()
    assert [r.message for r in records] == [
        "main: loading model",
        "srv: listening on 127.0.0.1:8080",
        "srv: partial line done",
        "slot 0: exiting",
    ]
    assert {(r.source, r.study_id, r.trial_id, r.trial_number) for r in records} == {
        (LogSource.ENGINE, 5, 44, 4)
    }
    assert {r.logger for r in records} == {"servetune.engine"}


def test_redis_refusing_records_is_counted_and_reported(
    private_redis: RedisServer, tmp_path: Path, loggers: Callable[[str], logging.Logger]
) -> None:
    worker_id = "w-" + uuid.uuid4().hex[:8]
    client = private_redis.client()
    client.set(keys.worker_logs(worker_id), "not a stream")  # XADD answers WRONGTYPE
    handler = RedisLogHandler(private_redis.url, worker_id, _settings(tmp_path))
    log = loggers("servetune.test_refused")
    log.addHandler(handler)
    try:
        log.info("refused")
        deadline = time.monotonic() + 5
        while handler.dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert handler.dropped == 1
        client.delete(keys.worker_logs(worker_id))
        log.info("accepted")
        records = _wait_for(private_redis.url, worker_id, lambda rs: len(rs) == 2)
    finally:
        handler.close()
    assert records[0].message == "accepted"
    assert records[1].message.startswith("dropped 1 log records: Redis refused them (")
    assert "WRONGTYPE" in records[1].message
    with pytest.raises(redis.ResponseError):  # the reader's errors are redis-py's
        client.set(keys.worker_logs("x"), "s")
        _read(private_redis.url, "x")
