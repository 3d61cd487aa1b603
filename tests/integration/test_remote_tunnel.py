"""The Redis tunnel for real: a real sshd, a real redis-server, the restricted authorized_keys
line, the supervised ssh (restart after kill, nothing left after stop), the worker's
``--config`` with its tunnel, and the manager's detached reverse tunnel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil
import pytest
import redis

from servetune.cluster import keys as redis_keys
from servetune.remote.keys import (
    add_key,
    authorized_line,
    fingerprint,
    known_hosts_text,
    parse_keyscan,
)
from servetune.remote.models import TunnelConfig, WorkerLaunchConfig
from servetune.remote.tunnel import (
    TunnelFailed,
    TunnelSupervisor,
    detached_running,
    start_detached,
    stop_detached,
    tunnel_argv,
)
from servetune.settings import Settings
from tests.integration.study_helpers import cli_env
from tests.redis_server import RedisServer, free_port
from tests.redis_server import redis_server as start_redis
from tests.sshd import NetnsHost, SshServer, make_key, netns_host, ssh_server

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class KeyPair:
    """An ed25519 key pair: the private key's path and the public key's line."""

    private: Path
    public: str


def new_key(folder: Path) -> KeyPair:
    private = make_key(folder / "id_ed25519")
    return KeyPair(private, Path(f"{private}.pub").read_text().strip())


def client_files(folder: Path) -> tuple[Path, Path]:
    """(an empty ssh config, a known_hosts path): the client reads nothing of the user's."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "ssh_config"
    config.write_text("")
    return config, folder / "known_hosts"


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    with ssh_server(tmp_path / "sshd") as server:
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password="s3cret-pw")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def worker_key(tmp_path: Path) -> KeyPair:
    return new_key(tmp_path / "worker-ssh")


def _cfg(
    tmp_path: Path,
    sshd: SshServer,
    key: KeyPair,
    target_port: int,
    *,
    direction: Literal["local", "remote"] = "local",
    bind_port: int | None = None,
) -> TunnelConfig:
    config, known_hosts = client_files(tmp_path / "client")
    return TunnelConfig(
        direction=direction,
        destination=f"root@{sshd.address}",
        port=sshd.port,
        identity_file=str(key.private),
        config_file=str(config),
        known_hosts_file=str(known_hosts),
        bind_port=bind_port or free_port(),
        target_host="127.0.0.1",
        target_port=target_port,
        keepalive_s=2,
    )


