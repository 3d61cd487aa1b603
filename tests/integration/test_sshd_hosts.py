"""The SSH test hosts themselves (tests/sshd.py): a key logs in, the namespace host reaches the
root namespace's side of its veth and nothing else, hidden paths are hidden."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from tests.sshd import NetnsHost, SshServer, ssh_server


def _ssh(
    server: SshServer, key: Path, *remote: str, known_hosts: Path
) -> subprocess.CompletedProcess[str]:
    argv = [
        "ssh", "-p", str(server.port), "-i", str(key), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "ConnectTimeout=5", f"root@{server.address}", *remote,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603


def test_a_key_logs_in_to_the_loopback_host(
    loopback_host: SshServer, client_key: Path, tmp_path: Path
) -> None:
    done = _ssh(loopback_host, client_key, "echo", "hello", known_hosts=tmp_path / "kh")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello"
    assert loopback_host.host_public_key().split()[1] in (tmp_path / "kh").read_text()


def test_the_namespace_host_has_no_route_out(
    netns_remote: tuple[NetnsHost, SshServer], client_key: Path, tmp_path: Path
) -> None:
    host, server = netns_remote
    probe = (
        "import socket,sys\n"
        "def ok(a):\n"
        "    try:\n"
        "        socket.create_connection(a, timeout=3).close(); return 'open'\n"
        "    except OSError as e:\n"
        "        return type(e).__name__\n"
        "print(ok((sys.argv[1], int(sys.argv[2]))), ok(('151.101.0.223', 443)))\n"
    )
    done = _ssh(
        server, client_key, "python3", "-c", shlex.quote(probe), host.host_side, "1",
        known_hosts=tmp_path / "kh",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    to_host_side, to_internet = done.stdout.split()
    assert to_host_side in ("ConnectionRefusedError", "open")  # reachable (port 1 is closed)
    assert to_internet == "OSError"  # ENETUNREACH: no default route


def test_hidden_paths_are_not_executable(client_key: Path, tmp_path: Path) -> None:
    with ssh_server(tmp_path / "sshd", hide=["/usr/bin/rsync"]) as server:
        server.authorize(Path(f"{client_key}.pub"))
        done = _ssh(
            server, client_key, "python3", "-c",
            shlex.quote("import shutil; print(shutil.which('rsync'), shutil.which('tar'))"),
            known_hosts=tmp_path / "kh",
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "/usr/bin/tar"]
