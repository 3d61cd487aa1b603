"""Hostile and careless input to the SSH deploy, refused before anything runs: slot ssh commands
that try to smuggle options past the allow-list, slot fields that could not work or could mislead,
authorized_keys lines that try to widen a tunnel key, and agent parameters of odd types.

Each case here was tried against the code; the ones that got through are fixed, the rest stay as
regressions (see the report of the "sec" helper on issue #8)."""

from __future__ import annotations

import io
import json
import stat
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from servetune.errors import DeployFailed
from servetune.manager.worker_slots import slot_problems
from servetune.remote import agent, keys
from servetune.remote.models import Category, RedisVia, WorkerSlotCreate
from servetune.remote.ssh import parse_ssh_command

# -- parse_ssh_command ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "named"),
    [
        # case variants and spellings of refused -o keys
        ("ssh -o proxycommand=x h", "proxycommand"),
        ("ssh -o PROXYCOMMAND=x h", "PROXYCOMMAND"),
        ("ssh -oProxyCommand=x h", "ProxyCommand"),
        ("ssh -o ProxyCommand x h", "'ProxyCommand'"),
        ("ssh -qvoProxyCommand=x h", "ProxyCommand"),
        ("ssh -Cq -o LocalCommand=x h", "LocalCommand"),
        ("ssh -vF/tmp/cfg h", "-F"),
        ("ssh -qE/tmp/log h", "-E"),
        ("ssh -o Hostname=elsewhere h", "Hostname"),
        ("ssh -o Pr\u03bfxyCommand=x h", "Key=Value"),  # a Greek omicron
        # jump hosts that ssh would read as options or tokens
        ("ssh -J -Emarker h", "-Emarker"),
        ("ssh -J x@-Emarker h", "x@-Emarker"),
        ("ssh -J a,-Emarker h", "-Emarker"),
        ("ssh -J ssh://-Emarker h", "ssh://-Emarker"),
        ("ssh -J -v@jump h", "-v@jump"),
        ("ssh -J -oProxyCommand=x h", "-oProxyCommand=x"),
        ("ssh -J j%h h", "j%h"),
        # destinations and users starting with '-' (rsync and old ssh read them as options)
        ("ssh user@-Emarker", "starts with '-'"),
        ("ssh ssh://-E@x", "-E"),
        ("ssh -- -v", "starts with '-'"),
        ("ssh -l -oProxyCommand h", "-oProxyCommand"),
        ("ssh -o User=-v h", "-v"),
        ("ssh -o HostKeyAlias=-E h", "HostKeyAlias"),
        ("ssh -o HostKeyAlias=gpu-b h", "another host's name"),  # would poison gpu-b's key
        ("ssh -i %d/.ssh/k h", "does not expand"),  # ssh opens -i as written
        ("ssh --bogus h", "not an ssh option"),
        ("ssh -o 'IdentityFile=/etc/${HF_TOKEN}/../passwd' h", "not expanded"),  # reads env
        ("ssh -o CertificateFile=${HOME}/c h", "not expanded"),
        ("ssh -o PKCS11Provider=/tmp/x.so h", "PKCS11Provider is not allowed"),  # loads a .so
        ("ssh -i '${HOME}/.ssh/k' h", "-o IdentityFile="),
        ("ssh a@b@c", "a@b@c"),
        ("ssh -l 'a;b' h", "a;b"),
        # -o file values ssh would split or unescape itself (then it opens another file)
        ("ssh -o 'IdentityFile=/k ProxyCommand=touch' h", "-i '/k ProxyCommand=touch'"),
        ("ssh -o 'IdentityFile=/dev/std\\in' h", "backslash"),
        ("ssh -o \"CertificateFile=/c 'x'\" h", "CertificateFile"),
        # odd ssh:// URIs
        ("ssh ssh://u:pw@h", "ssh://u:pw@h"),
        ("ssh ssh://u@h:22/path", "ssh://u@h:22/path"),
        ("ssh ssh://u@h:22?x=1", "ssh://u@h:22?x=1"),
        ("ssh ssh://u@h:0", "port"),
        # unicode look-alikes, NUL, other controls
        ("ssh gpu-\u0430", "'\u0430'"),  # Cyrillic a
        ("ssh -p \uff12\uff12 h", "port"),  # fullwidth digits
        ("ssh h\x00", "0x00"),
        ("ssh h\x1b[2J", "0x1b"),
        ("ssh -- h -- id", "remote command"),
    ],
)
def test_smuggled_options_and_odd_parts_are_refused_naming_them(command: str, named: str) -> None:
    with pytest.raises(DeployFailed) as caught:
        parse_ssh_command(command)
    assert caught.value.category is Category.SSH_COMMAND_INVALID
    assert named in str(caught.value) + caught.value.suggestion
    assert caught.value.suggestion


