"""Hostile and careless slot input against real parts: a real OpenSSH server (tests/sshd.py), a
real Redis with a password, the manager's real app. Key paths that would make ssh read its own
stdin (the agent's request, secrets included) are refused before any connection; the Redis
password never shows in any process's argv nor in a failure's message or logs; slot fields that
could not work are refused with a 422 naming the field and the fix."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from servetune.errors import DeployFailed
from servetune.manager.app import create_app
from servetune.remote.models import Category, DeployReport, WorkerSlot
from servetune.remote.ssh import SshSession, parse_ssh_command
from servetune.settings import Settings
from tests.integration.manager_helpers import ScriptedSupervisor
from tests.integration.test_manager_slots import Harness, StandInDeployer, slot_settings
from tests.redis_server import RedisServer, free_port
from tests.sshd import SshServer

pytestmark = pytest.mark.integration

SECRET = "s3cret-Redis-pw-7f1c"


def _session(server: SshServer, key: Path, data_dir: Path, *extra: str) -> SshSession:
    command = f"ssh -p {server.port} -i {key} {' '.join(extra)} root@{server.address}"
    return SshSession(parse_ssh_command(command), Settings(data_dir=data_dir))


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["-o", "CertificateFile=/proc/self/fd/0"], "/proc/self/fd/0"),
        (["-o", "CertificateFile=%d/../../dev/stdin"], "%d/../../dev/stdin"),
        (["-o", "IdentityFile=/dev/fd/0"], "/dev/fd/0"),
        (["-o", "IdentityFile=%d/../../../../dev/stdin"], "dev/stdin"),
        (["-o", "CertificateFile=/dev/zero"], "/dev/zero"),
    ],
)
def test_a_key_path_that_is_really_stdin_or_a_device_is_refused_before_connecting(
    loopback_host: SshServer, client_key: Path, tmp_path: Path, extra: list[str], named: str
) -> None:
    """Before the fix ssh read the agent's request line (a Redis password in it) as a
    certificate: the remote agent got nothing and failed with a JSONDecodeError."""
    session = _session(loopback_host, client_key, tmp_path / "data", *extra)
    params = {"host": "127.0.0.1", "port": 1, "password": SECRET, "timeout_s": 1}
    with pytest.raises(DeployFailed) as caught:
        asyncio.run(session.run_agent("redis_probe", params, timeout_s=60))
    assert caught.value.category is Category.SSH_COMMAND_INVALID
    assert named in str(caught.value)
    assert "key file" in caught.value.suggestion
    known_hosts = tmp_path / "data" / "ssh" / "known_hosts"
    assert not known_hosts.exists()  # refused before ssh ever connected


def test_key_paths_are_checked_as_ssh_expands_them(
    loopback_host: SshServer,
    client_key: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    session = SshSession(
        parse_ssh_command(
            f"ssh -p {loopback_host.port} -o IdentityFile={client_key.parent}/%n-key "
            f"root@{loopback_host.address}"
        ),
        Settings(data_dir=tmp_path / "data"),
    )
    with pytest.raises(DeployFailed) as caught:  # ssh would open <keys>/127.0.0.1-key: missing
        asyncio.run(session.resolve())
    assert "does not exist" in str(caught.value)
    (client_key.parent / f"{loopback_host.address}-key").symlink_to(client_key)
    facts = asyncio.run(
        session.run_agent(
            "probe",
            {"install_dir": str(tmp_path), "index_url": None, "index_timeout_s": 1,
             "min_python": [3, 6]},
            timeout_s=60,
        )
    )  # fmt: skip
    assert facts["install_dir"] == str(tmp_path)

    with pytest.raises(DeployFailed, match="not expanded"):  # it would read our environment
        parse_ssh_command(f"ssh -o IdentityFile=${{HOME}}/id root@{loopback_host.address}")
    for raw, says in (
        ("%C-key", "%C"),
        (str(client_key.parent), "not a regular file"),
    ):
        bad = SshSession(
            parse_ssh_command(f"ssh -o IdentityFile={raw} root@{loopback_host.address}"),
            Settings(data_dir=tmp_path / "data"),
        )
        with pytest.raises(DeployFailed) as caught:
            asyncio.run(bad.resolve())
        assert caught.value.category is Category.SSH_COMMAND_INVALID
        assert says in str(caught.value), str(caught.value)


def test_a_quiet_ssh_command_still_gets_its_failure_category(
    client_key: Path, tmp_path: Path
) -> None:
    """Before the fix ``-q`` reached ssh, which then said nothing: a closed port came back as
    an unknown failure ("exit status 255: no output") instead of connection_refused."""
    port = free_port()  # nothing listens there
    session = SshSession(
        parse_ssh_command(f"ssh -q -p {port} -i {client_key} root@127.0.0.1"),
        Settings(data_dir=tmp_path / "data"),
    )
    params = {"install_dir": str(tmp_path), "index_url": None, "index_timeout_s": 1,
              "min_python": [3, 6]}  # fmt: skip
    with pytest.raises(DeployFailed) as caught:
        asyncio.run(session.run_agent("probe", params, timeout_s=60))
    assert caught.value.category is Category.CONNECTION_REFUSED, str(caught.value)
    assert str(port) in caught.value.suggestion


@contextlib.contextmanager
def _silent_listener() -> Iterator[int]:
    """A TCP port that accepts and never answers (a Redis that hangs); its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def _cmdlines() -> dict[int, str]:
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
                found[int(entry)] = raw.replace(b"\0", b" ").decode("utf-8", "replace")
    return found