def _ping(port: int, password: str = "s3cret-pw") -> bool:
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=3)
        with client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _wait(predicate: Callable[[], object], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


@contextlib.contextmanager
def _ssh(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(  # noqa: S603 - argv list from tunnel_argv
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _ssh_processes(argv: list[str]) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if p.info["cmdline"] == argv and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


# ---- the restricted authorized_keys line, against a real sshd ---------------------------------


def test_restricted_key_forwards_to_redis_only(
    tmp_path: Path, sshd: SshServer, redis_server: RedisServer, worker_key: KeyPair
) -> None:
    line = authorized_line(worker_key.public, "gpu-1", "127.0.0.1", redis_server.port)
    add_key(sshd.authorized_keys, line, "gpu-1")
    cfg = _cfg(tmp_path, sshd, worker_key, redis_server.port)

    # the forward to Redis works
    with _ssh(tunnel_argv(cfg)):
        assert _wait(lambda: _ping(cfg.bind_port), 15), sshd.log.read_text()

    # no shell: a command runs /bin/false instead
    base = tunnel_argv(cfg)
    login = [a for a in base[: base.index("-L")] if a != "-N"]
    done = subprocess.run(  # noqa: S603 - argv list
        [*login, "--", cfg.destination, "touch", str(tmp_path / "marker")],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert not (tmp_path / "marker").exists()

    # and no forward to another port, even one that listens
    with start_redis(tmp_path / "other", password="s3cret-pw") as other:
        assert _ping(other.port)  # it answers directly
        other_cfg = cfg.model_copy(update={"target_port": other.port, "bind_port": free_port()})
        with _ssh(tunnel_argv(other_cfg)) as proc:
            time.sleep(1.5)
            assert proc.poll() is None  # ssh listens locally ...
            assert not _ping(other_cfg.bind_port)  # ... the server refuses the channel

    # nor a reverse forward
    reverse = cfg.model_copy(update={"direction": "remote", "bind_port": free_port()})
    with _ssh(tunnel_argv(reverse)) as proc:
        assert proc.wait(20) != 0  # ExitOnForwardFailure: the server refused -R


def test_a_strict_forward_tunnel_comes_up_only_with_the_pinned_host_key(
    tmp_path: Path, sshd: SshServer, redis_server: RedisServer, worker_key: KeyPair
) -> None:
    """StrictHostKeyChecking=yes (a worker's forward tunnel): an sshd whose key is not the one
    in known_hosts (an impostor at the manager's address) or an empty known_hosts gets no
    tunnel, nothing recorded; the keys ssh-keyscan reads off the sshd, written as the deploy
    writes them, let it up."""
    line = authorized_line(worker_key.public, "gpu-1", "127.0.0.1", redis_server.port)
    add_key(sshd.authorized_keys, line, "gpu-1")
    cfg = _cfg(tmp_path, sshd, worker_key, redis_server.port)
    cfg = cfg.model_copy(update={"strict_host_key_checking": "yes"})
    assert cfg.known_hosts_file is not None
    known_hosts = Path(cfg.known_hosts_file)
    other = make_key(tmp_path / "impostor" / "ssh_host_ed25519_key", "another-sshd")
    pinned_other = known_hosts_text(sshd.address, sshd.port, [Path(f"{other}.pub").read_text()])
    for content in (pinned_other, ""):
        known_hosts.write_text(content)
        with _ssh(tunnel_argv(cfg)) as proc:
            assert proc.wait(20) != 0
            assert proc.stderr is not None
            said = proc.stderr.read().decode()
        assert "Host key verification failed" in said, said
        assert not _ping(cfg.bind_port)
        assert known_hosts.read_text() == content  # nothing recorded on first use

    scanned = subprocess.run(  # noqa: S603 - argv list, as the deploy runs it
        ["ssh-keyscan", "-T", "5", "-p", str(sshd.port), sshd.address],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    host_keys = parse_keyscan(scanned.stdout)
    assert host_keys == [" ".join(sshd.host_public_key().split()[:2])], scanned
    listed = subprocess.run(  # noqa: S603 - argv list
        ["ssh-keygen", "-l", "-f", f"{sshd.host_key}.pub"], capture_output=True, text=True
    )
    assert fingerprint(host_keys[0]) in listed.stdout.split(), listed.stdout
    known_hosts.write_text(known_hosts_text(sshd.address, sshd.port, host_keys))
    with _ssh(tunnel_argv(cfg)):
        assert _wait(lambda: _ping(cfg.bind_port), 15), sshd.log.read_text()


# ---- the supervisor ---------------------------------------------------------------------------


def test_supervisor_restarts_a_killed_ssh_and_stop_leaves_none(
    tmp_path: Path,
    sshd: SshServer,
    redis_server: RedisServer,
    worker_key: KeyPair,
    caplog: pytest.LogCaptureFixture,
) -> None:
    asyncio.run(_restarts_a_killed_ssh(tmp_path, sshd, redis_server, worker_key, caplog))


async def _restarts_a_killed_ssh(
    tmp_path: Path,
    sshd: SshServer,
    redis_server: RedisServer,
    worker_key: KeyPair,
    caplog: pytest.LogCaptureFixture,
) -> None:
    line = authorized_line(worker_key.public, "gpu-1", "127.0.0.1", redis_server.port)
    add_key(sshd.authorized_keys, line, "gpu-1")
    cfg = _cfg(tmp_path, sshd, worker_key, redis_server.port)
    supervisor = TunnelSupervisor(cfg)
    supervisor.start()
    try:
        await supervisor.wait_ready(20)
        assert await asyncio.to_thread(_ping, cfg.bind_port)
        first = supervisor.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await asyncio.sleep(0.3)
        await supervisor.wait_ready(20)
        assert supervisor.pid not in (None, first)
        assert supervisor.restarts == 1
        assert await asyncio.to_thread(_ping, cfg.bind_port)
        assert "exited with status -9" in caplog.text
    finally:
        await supervisor.stop()
    assert supervisor.pid is None
    assert _ssh_processes(supervisor.argv) == []
    assert not await asyncio.to_thread(_ping, cfg.bind_port)


def test_supervisor_reports_why_the_tunnel_is_not_ready(
    tmp_path: Path, sshd: SshServer, redis_server: RedisServer, worker_key: KeyPair
) -> None:
    asyncio.run(_not_ready(tmp_path, sshd, redis_server, worker_key))


async def _not_ready(
    tmp_path: Path, sshd: SshServer, redis_server: RedisServer, worker_key: KeyPair
) -> None:
    # the key is not in authorized_keys: ssh keeps failing; wait_ready says so with ssh's words
    cfg = _cfg(tmp_path, sshd, worker_key, redis_server.port)
    supervisor = TunnelSupervisor(cfg)
    supervisor.start()
    try:
        with pytest.raises(TunnelFailed, match=f"127.0.0.1:{cfg.bind_port}") as failed:
            await supervisor.wait_ready(3)
    finally:
        await supervisor.stop()
    assert any("Permission denied (publickey" in line for line in failed.value.logs)
    assert _ssh_processes(supervisor.argv) == []


def test_supervisor_reverse_tunnel_is_ready_when_the_server_accepted_it(
    tmp_path: Path, sshd: SshServer, redis_server: RedisServer
) -> None:
    manager_key = new_key(tmp_path / "manager-ssh")
    sshd.authorized_keys.write_text(manager_key.public + "\n")
    cfg = _cfg(tmp_path, sshd, manager_key, redis_server.port, direction="remote")

    async def go() -> bool:
        supervisor = TunnelSupervisor(cfg)
        supervisor.start()
        try:
            await supervisor.wait_ready(20)
            return await asyncio.to_thread(_ping, cfg.bind_port)
        finally:
            await supervisor.stop()

    assert asyncio.run(go())  # the -R port is on the sshd's host: this one
    assert _ssh_processes(tunnel_argv(cfg)) == []


# ---- servetune worker --config ----------------------------------------------------------------


def _write_launch(path: Path, launch: WorkerLaunchConfig, mode: int) -> None:
    path.write_text(launch.model_dump_json())
    path.chmod(mode)


def _servetune(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - argv list of our own CLI
        [sys.executable, "-m", "servetune", *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        timeout=60,
        check=False,
    )


def test_worker_config_readable_by_others_or_mixed_with_options_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "worker.json"
    launch = WorkerLaunchConfig(
        redis_url="redis://:pw@127.0.0.1:1/0", name="gpu-1", data_dir=str(tmp_path / "d")
    )
    _write_launch(path, launch, 0o644)
    done = _servetune(tmp_path, "worker", "--config", str(path))
    assert done.returncode == 2
    assert f"chmod 600 {path}" in done.stderr
    path.chmod(0o600)
    done = _servetune(tmp_path, "worker", "--config", str(path), "--name", "x")
    assert done.returncode == 2
    assert "--name" in done.stderr and "--config" in done.stderr


@pytest.fixture
def worker_host() -> Iterator[NetnsHost]:
    """A network namespace with no route anywhere but the root namespace's veth end."""
    with netns_host() as host:
        yield host


def test_worker_with_a_tunnel_config_registers_through_sshd(
    tmp_path: Path, worker_host: NetnsHost, redis_server: RedisServer, worker_key: KeyPair
) -> None:
    # the worker runs in a namespace that cannot reach Redis (127.0.0.1 of the root namespace):
    # only the manager's sshd on the veth's root end, through which its tunnel goes
    with ssh_server(tmp_path / "sshd", listen=[worker_host.host_side]) as sshd:
        line = authorized_line(worker_key.public, "gpu-1", "127.0.0.1", redis_server.port)
        add_key(sshd.authorized_keys, line, "gpu-1")
        cfg = _cfg(tmp_path, sshd, worker_key, redis_server.port)
        data_dir = tmp_path / "wdata"
        launch = WorkerLaunchConfig(
            redis_url=f"redis://:s3cret-pw@127.0.0.1:{cfg.bind_port}/0",
            name="gpu-1",
            data_dir=str(data_dir),
            tunnel=cfg,
        )
        path = tmp_path / "worker.json"
        _write_launch(path, launch, 0o600)
        err_path = tmp_path / "worker.stderr"
        argv = [sys.executable, "-m", "servetune", "worker", "--config", str(path)]
        with err_path.open("wb") as err:
            proc = subprocess.Popen(  # noqa: S603 - argv list of our own CLI
                worker_host.argv([*argv, "--heartbeat-s", "1"]),
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=cli_env(tmp_path),
                start_new_session=True,  # as the agent starts it
            )
        try:
            _check_worker(proc, err_path, data_dir, redis_server, sshd)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _check_worker(
    proc: subprocess.Popen[bytes],
    err_path: Path,
    data_dir: Path,
    redis_server: RedisServer,
    sshd: SshServer,
) -> None:
    assert _wait(lambda: "ready" in err_path.read_text() or proc.poll() is not None, 60)
    assert proc.poll() is None, err_path.read_text()
    worker_id = json.loads((data_dir / "worker-gpu-1.json").read_text())["id"]
    with redis_server.client() as r:
        assert r.sismember(redis_keys.WORKERS, worker_id)
        info = json.loads(r.get(redis_keys.worker_info(worker_id)) or "{}")
    assert info["alias"] == "gpu-1"
    tunnel_ssh = [p for p in psutil.Process(proc.pid).children() if p.name() == "ssh"]
    assert len(tunnel_ssh) == 1
    assert os.getpgid(tunnel_ssh[0].pid) == proc.pid  # in the worker's group: dies with it
    assert "s3cret-pw" not in err_path.read_text()
    worker_log = (data_dir / "logs" / "worker-gpu-1.log").read_text()
    assert f"Redis tunnel to root@{sshd.address} ready" in worker_log
    assert "s3cret-pw" not in worker_log
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, err_path.read_text()
    assert not tunnel_ssh[0].is_running() or tunnel_ssh[0].status() == psutil.STATUS_ZOMBIE


def test_tunnel_command_refuses_a_bad_config_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "tunnel.json"
    doc = {"direction": "remote", "destination": "-oProxyCommand=touch x", "bind_port": 1}
    path.write_text(json.dumps({**doc, "target_host": "127.0.0.1", "target_port": 6379}))
    done = _servetune(tmp_path, "tunnel", "--config", str(path))
    assert done.returncode == 2
    assert "tunnel.destination" in done.stderr
    path.write_text(json.dumps({"direction": "remote"}))
    done = _servetune(tmp_path, "tunnel", "--config", str(path))
    assert done.returncode == 2
    assert "destination: Field required" in done.stderr


# ---- the manager's detached reverse tunnel ----------------------------------------------------


def test_a_reverse_tunnel_goes_through_the_slots_jump_host(
    tmp_path: Path, sshd: SshServer, redis_server: RedisServer
) -> None:
    """A slot reached with ``-J``: the manager's ``ssh -R`` goes through the same jump host; the
    hop reads the generated config (batch mode, servetune's known_hosts), as in a deploy."""
    manager_key = new_key(tmp_path / "manager-ssh")
    sshd.authorized_keys.write_text(manager_key.public + "\n")
    with ssh_server(tmp_path / "jump") as jump:
        jump.authorized_keys.write_text(manager_key.public + "\n")
        known_hosts = tmp_path / "client" / "known_hosts"
        config = tmp_path / "client" / "generated.conf"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(  # what SshSession generates: a Host * block every hop reads
            "Host *\n  BatchMode yes\n  StrictHostKeyChecking accept-new\n"
            f"  UserKnownHostsFile {known_hosts}\n  IdentityFile {manager_key.private}\n"
        )
        cfg = _cfg(tmp_path, sshd, manager_key, redis_server.port, direction="remote")
        cfg = cfg.model_copy(
            update={
                "proxy_jump": f"root@localhost:{jump.port}",
                "config_file": str(config),
                "known_hosts_file": str(known_hosts),
            }
        )
        proc = subprocess.Popen(  # noqa: S603 - tunnel_argv: an argv list
            tunnel_argv(cfg),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            if not _wait(lambda: _ping(cfg.bind_port) or proc.poll() is not None, 20):
                raise AssertionError("the tunnel never came up")
            assert proc.poll() is None, proc.communicate(timeout=5)[1]
            assert _ping(cfg.bind_port)
            recorded = known_hosts.read_text()
            assert f"[localhost]:{jump.port} " in recorded  # the jump hop's key, in our file
            assert jump.host_public_key().split()[1] in recorded
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_detached_reverse_tunnel_survives_its_caller_and_stops(
    tmp_path: Path, sshd: SshServer, redis_server: RedisServer
) -> None:
    manager_key = new_key(tmp_path / "manager-ssh")
    sshd.authorized_keys.write_text(manager_key.public + "\n")  # the user's own, unrestricted
    cfg = _cfg(tmp_path, sshd, manager_key, redis_server.port, direction="remote")
    settings = Settings(data_dir=tmp_path / "mdata")
    # started by a process that then exits
    code = (
        "import sys; from servetune.settings import Settings;"
        "from servetune.remote.models import TunnelConfig;"
        "from servetune.remote.tunnel import start_detached;"
        "print(start_detached(Settings(data_dir=sys.argv[1]), 'gpu-1',"
        " TunnelConfig.model_validate_json(sys.argv[2])))"
    )
    done = subprocess.run(  # noqa: S603 - argv list
        [sys.executable, "-c", code, str(settings.data_dir), cfg.model_dump_json()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pid = int(done.stdout.strip())
    try:
        config_path = settings.data_dir / "tunnels" / "gpu-1.json"
        assert (config_path.stat().st_mode & 0o777) == 0o600
        assert detached_running(settings, "gpu-1")
        assert psutil.Process(pid).cmdline()[-3:] == ["tunnel", "--config", str(config_path)]
        # the -R port is on the sshd's host: this one
        assert _wait(lambda: _ping(cfg.bind_port), 20), (
            settings.data_dir / "tunnels" / "gpu-1.log"
        ).read_text()
        assert stop_detached(settings, "gpu-1") is True
        assert not detached_running(settings, "gpu-1")
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert _ssh_processes(tunnel_argv(cfg)) == []
        assert not config_path.exists()
        assert stop_detached(settings, "gpu-1") is False
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_a_sigkilled_tunnel_process_leaves_no_ssh_behind(
    tmp_path: Path, sshd: SshServer, redis_server: RedisServer
) -> None:
    manager_key = new_key(tmp_path / "manager-ssh")
    sshd.authorized_keys.write_text(manager_key.public + "\n")
    cfg = _cfg(tmp_path, sshd, manager_key, redis_server.port, direction="remote")
    settings = Settings(data_dir=tmp_path / "mdata")
    pid = start_detached(settings, "gpu-1", cfg)
    try:
        assert _wait(lambda: _ping(cfg.bind_port), 20)
        assert len(_ssh_processes(tunnel_argv(cfg))) == 1
        os.kill(pid, signal.SIGKILL)  # the supervisor alone, not its group
        os.waitpid(pid, 0)
        assert _wait(lambda: not _ssh_processes(tunnel_argv(cfg)), 10)
        assert not detached_running(settings, "gpu-1")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        stop_detached(settings, "gpu-1")
