"""Redis connections against a private redis-server: a restart costs a delay, not an error; an
unreachable Redis or a wrong password gives RedisUnavailable with the URL masked and a fix.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest

from servetune.cluster.queue import arq_pool
from servetune.cluster.redis import connect, connect_sync
from servetune.cluster.registry import Registry
from servetune.errors import RedisUnavailable
from servetune.settings import Settings
from tests.redis_server import RedisServer, free_port, redis_server

pytestmark = pytest.mark.integration


async def _restart_later(server: RedisServer, down_s: float) -> None:
    await asyncio.sleep(down_s)
    await asyncio.to_thread(server.start)


def test_a_command_issued_while_redis_restarts_succeeds_once_it_is_back(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> tuple[list[bytes | None], float]:
        used = connect(private_redis.url)  # holds a pooled connection that Redis's death breaks
        fresh = connect(private_redis.url)  # has to connect while Redis is down
        try:
            await used.set("before", "1")
            private_redis.kill()
            restart = asyncio.create_task(_restart_later(private_redis, 1.0))
            t0 = time.monotonic()
            await asyncio.gather(used.set("during", "2"), fresh.set("fresh", "3"))
            waited_s = time.monotonic() - t0
            await restart
            return [await used.get("during"), await fresh.get("fresh")], waited_s
        finally:
            await used.aclose()
            await fresh.aclose()

    with caplog.at_level(logging.INFO, logger="servetune.cluster.redis"):
        values, waited_s = asyncio.run(scenario())
    assert values == [b"2", b"3"]
    assert 0.9 < waited_s < 4.0
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    port = f"127.0.0.1:{private_redis.port}"
    warned = [m for lv, m in said if lv == logging.WARNING]
    assert warned and all(port in m and "unreachable" in m for m in warned)
    assert any(lv == logging.INFO and "reachable again" in m for lv, m in said)


def test_the_sync_client_also_rides_out_a_restart(private_redis: RedisServer) -> None:
    r = connect_sync(private_redis.url)
    r.set("k", "v")
    private_redis.kill()
    restart = threading.Timer(1.0, private_redis.start)
    restart.start()
    try:
        assert r.set("k", "w") is True
        assert r.get("k") == b"w"
    finally:
        restart.join()
        r.close()


def test_an_unreachable_redis_gives_redis_unavailable_with_the_url_masked(tmp_path: Path) -> None:
    url = f"redis://:topsecret@127.0.0.1:{free_port()}/0"
    settings = Settings(data_dir=tmp_path)

    async def scenario() -> None:
        r = connect(url, retry_for_s=0.3)
        try:
            await Registry(r, settings).workers()
        finally:
            await r.aclose()

    with pytest.raises(RedisUnavailable) as info:
        asyncio.run(scenario())
    text = str(info.value)
    assert "topsecret" not in text and ":***@127.0.0.1" in text
    assert "redis-server running" in text and "listing workers" in text


def test_a_wrong_password_says_so(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis", password="right-one") as server:
        wrong = server.url.replace("right-one", "wrong-one")
        with pytest.raises(RedisUnavailable) as info:
            asyncio.run(arq_pool(wrong))
        text = str(info.value)
        assert "wrong-one" not in text and "right-one" not in text
        assert "password" in text and "requirepass" in text

        async def good() -> bool:
            pool = await arq_pool(server.url)
            try:
                return bool(await pool.ping())
            finally:
                await pool.aclose()

        assert asyncio.run(good())
