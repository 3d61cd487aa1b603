"""The private Redis survives a manager crash: same URL after a restart, its data still there.

Real `servetune manager` processes (no --redis), killed with SIGKILL; real redis-server children.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from servetune.manager.redis_launcher import start_private_redis
from tests.redis_server import free_port

pytestmark = pytest.mark.integration


def _start_manager(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, SERVETUNE_DATA_DIR=str(data_dir))
    env.pop("SERVETUNE_REDIS_URL", None)
    env.pop("SERVETUNE_API_TOKEN", None)
    argv = [sys.executable, "-m", "servetune", "manager", "--port", str(port)]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)


def _wait_gone(url: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping()
        except redis.ConnectionError:
            return
        assert time.monotonic() < deadline, "the private redis-server outlived its manager"
        time.sleep(0.1)


def test_a_killed_manager_comes_back_on_the_same_redis_url_with_its_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    url_file = data_dir / "redis" / "url"
    log_path = tmp_path / "manager.log"
    proc = _start_manager(data_dir, free_port(), log_path)
    url = url_file.read_text().strip()
    try:
        r = redis.Redis.from_url(url)
        entry_id = r.xadd(b"servetune:test:results", {b"trial": b"1"})
        r.close()
        time.sleep(1.2)  # appendfsync everysec
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    _wait_gone(url)
    proc = _start_manager(data_dir, free_port(), log_path)
    try:
        assert url_file.read_text().strip() == url
        assert url_file.stat().st_mode & 0o777 == 0o600
        r = redis.Redis.from_url(url)
        entries: list[Any] = r.xrange(b"servetune:test:results")  # type: ignore[assignment]
        r.close()
        assert [(e[0], e[1]) for e in entries] == [(entry_id, {b"trial": b"1"})]
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_taken_port_gives_a_new_one_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    folder = tmp_path / "data" / "redis"
    folder.mkdir(parents=True)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        (folder / "url").write_text(f"redis://:pw-old@127.0.0.1:{taken}/0\n")

        async def scenario() -> str:
            private = await start_private_redis(tmp_path / "data")
            await private.stop()
            return private.url

        with caplog.at_level("WARNING"):
            url = asyncio.run(scenario())
    assert url.startswith("redis://:pw-old@127.0.0.1:") and f":{taken}/" not in url
    assert f"port {taken}" in caplog.text and "taken" in caplog.text
