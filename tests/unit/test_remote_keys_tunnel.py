"""authorized_keys lines for tunnel keys (format, refusals, add/replace/remove under a lock),
the tunnel's ssh argv and the worker's launch config file."""

from __future__ import annotations

import base64
import json
import stat
import struct
import threading
from pathlib import Path

import pytest

from servetune.remote.keys import (
    add_key,
    authorized_line,
    check_public_key,
    known_hosts_name,
    known_hosts_text,
    parse_keyscan,
    remove_key,
)
from servetune.remote.models import TunnelConfig
from servetune.remote.tunnel import tunnel_argv
from servetune.worker.cli import read_launch_config


def fake_key(kind: str = "ssh-ed25519", seed: int = 0) -> str:
    """A syntactically valid public key line (type-prefixed blob; never used to log in)."""
    body = kind.encode()
    blob = struct.pack(">I", len(body)) + body + struct.pack(">I", 32) + bytes([seed]) * 32
    return f"{kind} {base64.b64encode(blob).decode()} someone@host"


def test_authorized_line_restricts_the_key_to_forwarding_to_redis() -> None:
    key = fake_key()
    line = authorized_line(key, "gpu-1", "127.0.0.1", 6379)
    blob = key.split()[1]
    assert line == (
        'restrict,port-forwarding,permitopen="127.0.0.1:6379",permitlisten="none.invalid:1",'
        'command="/bin/false" '
        f"ssh-ed25519 {blob} servetune-slot:gpu-1"
    )


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not a key",
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP== x",  # a type not accepted
        fake_key() + "\n" + fake_key(seed=1),  # two lines
        fake_key().replace("ssh-ed25519", "ssh-rsa", 1),  # the blob says ed25519
        "ssh-ed25519 !!!notbase64",
        'ssh-ed25519 AAAA command="sh"',  # truncated blob, option smuggled as comment
    ],
)
def test_a_bad_public_key_is_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(ValueError, match="public_key"):
        authorized_line(bad, "gpu-1", "127.0.0.1", 6379)


def test_check_public_key_drops_the_comment() -> None:
    key = fake_key()
    assert check_public_key(key) == " ".join(key.split()[:2])


def test_bad_slot_host_or_port_is_refused() -> None:
    with pytest.raises(ValueError, match="slot name"):
        authorized_line(fake_key(), "a;b", "127.0.0.1", 6379)
    with pytest.raises(ValueError, match="permit_host"):
        authorized_line(fake_key(), "gpu-1", '127.0.0.1",command="sh', 6379)
    with pytest.raises(ValueError, match="permit_port"):
        authorized_line(fake_key(), "gpu-1", "127.0.0.1", 0)


def test_add_replace_remove_keep_other_lines_and_mode_600(tmp_path: Path) -> None:
    path = tmp_path / "ssh" / "authorized_keys"
    path.parent.mkdir()
    path.write_text("ssh-ed25519 AAAAuser me@laptop\n")
    path.chmod(0o644)
    add_key(path, authorized_line(fake_key(seed=1), "a", "127.0.0.1", 6379), "a")
    add_key(path, authorized_line(fake_key(seed=2), "b", "127.0.0.1", 6379), "b")
    new_a = authorized_line(fake_key(seed=3), "a", "127.0.0.1", 6380)
    add_key(path, new_a, "a")  # replaces a's line
    lines = path.read_text().splitlines()
    assert lines[0] == "ssh-ed25519 AAAAuser me@laptop"
    assert len(lines) == 3 and lines[-1] == new_a
    assert sum("servetune-slot:a" in x for x in lines) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert remove_key(path, "a") is True
    assert remove_key(path, "a") is False
    lines = path.read_text().splitlines()
    assert lines[0] == "ssh-ed25519 AAAAuser me@laptop"
    assert [x.split()[-1] for x in lines[1:]] == ["servetune-slot:b"]
    # a slot whose name is a prefix of another's leaves the other alone
    add_key(path, authorized_line(fake_key(seed=4), "b2", "127.0.0.1", 6379), "b2")
    remove_key(path, "b")
    assert path.read_text().splitlines()[-1].endswith("servetune-slot:b2")


