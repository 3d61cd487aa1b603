"""parse_ssh_command: the slot ssh commands users type parse to the right destination and options;
everything outside the allow-list is refused with SSH_COMMAND_INVALID naming the part."""

from __future__ import annotations

import os

import pytest

from servetune.errors import DeployFailed
from servetune.remote.models import Category
from servetune.remote.ssh import parse_ssh_command


@pytest.mark.parametrize(
    ("command", "destination", "options"),
    [
        ("ssh gpu-1", "gpu-1", ()),
        ("ssh ubuntu@10.0.0.5", "ubuntu@10.0.0.5", ()),
        (
            "ssh -p 2222 -i /keys/id_ed25519 -J admin@bastion:2200 user@host",
            "user@host",
            ("-p", "2222", "-i", "/keys/id_ed25519", "-J", "admin@bastion:2200"),
        ),
        (
            "ssh -l ubuntu -4 -C -q -v -T host",
            "host",
            ("-l", "ubuntu", "-4", "-C", "-v", "-T"),  # -q dropped: ssh's errors are needed
        ),
        ("ssh -6Cp2222 host", "host", ("-6", "-C", "-p", "2222")),
        ("ssh -vvv host", "host", ("-v", "-v", "-v")),
        ("ssh host -p 2222", "host", ("-p", "2222")),
        ("ssh -o ConnectTimeout=5 host", "host", ("-o", "ConnectTimeout=5")),
        ("ssh -o 'ServerAliveInterval 30' host", "host", ("-o", "ServerAliveInterval=30")),
        ("ssh -oport=2200 host", "host", ("-o", "Port=2200")),
        ("ssh -o StrictHostKeyChecking=yes host", "host", ("-o", "StrictHostKeyChecking=yes")),
        (
            "ssh -o Ciphers=+aes128-ctr,chacha20-poly1305@openssh.com h",
            "h",
            ("-o", "Ciphers=+aes128-ctr,chacha20-poly1305@openssh.com"),
        ),
        ("ssh -J a@j1,ssh://b@j2:22 h", "h", ("-J", "a@j1,ssh://b@j2:22")),
        ("ssh ssh://ubuntu@gpu-1:2200", "ubuntu@gpu-1", ("-p", "2200")),
        ("ssh -i /k ssh://gpu-1", "gpu-1", ("-i", "/k")),
        ("ssh -- host", "host", ()),
        ("ssh fe80::1%eth0", "fe80::1%eth0", ()),
    ],
)
def test_allowed_forms_parse(command: str, destination: str, options: tuple[str, ...]) -> None:
    target = parse_ssh_command(command)
    assert target.destination == destination
    assert target.options == options
    assert target.command == command


def test_identity_file_tilde_is_expanded_locally() -> None:
    target = parse_ssh_command("ssh -i ~/.ssh/key -o IdentityFile=~/.ssh/other host")
    home = os.path.expanduser("~")
    assert target.options == ("-i", f"{home}/.ssh/key", "-o", f"IdentityFile={home}/.ssh/other")


@pytest.mark.parametrize(
    ("command", "named"),
    [
        ("ssh -o ProxyCommand='nc %h %p' host", "ProxyCommand"),
        ("ssh -o 'LocalCommand touch x' host", "LocalCommand"),
        ("ssh -o PermitLocalCommand=yes host", "PermitLocalCommand"),
        ("ssh -o KnownHostsCommand=/bin/x host", "KnownHostsCommand"),
        ("ssh -o RemoteCommand=id host", "RemoteCommand"),
        ("ssh -o 'Match exec true' host", "Match"),
        ("ssh -o UserKnownHostsFile=/dev/null host", "UserKnownHostsFile"),
        ("ssh -o Tunnel=yes host", "Tunnel"),
        ("ssh -F /tmp/cfg host", "-F"),
        ("ssh -E /tmp/log host", "-E"),
        ("ssh -L 8080:localhost:80 host", "-L"),
        ("ssh -R 8080:localhost:80 host", "-R"),
        ("ssh -D 1080 host", "-D"),
        ("ssh -W other:22 host", "-W"),
        ("ssh -qL 1:h:2 host", "-L"),
        ("ssh -A host", "-A"),
        ("ssh -o StrictHostKeyChecking=no host", "StrictHostKeyChecking=no"),
        ("ssh host touch /tmp/x", "'touch /tmp/x'"),
        ("ssh host -- id", "'id'"),
        ("ssh host; touch /tmp/x", "';'"),
        ("ssh $(touch /tmp/x)", "'$'"),
        ("ssh `touch /tmp/x` host", "'`'"),
        ("ssh 'host\ntouch /tmp/x'", "newline"),
        ("ssh host\ntouch /tmp/x", "newline"),
        ("", "empty"),
        ("   ", "empty"),
        ("scp host", "'scp'"),
        ("bash -c 'ssh host'", "'bash'"),
        ("ssh -p 99999 host", "99999"),
        ("ssh host -p", "-p needs a value"),
        ("ssh -l 'root;id' host", "root;id"),
        ("ssh -J 'jump;touch /tmp/x' host", "jump;touch /tmp/x"),
        ("ssh -J '$(id)' host", "$(id)"),
        ("ssh -o ProxyJump=j%h host", "j%h"),
        ("ssh -- -oProxyCommand=x", "starts with '-'"),
        ("ssh 'host", "quotation"),
        ("ssh -p 2222", "no destination"),
        ("ssh a@b@c", "a@b@c"),
        ("ssh -o HostKeyAlgorithms='ssh-ed25519 x' host", "HostKeyAlgorithms"),
    ],
)
def test_refused_forms_name_the_part(command: str, named: str) -> None:
    with pytest.raises(DeployFailed) as caught:
        parse_ssh_command(command)
    failure = caught.value
    assert failure.category is Category.SSH_COMMAND_INVALID
    assert named in str(failure)
    assert failure.suggestion


def test_refusals_say_what_to_do_instead() -> None:
    with pytest.raises(DeployFailed) as caught:
        parse_ssh_command("ssh -o ProxyCommand='ssh -W %h:%p jump' host")
    assert "-J" in caught.value.suggestion
    with pytest.raises(DeployFailed) as caught:
        parse_ssh_command("ssh -L 1:h:2 host")
    assert "tunnel" in str(caught.value)


def test_flags_that_turn_forwarding_off_are_accepted() -> None:
    """-a (no agent forwarding) and -x (no X11) only take away: kept as given."""
    options = parse_ssh_command("ssh -a -x -p 2222 gpu@h").options
    assert "-a" in options and "-x" in options
