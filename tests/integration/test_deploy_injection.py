"""Issue #8: nothing a user types into a worker slot runs as a shell command, on the manager or
on the remote host.

Slot names, ssh commands and install directories carrying ``;``, ``$(…)``, backticks, ``&&`` and
newlines: invalid ones are refused naming their field; the install directory, which may hold any
of them but a newline, travels as JSON and ends up a plain directory name. In every case the
marker file the payload would create is never created (the remote host is this machine, so one
check covers both sides).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydantic
import pytest

from servetune.remote.models import Category, RedisVia, StepStatus, WorkerSlotCreate
from tests.integration.deploy_helpers import (
    assert_ok,
    deploy,
    describe,
    kill_install,
    kill_installs,
    make_slot,
    manager_settings,
    step,
    worker_processes,
)
from tests.redis_server import RedisServer
from tests.sshd import SshServer, make_key, require_root, ssh_server

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def payloads(marker: Path) -> list[str]:
    """Shell syntax that would create ``marker`` if a shell ever ran it."""
    return [
        f";touch {marker}",
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"\ntouch {marker}",
        f"&& touch {marker}",
        f"|touch {marker}",
    ]


@dataclass
class Site:
    """The loopback host, Redis and where the marker would appear."""

    root: Path
    key: Path
    server: SshServer
    redis: RedisServer
    marker: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A loopback host without rsync, a password-protected Redis."""
    require_root()
    root = tmp_path_factory.mktemp("deploy-injection")
    with contextlib.ExitStack() as stack:
        key = make_key(root / "keys" / "id_ed25519")
        rsync = shutil.which("rsync")
        assert rsync is not None
        # no rsync on this host: the deploy falls back to a tar stream (rsync_missing)
        server = stack.enter_context(ssh_server(root / "sshd", hide=[rsync]))
        server.authorize(Path(f"{key}.pub"))
        redis = RedisServer(root / "redis", password=os.urandom(12).hex())
        redis.start()
        stack.callback(redis.kill)
        stack.callback(kill_installs, root, "inst*")
        yield Site(root, key, server, redis, root / "MARKER")


def test_slot_names_with_shell_syntax_are_refused_naming_the_field(site: Site) -> None:
    for payload in payloads(site.marker):
        with pytest.raises(pydantic.ValidationError) as caught:
            WorkerSlotCreate(name=f"gpu{payload}", ssh_command="ssh host")
        errors = caught.value.errors()
        assert [e["loc"] for e in errors] == [("name",)], errors
        assert "slot name" in str(caught.value)
    assert not site.marker.exists()


def test_python_and_install_dir_with_forbidden_characters_are_refused_naming_the_field(
    site: Site,
) -> None:
    for payload in payloads(site.marker):
        with pytest.raises(pydantic.ValidationError) as caught:
            WorkerSlotCreate(name="gpu", ssh_command="ssh host", python=f"python3{payload}")
        assert [e["loc"] for e in caught.value.errors()] == [("python",)]
    with pytest.raises(pydantic.ValidationError) as caught:
        WorkerSlotCreate(
            name="gpu", ssh_command="ssh host", install_dir=f"/tmp/x\ntouch {site.marker}"
        )
    assert [e["loc"] for e in caught.value.errors()] == [("install_dir",)]
    assert "newline" in str(caught.value)


def test_ssh_commands_with_shell_syntax_run_nothing_and_are_refused(site: Site) -> None:
    base = site.server.ssh_command(site.key)
    destination = f"root@{site.server.address}"
    commands = [f"{base}{p}" for p in payloads(site.marker)]
    commands += [f"{base} {p}" for p in payloads(site.marker)]
    commands += [
        base.replace(destination, f"'{destination};touch {site.marker}'"),
        base.replace(destination, f'"$(touch {site.marker})"@{site.server.address}'),
        f"ssh -o ProxyCommand='touch {site.marker}' {destination}",
        f"ssh -o PermitLocalCommand=yes -o LocalCommand='touch {site.marker}' {destination}",
        f"ssh -o KnownHostsCommand='/usr/bin/touch {site.marker}' {destination}",
        f"$(touch {site.marker}) {base}",
    ]
    settings = manager_settings(site.root / "manager")
    for n, command in enumerate(commands):
        slot = make_slot(f"inj-{n}", command, str(site.root / f"inst-refused-{n}"))
        report = deploy(settings, site.redis.url, slot)
        assert not report.success, describe(report)
        assert report.category == Category.SSH_COMMAND_INVALID, (command, describe(report))
        assert report.suggestion, describe(report)
        assert [(s.name, s.status) for s in report.steps] == [("preflight", StepStatus.FAILED)]
        assert not site.marker.exists(), f"{command!r} ran the payload"
    assert not any(site.root.glob("inst-refused-*")), "nothing reached the remote"


def test_install_dir_with_shell_syntax_is_a_plain_directory_and_the_worker_runs(
    site: Site,
) -> None:
    """The install dir travels as JSON, never through a shell: the deploy (sent as a tar stream:
    the host has no rsync) succeeds, the payloads in the path never run."""
    marker = site.marker
    install = site.root / f"inst;touch {marker}$(touch {marker})`touch {marker}`&&touch {marker}"
    settings = manager_settings(site.root / "manager")
    slot = make_slot(
        "hostile-dir",
        site.server.ssh_command(site.key),
        str(install),
        redis_via=RedisVia.DIRECT,
        redis_address=f"127.0.0.1:{site.redis.port}",
    )
    try:
        report = deploy(settings, site.redis.url, slot)
        assert_ok(report)
        upload = step(report, "upload")
        assert upload.status == StepStatus.WARNING, describe(report)
        assert upload.category == Category.RSYNC_MISSING
        assert "tar" in upload.detail and upload.suggestion
        assert install.is_dir() and (install / "worker.json").is_file()
        assert (install / "venv" / "bin" / "servetune").exists()
        assert len(worker_processes(install)) == 1
        assert not marker.exists()

        # the forward tunnel hands paths under install_dir to ssh: refused, naming install_dir
        forward = slot.model_copy(
            update={
                "redis_via": RedisVia.FORWARD,
                "manager_ssh": f"root@127.0.0.1:{site.server.port}",
            }
        )
        refused = deploy(settings, site.redis.url, forward)
        assert refused.category == Category.TUNNEL_FAILED, describe(refused)
        assert step(refused, "redis").status == StepStatus.FAILED
        assert refused.suggestion and "install_dir" in refused.suggestion
        assert not marker.exists()
    finally:
        kill_install(install)
    assert not marker.exists()