def test_add_key_refuses_a_line_of_another_slot(tmp_path: Path) -> None:
    line = authorized_line(fake_key(), "a", "127.0.0.1", 6379)
    with pytest.raises(ValueError, match="servetune-slot:b"):
        add_key(tmp_path / "authorized_keys", line, "b")
    with pytest.raises(ValueError, match="one line"):
        add_key(tmp_path / "authorized_keys", line + "\nssh-ed25519 AAAA x", "a")


def test_concurrent_adds_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    names = [f"slot-{i}" for i in range(24)]
    errors: list[BaseException] = []

    def add(i: int, name: str) -> None:
        try:
            add_key(path, authorized_line(fake_key(seed=i), name, "127.0.0.1", 6379), name)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(x.split()[-1] for x in path.read_text().splitlines()) == sorted(
        f"servetune-slot:{n}" for n in names
    )


def _cfg(**changes: object) -> TunnelConfig:
    doc: dict[str, object] = {
        "direction": "local",
        "destination": "servetune@manager",
        "port": 2222,
        "identity_file": "/home/u/.servetune/ssh/id_ed25519",
        "known_hosts_file": "/home/u/.servetune/ssh/known_hosts",
        "bind_port": 16379,
        "target_host": "127.0.0.1",
        "target_port": 6379,
    }
    return TunnelConfig.model_validate({**doc, **changes})


def test_tunnel_argv_forward() -> None:
    argv = tunnel_argv(_cfg())
    assert argv[:2] == ["ssh", "-N"]
    assert argv[-2:] == ["--", "servetune@manager"]
    pairs = {argv[i + 1] for i, a in enumerate(argv) if a == "-o"}
    assert {
        "BatchMode=yes",
        "ExitOnForwardFailure=yes",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=3",
        "StrictHostKeyChecking=accept-new",
        "UserKnownHostsFile=/home/u/.servetune/ssh/known_hosts",
        "IdentitiesOnly=yes",
    } <= pairs
    assert argv[argv.index("-L") + 1] == "127.0.0.1:16379:127.0.0.1:6379"
    assert argv[argv.index("-p") + 1] == "2222"
    assert "-R" not in argv


def test_tunnel_argv_reverse() -> None:
    argv = tunnel_argv(_cfg(direction="remote", identity_file=None))
    assert argv[argv.index("-R") + 1] == "127.0.0.1:16379:127.0.0.1:6379"
    assert "-L" not in argv and "-i" not in argv


def test_tunnel_argv_offers_every_key_of_the_slots_ssh_command() -> None:
    argv = tunnel_argv(_cfg(direction="remote", more_identity_files=["/k/two", "/k/three"]))
    keys = [argv[i + 1] for i, word in enumerate(argv) if word == "-i"]
    assert keys[1:] == ["/k/two", "/k/three"] and len(keys) == 3
    with pytest.raises(ValueError, match="more_identity_files"):
        tunnel_argv(_cfg(direction="remote", more_identity_files=["/a b/k"]))


