"""The manager's refusals before it serves anything: loopback rules, token checks, redis-server.

In-process (typer's CliRunner), no sockets: the command stops before it would listen.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from servetune.cli import app
from servetune.manager.auth import (
    TokenRequired,
    bearer_of,
    check_bind,
    is_loopback,
    subprotocol_token,
    token_matches,
)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"])
def test_loopback_hosts_need_no_token(host: str) -> None:
    assert is_loopback(host)
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "gpu-box.example", ""])
def test_other_hosts_need_a_token(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(TokenRequired, match=r"SERVETUNE_API_TOKEN.*--token-file"):
        check_bind(host, None)
    check_bind(host, SecretStr("t"))


def test_token_parsing_and_comparison() -> None:
    token = SecretStr("abc")
    assert bearer_of([(b"Authorization", b"Bearer abc")]) == "abc"
    assert bearer_of([(b"authorization", b"bearer  abc ")]) == "abc"
    assert bearer_of([(b"authorization", b"Basic abc")]) is None
    assert subprotocol_token({"subprotocols": ["json", "bearer.abc"]}) == "abc"
    assert token_matches("abc", token)
    assert not token_matches("abd", token) and not token_matches(None, token)
    assert not token_matches("ab", token)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SERVETUNE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("SERVETUNE_API_TOKEN", raising=False)
    monkeypatch.delenv("SERVETUNE_REDIS_URL", raising=False)
    return tmp_path


def test_manager_refuses_to_listen_beyond_loopback_without_a_token(env: Path) -> None:
    run = CliRunner().invoke(app, ["manager", "--host", "0.0.0.0", "--port", "1"])
    assert run.exit_code == 1
    assert "SERVETUNE_API_TOKEN" in run.output and "--token-file" in run.output


def test_an_empty_token_file_is_refused(env: Path) -> None:
    empty = env / "token"
    empty.write_text("\n")
    run = CliRunner().invoke(
        app, ["manager", "--host", "0.0.0.0", "--port", "1", "--token-file", str(empty)]
    )
    assert run.exit_code == 1 and "is empty" in run.output


def test_manager_without_redis_server_on_path_says_how_to_get_one(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(env / "empty-bin"))
    run = CliRunner().invoke(app, ["manager", "--port", "1"])
    assert run.exit_code == 1
    assert "apt-get install redis-server" in " ".join(run.output.split())
    assert "--redis URL" in run.output
