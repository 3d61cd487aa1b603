"""SshSession and run_command against a real OpenSSH server (tests/sshd.py): ssh -G resolution,
the agent's probe round trip, pushing a tree by rsync and by tar stream, timeouts that kill the
whole process group, and slot ssh commands that try to run something."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from servetune.errors import DeployFailed
from servetune.remote.models import Category, RemoteFacts
from servetune.remote.ssh import SshSession, parse_ssh_command, run_command
from servetune.settings import Settings
from tests.sshd import SshServer, ssh_server

pytestmark = pytest.mark.integration


def _session(server: SshServer, key: Path, data_dir: Path, *extra: str) -> SshSession:
    return SshSession(
        parse_ssh_command(server.ssh_command(key, "root", *extra)), Settings(data_dir=data_dir)
    )


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _dies(pid: int, within_s: float = 3.0) -> bool:
    """The process is gone (or a zombie) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _tree(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Every entry under ``root``: relative path → (kind, permission bits, content/link)."""
    entries: dict[str, tuple[str, int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        name = str(path.relative_to(root))
        if stat.S_ISLNK(info.st_mode):
            entries[name] = ("link", 0, os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            entries[name] = ("dir", stat.S_IMODE(info.st_mode), b"")
        else:
            entries[name] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return entries


def test_resolve_reports_port_user_identity_and_writes_the_config(
    loopback_host: SshServer, client_key: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        session = _session(loopback_host, client_key, tmp_path / "data")
        resolved = await session.resolve()
        assert resolved.hostname == "127.0.0.1"
        assert resolved.port == loopback_host.port
        assert resolved.user == "root"
        assert resolved.identity_files[0] == str(client_key)
        assert resolved.proxy_jump is None
        assert resolved.strict_host_key_checking == "accept-new"
        config = session.config_path()
        assert config.parent == tmp_path / "data" / "ssh" / "config"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        text = config.read_text()
        blocks = text.split("\nHost ")
        assert blocks[1] == "127.0.0.1\n  IdentitiesOnly yes"  # the final host only, not a jump
        assert blocks[2].startswith("*\n")
        for line in ("BatchMode yes", "StrictHostKeyChecking accept-new", "ConnectTimeout 10"):
            assert f"\n  {line}\n" in blocks[2]
        assert f"  UserKnownHostsFile {tmp_path / 'data' / 'ssh' / 'known_hosts'}\n" in text

        strict = _session(
            loopback_host, client_key, tmp_path / "data", "-o", "StrictHostKeyChecking=yes",
            "-J", "admin@bastion.example:2200", "-l", "ubuntu",
        )  # fmt: skip
        resolved = await strict.resolve()
        assert resolved.strict_host_key_checking == "yes"
        assert resolved.proxy_jump == "admin@bastion.example:2200"
        assert resolved.user == "ubuntu"  # -l wins over root@ in ssh, as ssh -G says
        assert "StrictHostKeyChecking yes" in strict.config_path().read_text()
        assert strict.config_path() != config  # another content, another file

    asyncio.run(scenario())


def test_probe_round_trip_records_the_host_key(
    loopback_host: SshServer, client_key: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        session = _session(loopback_host, client_key, tmp_path / "data")
        install_dir = tmp_path / "install"
        result = await session.run_agent(
            "probe",
            {
                "install_dir": str(install_dir),
                "index_url": None,
                "index_timeout_s": 1,
                "min_python": [3, 6],
            },
            timeout_s=60,
        )
        facts = RemoteFacts.model_validate(result)
        assert facts.install_dir == str(install_dir)
        assert facts.has_tar is True
        assert facts.python_version.count(".") == 2
        known_hosts = (tmp_path / "data" / "ssh" / "known_hosts").read_text()
        assert loopback_host.host_public_key().split()[1] in known_hosts

    asyncio.run(scenario())


def test_agent_error_is_a_deploy_failure_with_its_category(
    loopback_host: SshServer, client_key: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        session = _session(loopback_host, client_key, tmp_path / "data")
        params = {"install_dir": str(tmp_path), "index_url": None, "index_timeout_s": 1}
        with pytest.raises(DeployFailed) as caught:
            await session.run_agent("probe", {**params, "min_python": [99, 0]}, timeout_s=60)
        assert caught.value.category is Category.PYTHON_TOO_OLD
        assert caught.value.step

    asyncio.run(scenario())


def test_a_missing_remote_python_is_a_deploy_failure(
    loopback_host: SshServer, client_key: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        session = _session(loopback_host, client_key, tmp_path / "data")
        with pytest.raises(DeployFailed) as caught:
            await session.run_agent("probe", {}, python="/nonexistent/python3", timeout_s=60)
        assert caught.value.category is Category.PYTHON_MISSING
        assert "/nonexistent/python3" in str(caught.value)

    asyncio.run(scenario())


def test_push_dir_by_rsync_and_by_tar_give_identical_trees(
    loopback_host: SshServer, client_key: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        source = tmp_path / "bundle"
        (source / "wheels" / "deep").mkdir(parents=True)
        (source / "empty").mkdir()
        (source / "a.whl").write_bytes(bytes(range(256)) * 300)
        (source / "wheels" / "deep" / "b.txt").write_text("hello\n")
        (source / "run.sh").write_text("#!/bin/sh\necho hi\n")
        (source / "run.sh").chmod(0o755)
        (source / "secret.json").write_text("{}")
        (source / "secret.json").chmod(0o600)
        (source / "wheels" / "link").symlink_to("deep/b.txt")
        session = _session(loopback_host, client_key, tmp_path / "data")

        by_rsync, by_tar = tmp_path / "remote-rsync", tmp_path / "remote-tar"
        by_rsync.mkdir()
        by_tar.mkdir()
        (by_tar / "kept.txt").write_text("already there")
        (by_rsync / "kept.txt").write_text("already there")
        done = await session.push_dir(source, str(by_rsync), rsync=True, timeout_s=60)
        assert done.argv[0] == "rsync"
        done = await session.push_dir(source, str(by_tar), rsync=False, timeout_s=60)
        assert done.argv[0] == "ssh"

        expected = _tree(source)
        expected["kept.txt"] = ("file", 0o644, b"already there")
        assert _tree(by_rsync) == expected
        assert _tree(by_tar) == expected

    asyncio.run(scenario())


def test_push_dir_falls_back_to_tar_when_the_remote_has_no_rsync(
    client_key: Path, tmp_path: Path
) -> None:
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "f").write_text("x")
    (tmp_path / "dst").mkdir()

    async def scenario() -> str:
        with ssh_server(tmp_path / "sshd", hide=["/usr/bin/rsync"]) as server:
            server.authorize(Path(f"{client_key}.pub"))
            session = _session(server, client_key, tmp_path / "data")
            done = await session.push_dir(
                tmp_path / "src", str(tmp_path / "dst"), rsync=True, timeout_s=60
            )
            return done.argv[0]

    assert asyncio.run(scenario()) == "ssh"  # the tar stream, through the agent
    assert _tree(tmp_path / "dst") == _tree(tmp_path / "src")


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    result = asyncio.run(
        run_command(
            ["sh", "-c", f"sleep 300 & echo $! > {pidfile}; echo started; wait"], timeout_s=1.0
        )
    )
    assert time.monotonic() - started < 5
    assert result.timed_out is True
    assert result.returncode == 124
    assert result.stdout == "started\n"  # what it wrote before the kill is kept
    assert _dies(int(pidfile.read_text()))


def test_cancelling_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    async def scenario() -> None:
        task = asyncio.ensure_future(
            run_command(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], timeout_s=60)
        )
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert _dies(int(pidfile.read_text()))


def test_a_command_that_exits_leaves_nothing_in_its_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    result = asyncio.run(
        run_command(["sh", "-c", f"sleep 300 >/dev/null 2>&1 & echo $! > {pidfile}"], timeout_s=10)
    )
    assert result.returncode == 0
    assert result.timed_out is False
    assert _dies(int(pidfile.read_text()))


def test_a_remote_command_past_its_timeout_is_killed(
    loopback_host: SshServer, client_key: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        session = _session(loopback_host, client_key, tmp_path / "data")
        # the agent's untar waits for a tar stream that never ends
        never_ending = _forever()
        started = time.monotonic()
        with pytest.raises(DeployFailed) as caught:
            await session.run_agent(
                "untar", {"dest": str(tmp_path / "x")}, timeout_s=3, stdin_tail=never_ending
            )
        assert time.monotonic() - started < 10
        assert caught.value.category is Category.STEP_TIMEOUT

    asyncio.run(scenario())


async def _forever() -> AsyncIterator[bytes]:
    while True:
        await asyncio.sleep(0.2)
        yield b""


@pytest.mark.parametrize(
    "extra",
    [
        ["-i", "'/tmp/$(touch {marker})'"],
        ["-i", "'/tmp/`touch {marker}`'"],
        ["-o", "'CertificateFile=/x;touch {marker}'"],
        ["-o", "'PreferredAuthentications=publickey;touch {marker}'"],
        ["-J", "'x;touch {marker}'"],
        ["-l", "'root$(touch {marker})'"],
        ["-o", "'ProxyCommand=touch {marker}'"],
        ["-o", "'LocalCommand=touch {marker}'", "-o", "PermitLocalCommand=yes"],
        ["root@127.0.0.1;", "touch", "{marker};"],
        ["root@127.0.0.1", "touch", "{marker}"],
        ["'$(touch {marker})'"],
        ["`touch {marker}`"],
    ],
)
def test_injection_in_the_ssh_command_runs_nothing(
    loopback_host: SshServer, client_key: Path, tmp_path: Path, extra: list[str]
) -> None:
    async def scenario() -> None:
        marker = tmp_path / "marker"
        command = loopback_host.ssh_command(
            client_key, "root", *(w.format(marker=marker) for w in extra)
        )
        try:
            target = parse_ssh_command(command)
        except DeployFailed as refused:
            assert refused.category is Category.SSH_COMMAND_INVALID
        else:
            session = SshSession(target, Settings(data_dir=tmp_path / "data"))
            params = {"install_dir": str(tmp_path), "index_url": None, "index_timeout_s": 1}
            # ssh refusing the option or the login is fine; running the marker command is not
            with contextlib.suppress(DeployFailed):
                await session.resolve()
            with contextlib.suppress(DeployFailed):
                await session.run_agent("probe", {**params, "min_python": [3, 6]}, timeout_s=60)
        assert not marker.exists()

    asyncio.run(scenario())


def test_a_changed_host_key_stops_the_session(
    loopback_host: SshServer, client_key: Path, tmp_path: Path
) -> None:
    session = _session(loopback_host, client_key, tmp_path / "data")
    params = {"install_dir": str(tmp_path), "index_url": None, "index_timeout_s": 1}
    probe = {**params, "min_python": [3, 6]}
    asyncio.run(session.run_agent("probe", probe, timeout_s=60))
    known_hosts = tmp_path / "data" / "ssh" / "known_hosts"
    recorded = known_hosts.read_text()
    loopback_host.stop()
    loopback_host.new_host_key()
    loopback_host.start()
    with pytest.raises(DeployFailed) as caught:
        asyncio.run(session.run_agent("probe", probe, timeout_s=60))
    said = str(caught.value) + "\n".join(caught.value.logs)
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in said
    assert known_hosts.read_text() == recorded  # the old key stays: nothing accepted the new one


def test_the_jump_hop_gets_servetunes_settings(
    loopback_host: SshServer, client_key: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The jump host's ssh (run by ssh itself) reads the generated config: batch mode, and the
    jump's host key lands in servetune's known_hosts, not in ~/.ssh/known_hosts. The key comes
    from an ssh-agent for the jump (the -i reaches the final hop only, with IdentitiesOnly)."""
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(  # noqa: S603
        ["ssh-agent", "-D", "-a", str(socket_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        for _ in range(100):
            if socket_path.exists():
                break
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(socket_path)}
        subprocess.run(["ssh-add", str(client_key)], env=env, check=True, capture_output=True)  # noqa: S603
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        with ssh_server(tmp_path / "final") as final:
            final.authorize(Path(f"{client_key}.pub"))
            jump = f"root@localhost:{loopback_host.port}"  # another name than the final host
            # -i reaches the final host only: the jump hop logs in with the agent's key
            command = f"ssh -J {jump} -i {client_key} -p {final.port} root@127.0.0.1"
            session = SshSession(parse_ssh_command(command), Settings(data_dir=tmp_path / "data"))
            params = {"install_dir": str(tmp_path), "index_url": None, "index_timeout_s": 1}
            facts = asyncio.run(
                session.run_agent("probe", {**params, "min_python": [3, 6]}, timeout_s=60)
            )
            known_hosts = (tmp_path / "data" / "ssh" / "known_hosts").read_text()
            assert facts["install_dir"] == str(tmp_path)
            assert f"[localhost]:{loopback_host.port} " in known_hosts  # the jump's key
            assert loopback_host.host_public_key().split()[1] in known_hosts
            assert final.host_public_key().split()[1] in known_hosts
    finally:
        agent.kill()
        agent.wait(timeout=5)


def test_resolve_names_a_missing_or_unprotected_key_file(client_key: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    missing = SshSession(parse_ssh_command(f"ssh -i {tmp_path}/nokey root@host"), settings)
    with pytest.raises(DeployFailed) as caught:
        asyncio.run(missing.resolve())
    assert caught.value.category is Category.SSH_COMMAND_INVALID
    assert f"{tmp_path}/nokey" in str(caught.value)

    client_key.chmod(0o644)
    loose = SshSession(parse_ssh_command(f"ssh -o IdentityFile={client_key} root@host"), settings)
    with pytest.raises(DeployFailed) as caught:
        asyncio.run(loose.resolve())
    assert caught.value.suggestion == f"run: chmod 600 {client_key}"


def test_a_data_dir_with_a_space_works_unless_a_jump_host_needs_it(
    loopback_host: SshServer, client_key: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "Application Support" / "servetune"  # a macOS manager's data dir
    session = _session(loopback_host, client_key, data_dir)
    params = {"install_dir": str(tmp_path), "index_url": None, "index_timeout_s": 1}
    asyncio.run(session.run_agent("probe", {**params, "min_python": [3, 6]}, timeout_s=60))
    known_hosts = (data_dir / "ssh" / "known_hosts").read_text()
    assert loopback_host.host_public_key().split()[1] in known_hosts

    jumping = _session(loopback_host, client_key, data_dir, "-J", "bastion")
    with pytest.raises(DeployFailed) as caught:
        jumping.ssh_argv()
    assert caught.value.category is Category.SSH_COMMAND_INVALID
    assert "SERVETUNE_DATA_DIR" in caught.value.suggestion
