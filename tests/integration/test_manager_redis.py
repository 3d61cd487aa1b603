"""The manager's private redis-server: loopback only, a password, files only in DATA_DIR/redis.

Real redis-server processes; each test starts its own.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis

from servetune.manager.app import create_app
from servetune.manager.redis_launcher import start_private_redis
from tests.integration.manager_helpers import ScriptedSupervisor, manager_settings

pytestmark = pytest.mark.integration


def test_private_redis_needs_its_password_and_stops(tmp_path: Path) -> None:
    async def scenario() -> None:
        private = await start_private_redis(tmp_path / "data")
        try:
            assert private.url.startswith("redis://:") and "@127.0.0.1:" in private.url
            client = redis.Redis.from_url(private.url)
            assert client.ping()
            assert client.config_get("save")["save"] == ""
            assert client.config_get("appendonly")["appendonly"] == "yes"
            assert client.config_get("appendfsync")["appendfsync"] == "everysec"
            client.close()
            port = int(private.url.rsplit(":", 1)[1].split("/")[0])
            anonymous = redis.Redis(host="127.0.0.1", port=port)
            with pytest.raises(redis.AuthenticationError):
                anonymous.ping()
            anonymous.close()
            assert "--requirepass" not in " ".join(map(str, private.proc.args))
            url_file = tmp_path / "data" / "redis" / "url"
            assert url_file.read_text().strip() == private.url
            assert url_file.stat().st_mode & 0o777 == 0o600
        finally:
            await private.stop()
        assert private.proc.poll() is not None
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["redis"]
        names = sorted(p.name for p in (tmp_path / "data" / "redis").iterdir())
        assert names == ["appendonlydir", "redis.log", "url"]

    asyncio.run(scenario())


def test_a_manager_without_a_redis_url_runs_its_own(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    app = create_app(manager_settings(tmp_path, None), supervisor_factory=ScriptedSupervisor)
    with TestClient(app) as c:
        assert c.get("/api/health").json()["redis"] is True
        private_url = c.app.state.manager.settings.redis_url  # type: ignore[attr-defined]
        assert private_url is not None and private_url.startswith("redis://:")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(private_url, socket_timeout=1).ping()