def test_quiet_ssh_is_not_passed_on_and_quiet_log_levels_are_refused() -> None:
    """A quiet ssh prints nothing, so a refused login or a closed port could only be reported
    as an unknown failure: -q is dropped, LogLevel QUIET/FATAL refused."""
    assert parse_ssh_command("ssh -qp 2222 -q h").options == ("-p", "2222")
    for level in ("QUIET", "fatal"):
        with pytest.raises(DeployFailed) as caught:
            parse_ssh_command(f"ssh -o LogLevel={level} h")
        assert "LogLevel=ERROR" in caught.value.suggestion


def test_a_very_long_value_is_refused_without_choking() -> None:
    with pytest.raises(DeployFailed) as caught:
        parse_ssh_command("ssh -o Ciphers=" + "a" * 5000 + " h")
    assert "Ciphers" in str(caught.value)


@pytest.mark.parametrize(
    ("command", "options"),
    [
        # what a careful user types still parses (the fixes above must not refuse these)
        ("ssh -o IdentityFile=%d/.ssh/id_%h h", ("-o", "IdentityFile=%d/.ssh/id_%h")),
        ("ssh -i '/keys/with space/id' h", ("-i", "/keys/with space/id")),
        ("ssh -J _svc@bastion.example:2200 h", ("-J", "_svc@bastion.example:2200")),
        ("ssh -o Ciphers=-aes128-cbc h", ("-o", "Ciphers=-aes128-cbc")),
    ],
)
def test_legitimate_forms_near_the_refused_ones_still_parse(
    command: str, options: tuple[str, ...]
) -> None:
    assert parse_ssh_command(command).options == options


# -- slot fields ---------------------------------------------------------------------------


def _fields(problems: list[Any]) -> dict[str, str]:
    return {p.loc: p.message for p in problems}


@pytest.mark.parametrize(
    ("changes", "field", "says"),
    [
        ({"install_dir": "/opt/st%d"}, "install_dir", "'%'"),
        ({"install_dir": "/opt/servetune tuner"}, "install_dir", "' '"),
        ({"install_dir": "/opt/s\u00e9rvetune"}, "install_dir", "forward"),
        ({"install_dir": "/opt/\u202eenut"}, "install_dir", "U+202E"),
        ({"install_dir": "/opt/a\u2028b"}, "install_dir", "U+2028"),
        ({"install_dir": "/opt/a\x85b"}, "install_dir", "U+0085"),
        ({"install_dir": "/opt/a\x01b"}, "install_dir", "U+0001"),
        ({"install_dir": "/"}, "install_dir", "of its own"),
        ({"install_dir": "~"}, "install_dir", "of its own"),
        ({"install_dir": "~/../../etc"}, "install_dir", "holds '..'"),
        ({"install_dir": "/opt/$(touch x)"}, "install_dir", "'$'"),
        ({"python": "-c"}, "python", "starts with '-'"),
    ],
)
def test_slot_fields_that_cannot_work_or_mislead_are_named(
    changes: dict[str, str], field: str, says: str
) -> None:
    slot = WorkerSlotCreate.model_validate({"name": "gpu-1", "ssh_command": "ssh h", **changes})
    problems = _fields(slot_problems(slot))
    assert field in problems, problems
    assert says in problems[field]


def test_an_install_dir_with_a_space_is_fine_without_a_forward_tunnel() -> None:
    for via in (RedisVia.REVERSE, RedisVia.DIRECT):
        slot = WorkerSlotCreate(
            name="gpu-1",
            ssh_command="ssh h",
            install_dir="/opt/servetune tuner",
            redis_via=via,
            redis_address="10.0.0.5:6379",
        )
        assert slot_problems(slot) == []


# -- authorized_keys -----------------------------------------------------------------------

PUBLIC = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMmNyZoPBuXtfbpYYNzKgZc2UPw0B7p0mV1qwq8F4vEy worker@gpu"
)


@pytest.mark.parametrize(
    "smuggled",
    [
        f'command="/bin/sh" {PUBLIC}',
        f'no-pty,permitopen="*:*" {PUBLIC}',
        f"{PUBLIC}\nssh-ed25519 AAAAother attacker",
        f"{PUBLIC}\rcommand=x",
        f'environment="LD_PRELOAD=/tmp/x" {PUBLIC}',
    ],
)
def test_a_public_key_with_options_or_lines_smuggled_in_is_refused(
    smuggled: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="public_key"):
        keys.authorized_line(smuggled, "gpu-1", "127.0.0.1", 6379)


