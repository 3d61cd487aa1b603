"""No secret reaches a log: `servetune manager -v` with a token, REST and WebSocket requests.

Real manager process on a real password-protected redis-server; its whole stderr is searched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from tests.redis_server import RedisServer, free_port

pytestmark = pytest.mark.integration

TOKEN = "tok-Zq8uXv3pLm"
REDIS_PASSWORD = "redis-Pw7kQ2"


def test_manager_verbose_log_shows_no_token_and_no_redis_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD)
    server.start()
    port = free_port()
    env = dict(os.environ, SERVETUNE_DATA_DIR=str(tmp_path / "data"), SERVETUNE_API_TOKEN=TOKEN)
    stderr_path = tmp_path / "manager.stderr"
    argv = [sys.executable, "-m", "servetune", "manager", "-v", "--redis", server.url]
    argv += ["--port", str(port)]
    try:
        with stderr_path.open("wb") as err:
            proc = subprocess.Popen(argv, env=env, stdout=err, stderr=subprocess.STDOUT)  # noqa: S603
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, stderr_path.read_text()
                try:
                    if httpx.get(f"{base}/api/studies", headers=auth, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, stderr_path.read_text()
                time.sleep(0.2)
            assert httpx.get(f"{base}/api/workers", headers=auth, timeout=5).status_code == 200
            ws_url = f"ws://127.0.0.1:{port}/ws/studies/999999"
            for headers, protocols in ((auth, None), ({}, [Subprotocol(f"bearer.{TOKEN}")])):
                try:
                    with connect(
                        ws_url, additional_headers=headers, subprotocols=protocols, open_timeout=5
                    ) as ws:
                        ws.recv(timeout=5)
                except (WebSocketException, TimeoutError):
                    pass  # no such study: the manager closes it; the handshake is what is logged
        finally:
            proc.terminate()
            proc.wait(20)
    finally:
        server.kill()
    logs = [stderr_path.read_text(errors="replace")]
    logs += [p.read_text(errors="replace") for p in (tmp_path / "data").rglob("*.log")]
    text = "\n".join(logs)
    assert "websockets" in text or "uvicorn" in text  # the debug lines were there to leak
    assert TOKEN not in text
    assert REDIS_PASSWORD not in text