def test_tunnel_argv_goes_through_the_slots_jump_hosts() -> None:
    argv = tunnel_argv(_cfg(direction="remote", proxy_jump="admin@bastion:2222,ssh://j2"))
    assert argv[argv.index("-J") + 1] == "admin@bastion:2222,ssh://j2"
    assert argv.index("-J") < argv.index("--")
    assert "-J" not in tunnel_argv(_cfg(direction="remote"))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"destination": "-oProxyCommand=touch /tmp/x"}, "tunnel.destination"),
        ({"destination": "host;touch x"}, "tunnel.destination"),
        ({"target_host": "h:1:evil"}, "tunnel.target_host"),
        ({"identity_file": "/a b/key"}, "tunnel.identity_file"),
        ({"known_hosts_file": "relative/known_hosts"}, "tunnel.known_hosts_file"),
        ({"config_file": "/x/%d/config"}, "tunnel.config_file"),
        ({"proxy_jump": "-oProxyCommand=touch"}, "tunnel.proxy_jump"),
        ({"proxy_jump": "ok@jump,-Emarker"}, "tunnel.proxy_jump"),
        ({"proxy_jump": "j%h"}, "tunnel.proxy_jump"),
        ({"proxy_jump": "a b"}, "tunnel.proxy_jump"),
        ({"proxy_jump": ""}, "tunnel.proxy_jump"),
    ],
)
def test_tunnel_argv_refuses_what_ssh_could_misread(changes: dict[str, str], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tunnel_argv(_cfg(**changes))


def _launch_doc() -> dict[str, object]:
    return {"redis_url": "redis://:pw@127.0.0.1:16379/0", "name": "gpu-1", "data_dir": "/tmp/d"}


def test_launch_config_readable_by_others_is_refused_with_the_chmod(tmp_path: Path) -> None:
    path = tmp_path / "worker.json"
    path.write_text(json.dumps(_launch_doc()))
    path.chmod(0o644)
    with pytest.raises(ValueError, match=f"chmod 600 {path}"):
        read_launch_config(path)
    path.chmod(0o600)
    assert read_launch_config(path).name == "gpu-1"


def test_launch_config_names_the_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "worker.json"
    path.write_text(json.dumps({**_launch_doc(), "max_parallel": 0}))
    path.chmod(0o600)
    with pytest.raises(ValueError, match="max_parallel"):
        read_launch_config(path)


def test_tunnel_argv_host_key_checking_follows_the_config() -> None:
    def strict(argv: list[str]) -> list[str]:
        return [a for a in argv if a.startswith("StrictHostKeyChecking=")]

    assert strict(tunnel_argv(_cfg())) == ["StrictHostKeyChecking=accept-new"]  # stored configs
    assert strict(tunnel_argv(_cfg(strict_host_key_checking="yes"))) == [
        "StrictHostKeyChecking=yes"
    ]
    with pytest.raises(ValueError, match="strict_host_key_checking"):
        _cfg(strict_host_key_checking="no")


def test_parse_keyscan_keeps_ed25519_ecdsa_rsa_and_skips_comments_and_others() -> None:
    ed, ecdsa, rsa = (
        fake_key("ssh-ed25519", 1),
        fake_key("ecdsa-sha2-nistp256", 2),
        fake_key("ssh-rsa", 3),
    )
    dss = fake_key("ssh-dss", 4)
    bad = fake_key("ssh-rsa", 5).split()[1][:-8] + "*"  # not base64
    output = "\n".join(
        [
            "# [10.0.0.5]:2222 SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13",
            f"[10.0.0.5]:2222 {' '.join(ed.split()[:2])}",
            "",
            f"[10.0.0.5]:2222 {' '.join(ecdsa.split()[:2])}",
            f"[10.0.0.5]:2222 {' '.join(dss.split()[:2])}",
            f"[10.0.0.5]:2222 ssh-rsa {bad}",
            f"[10.0.0.5]:2222 ssh-ed25519 {rsa.split()[1]}",  # blob of another type
            f"[10.0.0.5]:2222 {' '.join(rsa.split()[:2])}",
            f"[10.0.0.5]:2222 {' '.join(ed.split()[:2])}",  # twice: kept once
            "banner text from the server",
        ]
    )
    assert parse_keyscan(output) == [" ".join(k.split()[:2]) for k in (ed, ecdsa, rsa)]
    assert parse_keyscan("") == []
    assert parse_keyscan("# 10.0.0.5:22 SSH-2.0-OpenSSH_9.6\n") == []


def test_known_hosts_lines_name_the_host_as_ssh_looks_it_up() -> None:
    ed, rsa = " ".join(fake_key().split()[:2]), " ".join(fake_key("ssh-rsa", 7).split()[:2])
    assert known_hosts_name("manager.example", 22) == "manager.example"
    assert known_hosts_name("10.0.0.5", 2222) == "[10.0.0.5]:2222"
    assert known_hosts_name("::1", 2222) == "[::1]:2222"
    assert known_hosts_text("10.0.0.5", 22, [ed]) == f"10.0.0.5 {ed}\n"
    assert known_hosts_text("10.0.0.5", 2222, [ed, rsa]) == (
        f"[10.0.0.5]:2222 {ed}\n[10.0.0.5]:2222 {rsa}\n"
    )
    for host in ("-oProxyCommand=x", "a b", "*.example", "!host", "h,other", "[h]"):
        with pytest.raises(ValueError, match="host"):
            known_hosts_name(host, 22)
    with pytest.raises(ValueError, match="port"):
        known_hosts_name("h", 0)
    with pytest.raises(ValueError, match="at least one host key"):
        known_hosts_text("h", 22, [])
    with pytest.raises(ValueError, match="public_key"):
        known_hosts_text("h", 22, ["ssh-ed25519 not-base64!"])
