"""The manager's error handlers on WebSockets: a failure closes the socket with 1011 and a reason.

The real app of ``create_app`` (no lifespan needed), driven in-process by Starlette's TestClient.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from fastapi import WebSocket
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from servetune.errors import RedisUnavailable, StoreError, StudyNotFound
from servetune.manager.app import create_app
from servetune.settings import Settings

ERRORS: dict[str, Exception] = {
    "redis": redis.ConnectionError("Connection refused"),
    "unavailable": RedisUnavailable("Redis at redis://h:1/0 is unreachable"),
    "store": StoreError("the database is locked"),
    "missing": StudyNotFound("no study 7"),
}


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    app = create_app(Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0"))

    @app.websocket("/ws/fail/{kind}/{accepted}")
    async def fail(ws: WebSocket, kind: str, accepted: int) -> None:
        if accepted:
            await ws.accept()
        raise ERRORS[kind]

    @app.get("/api/fail")
    async def fail_http() -> None:
        raise RedisUnavailable("Redis at redis://h:1/0 is unreachable")

    return TestClient(app, raise_server_exceptions=True)


@pytest.mark.parametrize("accepted", [0, 1])
@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_an_error_on_a_websocket_closes_it_with_1011_and_the_reason(
    client: TestClient, kind: str, accepted: int
) -> None:
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        client.websocket_connect(f"/ws/fail/{kind}/{accepted}") as ws,
    ):
        ws.receive_json()
    assert closed.value.code == 1011  # internal error
    assert closed.value.reason
    assert closed.value.reason in str(ERRORS[kind]) or type(ERRORS[kind]).__name__ in (
        closed.value.reason
    )


def test_http_answers_are_unchanged(client: TestClient) -> None:
    answer = client.get("/api/fail")
    assert answer.status_code == 503
    assert "unreachable" in answer.json()["detail"]