def test_the_redis_password_is_in_no_argv_and_no_failure_text(
    loopback_host: SshServer, client_key: Path, tmp_path: Path
) -> None:
    """While the agent waits on a Redis that never answers, every process on this machine (the
    manager's ssh and the remote's python: the loopback host is this machine) is read from
    /proc; the password is on none of their command lines. A real Redis refusing a wrong
    password: neither password shows in the failure's message, suggestion or logs."""
    session = _session(loopback_host, client_key, tmp_path / "data")
    seen: list[str] = []
    leaked: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for line in _cmdlines().values():
                if "SERVETUNE" in line or "servetune_agent" in line or "-I -c" in line:
                    seen.append(line)
                if SECRET in line:
                    leaked.append(line)

    with _silent_listener() as port:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        params = {"host": "127.0.0.1", "port": port, "password": SECRET, "timeout_s": 3}
        try:
            with pytest.raises(DeployFailed) as caught:
                asyncio.run(session.run_agent("redis_probe", params, timeout_s=60))
        finally:
            done.set()
            watcher.join(10)
    assert seen, "the watcher never saw the agent's processes: it proves nothing"
    assert leaked == []
    assert caught.value.category is Category.REDIS_UNREACHABLE
    said = " ".join([str(caught.value), caught.value.suggestion, *caught.value.logs])
    assert SECRET not in said

    redis = RedisServer(tmp_path / "redis", password=SECRET)
    redis.start()
    try:
        wrong = {
            "host": "127.0.0.1",
            "port": redis.port,
            "password": "wrong-pw-93ab",
            "timeout_s": 5,
        }
        with pytest.raises(DeployFailed) as caught:
            asyncio.run(session.run_agent("redis_probe", wrong, timeout_s=60))
        said = " ".join([str(caught.value), caught.value.suggestion, *caught.value.logs])
        assert caught.value.category is Category.REDIS_UNREACHABLE
        assert "wrong-pw-93ab" not in said and SECRET not in said
        right = {**wrong, "password": SECRET}
        assert asyncio.run(session.run_agent("redis_probe", right, timeout_s=60)) == {
            "reply": "PONG"
        }
    finally:
        redis.stop()


