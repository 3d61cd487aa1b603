"""A Redis that refuses authentication, and bad --redis/--db options: fail at once, one line.

Real redis-server with a password, real `servetune manager` and `servetune worker` processes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from servetune.cluster.redis import connect, connect_sync, redis_errors
from servetune.errors import RedisUnavailable
from tests.redis_server import RedisServer, free_port

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-pw"
FAST_S = 3.0
"""A refused password must fail well within this, s (the retry budget is 30 s)."""


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server that requires ``PASSWORD``."""
    server = RedisServer(tmp_path / "redis", password=PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _no_password_url(server: RedisServer) -> str:
    return f"redis://127.0.0.1:{server.port}/0"


def _run(
    argv: list[str], tmp_path: Path, timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SERVETUNE_DATA_DIR=str(tmp_path / "data"))
    env.pop("SERVETUNE_REDIS_URL", None)
    env.pop("SERVETUNE_DB_URL", None)
    command = [sys.executable, "-m", "servetune", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)  # noqa: S603


def test_async_client_fails_at_once_on_noauth(locked_redis: RedisServer) -> None:
    async def scenario() -> None:
        r = connect(_no_password_url(locked_redis), retry_for_s=30)
        try:
            with redis_errors(r, "reading"):
                await r.set(b"k", b"v")
        finally:
            await r.aclose()

    start = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"refused to authenticate.*put the password"):
        asyncio.run(scenario())
    assert time.monotonic() - start < FAST_S


def test_async_client_fails_at_once_on_wrong_password(locked_redis: RedisServer) -> None:
    async def scenario() -> None:
        r = connect(f"redis://:wrong@127.0.0.1:{locked_redis.port}/0", retry_for_s=30)
        try:
            await r.ping()
        finally:
            await r.aclose()

    start = time.monotonic()
    with pytest.raises(redis.AuthenticationError):
        asyncio.run(scenario())
    assert time.monotonic() - start < FAST_S


def test_sync_client_fails_at_once_on_noauth(locked_redis: RedisServer) -> None:
    r = connect_sync(_no_password_url(locked_redis), retry_for_s=30)
    start = time.monotonic()
    with (
        pytest.raises(RedisUnavailable, match="refused to authenticate"),
        redis_errors(r, "shipping logs"),
    ):
        r.xadd(b"s", {b"a": b"1"})
    assert time.monotonic() - start < FAST_S
    r.close()


def test_manager_exits_3_with_one_line_on_noauth(locked_redis: RedisServer, tmp_path: Path) -> None:
    url = _no_password_url(locked_redis)
    done = _run(["manager", "--redis", url, "--port", str(free_port())], tmp_path)
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--redis" in lines[0] and "refused to authenticate" in lines[0]


def test_manager_bad_redis_url_is_one_line(tmp_path: Path) -> None:
    done = _run(["manager", "--redis", "garbage://x", "--port", str(free_port())], tmp_path)
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--redis" in lines[0] and "redis://" in lines[0]
    assert "Traceback" not in done.stderr and "startup failed" not in done.stderr


def test_manager_bad_db_url_is_one_line(locked_redis: RedisServer, tmp_path: Path) -> None:
    argv = ["manager", "--redis", locked_redis.url, "--db", "foo://bar", "--port", str(free_port())]
    done = _run(argv, tmp_path)
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--db" in lines[0] and "sqlite:///" in lines[0]


def test_worker_exits_1_with_one_line_on_noauth(locked_redis: RedisServer, tmp_path: Path) -> None:
    start = time.monotonic()
    done = _run(["worker", "--redis", _no_password_url(locked_redis)], tmp_path)
    assert done.returncode == 1
    assert time.monotonic() - start < 15
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert "refused to authenticate" in lines[0]