def test_the_comment_of_a_key_cannot_add_options_or_another_slot_name(tmp_path: Path) -> None:
    key = PUBLIC.rsplit(" ", 1)[0]
    line = keys.authorized_line(f'{key} x" servetune-slot:gpu-2', "gpu-1", "127.0.0.1", 6379)
    assert line.endswith(f"{key} servetune-slot:gpu-1")  # the comment is dropped
    assert line.count('command="/bin/false"') == 1


def test_removing_a_slot_leaves_slots_whose_names_share_its_prefix(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    key = PUBLIC.rsplit(" ", 1)[0]
    path.write_text(f"{key} admin-own-key\n")
    for name in ("gpu", "gpu-2", "gpu.2", "xgpu", "gpu-"):
        keys.add_key(path, keys.authorized_line(PUBLIC, name, "127.0.0.1", 6379), name)
    assert keys.remove_key(path, "gpu") is True
    left = [line.rsplit(" ", 1)[1] for line in path.read_text().splitlines()]
    assert left == ["admin-own-key", "servetune-slot:gpu-2", "servetune-slot:gpu.2",
                    "servetune-slot:xgpu", "servetune-slot:gpu-"]  # fmt: skip
    assert keys.remove_key(path, "gpu") is False
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="slot name"):
        keys.remove_key(path, "gpu*")


# -- the agent's parameters ------------------------------------------------------------------


def _agent(action: str, params: Any) -> dict[str, Any]:
    """Run the agent's main() in this process, as BOOTSTRAP does on the remote; its reply."""
    out = io.StringIO()
    with redirect_stdout(out):
        agent.main({"action": action, "params": params})
    return agent.parse_reply(out.getvalue())


@pytest.mark.parametrize(
    "password", [12345678, ["hunter2-secret"], {"pw": "hunter2-secret"}, 1234.5678]
)
def test_a_secret_of_the_wrong_type_is_not_echoed_in_the_error(password: Any) -> None:
    reply = _agent("redis_probe", {"host": "127.0.0.1", "port": 1, "password": password})
    assert reply["ok"] is False
    text = json.dumps(reply)
    assert "'password'" in reply["error"]["message"]
    assert type(password).__name__ in reply["error"]["message"]
    for secret in ("12345678", "hunter2-secret", "1234.5678"):
        assert secret not in text


@pytest.mark.parametrize("mode", [-1, 0o4755, 0o2777, 0o10000, True])
def test_write_file_refuses_modes_beyond_permission_bits(mode: int, tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    reply = _agent("write_file", {"path": str(target), "content": "{}", "mode": mode})
    assert reply["ok"] is False
    assert "'mode'" in reply["error"]["message"]
    assert not target.exists()


def test_write_file_replaces_a_planted_symlink_instead_of_writing_through_it(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    target = tmp_path / "config.json"
    target.symlink_to(victim)
    reply = _agent("write_file", {"path": str(target), "content": "{}", "mode": 0o600})
    assert reply["ok"] is True
    assert victim.read_text() == "keep"
    assert not target.is_symlink() and target.read_text() == "{}"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("action", "params", "says"),
    [
        ("write_file", {"path": "relative/x", "content": "", "mode": 0o600}, "absolute"),
        ("write_file", {"path": "/tmp/x\x00y", "content": "", "mode": 0o600}, "usable path"),
        ("write_file", {"path": ["/tmp/x"], "content": "", "mode": 0o600}, "must be str"),
        ("write_file", {"path": "/tmp/x", "content": b"x".hex(), "mode": "0o600"}, "must be int"),
        ("redis_probe", {"host": "127.0.0.1", "port": 1, "timeout_s": float("nan")}, "finite"),
        ("redis_probe", {"host": "127.0.0.1", "port": 1, "timeout_s": float("inf")}, "finite"),
        ("redis_probe", {"host": "127.0.0.1", "port": True}, "must be int"),
        ("status", ["install_dir"], "must be an object"),
        ("no_such_action", {}, "unknown agent action"),
    ],
)
def test_odd_agent_parameters_get_an_error_reply_naming_them(
    action: str, params: Any, says: str
) -> None:
    reply = _agent(action, params)
    assert reply["ok"] is False
    assert says in reply["error"]["message"]