def test_the_api_refuses_install_dirs_that_could_not_work_and_keeps_the_slot(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    harness = Harness(tmp_path, private_redis.url)
    with TestClient(harness.app) as client:
        good = {"name": "gpu-1", "ssh_command": "ssh gpu@gpu-1"}
        for install_dir, says in (
            ("/opt/st%d", "'%'"),
            ("/opt/\u202eenut", "U+202E"),
            ("~/../../etc", "holds '..'"),
            ("/", "the root or the home directory"),
            ("/tmp", "system or shared directory"),
        ):
            refused = client.post("/api/worker-slots", json={**good, "install_dir": install_dir})
            assert refused.status_code == 422, refused.text
            [problem] = refused.json()["problems"]
            assert problem["field"] == "install_dir"
            assert says in problem["message"], problem
            assert "e.g. ~/.servetune" in problem["fix"], problem  # the fix, apart
        for ssh_command in ("ssh -J -Emarker gpu-1", "ssh user@-Emarker", "ssh -l -v gpu-1"):
            refused = client.post("/api/worker-slots", json={**good, "ssh_command": ssh_command})
            assert refused.status_code == 422, refused.text
            assert [p["field"] for p in refused.json()["problems"]] == ["ssh_command"]

        # a space is fine with a direct Redis address, not once the slot switches to a tunnel
        direct = {"redis_via": "direct", "redis_address": "10.0.0.5:6379"}
        created = client.post(
            "/api/worker-slots", json={**good, **direct, "install_dir": "/opt/servetune tuner"}
        )
        assert created.status_code == 201, created.text
        slot = created.json()
        url = f"/api/worker-slots/{slot['id']}"
        refused = client.patch(url, json={"redis_via": "forward"})
        assert refused.status_code == 422, refused.text
        assert [p["field"] for p in refused.json()["problems"]] == ["install_dir"]
        assert "redis_via forward" in refused.json()["problems"][0]["message"]
        assert client.get(url).json() == slot  # nothing changed
        assert harness.deployers == []  # nothing was handed to a deployer


class SlowRemoveDeployer(StandInDeployer):
    """The stand-in deployer whose ``remove`` (dropping the tunnel key) waits for
    ``remove_release``, so a request can arrive while a delete is halfway."""

    def __init__(self, settings: Settings, redis_url: str, registry: Any) -> None:
        super().__init__(settings, redis_url, registry)
        self.removing = threading.Event()
        self.remove_release = threading.Event()

    async def remove(self, slot: WorkerSlot, *, stop_worker: bool = True) -> DeployReport:
        self.removing.set()
        await asyncio.to_thread(self.remove_release.wait, 30)
        return await super().remove(slot, stop_worker=stop_worker)


def test_a_deploy_asked_while_the_slot_is_being_deleted_is_refused(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """Before the fix the deploy ran during the delete: with the real Deployer it adds the
    tunnel key after the delete removed it, a key left in authorized_keys for no slot."""
    made: list[SlowRemoveDeployer] = []

    def factory(settings: Settings, url: str, registry: Any) -> SlowRemoveDeployer:
        made.append(SlowRemoveDeployer(settings, url, registry))
        return made[-1]

    app = create_app(
        slot_settings(tmp_path, private_redis.url),
        supervisor_factory=ScriptedSupervisor,
        deployer_factory=factory,
    )
    with TestClient(app) as client:
        created = client.post("/api/worker-slots", json={"name": "gpu-1", "ssh_command": "ssh h"})
        url = f"/api/worker-slots/{created.json()['id']}"
        answers: dict[str, Any] = {}
        deleting = threading.Thread(
            target=lambda: answers.setdefault("delete", client.delete(url)), daemon=True
        )
        deleting.start()
        while not made:
            threading.Event().wait(0.01)
        [deployer] = made
        try:
            assert deployer.removing.wait(10)
            for method, path in (("POST", f"{url}/deploy"), ("POST", f"{url}/restore")):
                busy = client.request(method, path)
                assert busy.status_code == 409, (method, busy.text)
                assert "being deleted" in busy.json()["detail"]
            busy = client.patch(url, json={"max_parallel": 2})
            assert busy.status_code == 409, busy.text
        finally:
            deployer.remove_release.set()
            deleting.join(10)
        assert answers["delete"].status_code == 200, answers["delete"].text
        assert deployer.calls == []  # no deploy reached the deployer
        assert deployer.removed == ["gpu-1"]
        assert client.post(f"{url}/deploy").status_code == 404
