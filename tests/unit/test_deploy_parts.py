"""The pure parts of remote/deploy.py: the manager's Redis URL as a worker gets it through its
tunnel, and the manager's ssh address (``manager_ssh``) a forward tunnel goes to."""

from __future__ import annotations

from pathlib import Path

import pytest

from servetune.remote.deploy import _option_values, parse_manager_ssh, parse_redis_url
from servetune.remote.ssh import parse_ssh_command


def test_a_tunnel_end_keeps_the_password_db_and_scheme() -> None:
    endpoint = parse_redis_url("redis://:p%40ss:w@127.0.0.1:6390/3")
    assert (endpoint.host, endpoint.port, endpoint.db) == ("127.0.0.1", 6390, 3)
    assert endpoint.password == "p@ss:w"
    url = endpoint.url_at("127.0.0.1", 41000)
    assert url == "redis://:p%40ss%3Aw@127.0.0.1:41000/3"
    assert parse_redis_url(url).password == "p@ss:w"


def test_a_user_and_tls_survive_and_no_password_stays_none() -> None:
    assert parse_redis_url("rediss://app:pw@r.example:7000/0").url_at("10.0.0.1", 9) == (
        "rediss://app:pw@10.0.0.1:9/0"
    )
    plain = parse_redis_url("redis://localhost")
    assert (plain.port, plain.db, plain.password) == (6379, 0, None)
    assert plain.url_at("::1", 7) == "redis://[::1]:7/0"


@pytest.mark.parametrize(
    ("url", "says"),
    [("http://h:1/0", "redis://"), ("redis://:pw@/0", "no host"), ("redis://h:1/x", "database")],
)
def test_a_bad_redis_url_says_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_redis_url(url)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("tuner@10.0.0.5:2222", ("tuner", "10.0.0.5", 2222)),
        ("manager.example.com", (None, "manager.example.com", 22)),
        ("root@[fd00::1]:22", ("root", "fd00::1", 22)),
    ],
)
def test_manager_ssh_forms(text: str, parsed: tuple[str | None, str, int]) -> None:
    assert parse_manager_ssh(text) == parsed


@pytest.mark.parametrize(
    "text", ["", "-oProxyCommand=x", "a b", "host:99999", "u@h;touch x", "$(id)@h", "h:22\n"]
)
def test_a_bad_manager_ssh_names_the_field_and_the_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"manager_ssh .* is not \[user@\]host\[:port\]"):
        parse_manager_ssh(text)


def test_the_key_and_jump_a_reverse_tunnel_reads_from_the_ssh_command() -> None:
    """A reverse tunnel reuses the -i key and the -J jump hosts of the slot's ssh command."""
    options = parse_ssh_command(
        "ssh -p 2 -i /k/one -o IdentityFile=/k/two -o 'ProxyJump j@h' u@host"
    ).options
    assert _option_values(options, "-i", "identityfile") == ["/k/one", "/k/two"]
    assert _option_values(options, "-J", "proxyjump") == ["j@h"]
    plain = parse_ssh_command("ssh -p 2 u@host").options
    assert _option_values(plain, "-i", "identityfile") == []
    assert _option_values(plain, "-J", "proxyjump") == []


@pytest.mark.parametrize(
    ("said", "category"),
    [
        ("root@gpu-1: Permission denied (publickey).\n", "auth_refused"),
        ("ssh: connect to host gpu-1 port 2222: Connection refused\n", "connection_refused"),
        ("Remote port forwarding failed for listen port 40001\n", None),
    ],
)
def test_a_reverse_tunnel_that_never_came_up_says_what_its_ssh_said(
    tmp_path: Path, said: str, category: str | None
) -> None:
    """Its log, not a guess about AllowTcpForwarding: a refused key is auth_refused."""
    from servetune.remote.deploy import Deployer, _Run
    from servetune.remote.models import RedisVia, TunnelConfig
    from servetune.settings import Settings
    from tests.integration.deploy_helpers import make_slot

    settings = Settings(data_dir=tmp_path / "data")
    (settings.data_dir / "tunnels").mkdir(parents=True)
    (settings.data_dir / "tunnels" / "rv.log").write_text(said)
    slot = make_slot("rv", "ssh -p 2222 root@gpu-1", "/opt/st", redis_via=RedisVia.REVERSE)
    cfg = TunnelConfig(
        direction="remote",
        destination="root@gpu-1",
        port=2222,
        bind_port=40001,
        target_host="127.0.0.1",
        target_port=6379,
    )
    found = Deployer(settings, "redis://127.0.0.1:6379", registry=None)._tunnel_ssh_failure(  # type: ignore[arg-type]
        _Run(slot, "deploy"), cfg
    )
    if category is None:
        assert found is None
    else:
        assert found is not None and found.category.value == category and found.step == "redis"
        assert "reverse tunnel" in str(found)
