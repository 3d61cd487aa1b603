"""Each ssh-level failure provoked for real (the system ssh against real sshd servers, closed ports,
dropped packets, unresolvable names, unreachable routes) is classified by ``classify_ssh`` into its
category, with a suggestion naming what was found (host, port, known_hosts file, key, name).

The ssh calls are shaped like remote/ssh.py's: ``ssh -F <generated config> -p PORT -i KEY -- dest
cmd``, the config holding BatchMode, ConnectTimeout 2, our own known_hosts and the host key
policy in a ``Host *`` block.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servetune.errors import DeployFailed
from servetune.remote.diagnose import classify_ssh
from servetune.remote.models import Category, CommandResult
from tests.redis_server import free_port
from tests.sshd import NetnsHost, SshServer, make_key, netns_host

pytestmark = pytest.mark.integration

CONNECT_TIMEOUT_S = 2


def write_config(
    folder: Path, *, strict: str = "accept-new", identity: Path | None = None
) -> tuple[Path, Path]:
    """A generated ssh config (as remote/ssh.py writes one) and its known_hosts; (config, kh).
    ``identity`` goes into the ``Host *`` block, so ProxyJump hops use it too."""
    folder.mkdir(parents=True, exist_ok=True)
    known_hosts = folder / "known_hosts"
    config = folder / "target.conf"
    config.write_text(
        "Host *\n"
        "  BatchMode yes\n"
        f"  ConnectTimeout {CONNECT_TIMEOUT_S}\n"
        f"  UserKnownHostsFile {known_hosts}\n"
        f"  StrictHostKeyChecking {strict}\n"
        "  IdentitiesOnly yes\n" + (f"  IdentityFile {identity}\n" if identity else "")
    )
    return config, known_hosts


def run_ssh(
    config: Path,
    destination: str,
    *options: str,
    command: str = "true",
    netns: NetnsHost | None = None,
) -> CommandResult:
    """Run the system ssh for real; its CommandResult (argv without the netns wrapper)."""
    argv = ["ssh", "-F", str(config), *options, "--", destination, command]
    started = time.monotonic()
    done = subprocess.run(  # noqa: S603
        netns.argv(argv) if netns else argv,
        capture_output=True,
        text=True,
        timeout=CONNECT_TIMEOUT_S * 5 + 10,
        check=False,
    )
    return CommandResult(
        argv=argv,
        returncode=done.returncode,
        stdout=done.stdout,
        stderr=done.stderr,
        duration_s=time.monotonic() - started,
    )


def classified(result: CommandResult, target: str) -> DeployFailed:
    err = classify_ssh(result, target=target)
    assert err is not None, result
    return err


@pytest.fixture
def drop_host() -> Iterator[tuple[NetnsHost, str]]:
    """A network namespace where 10.203.0.5 is routed out of its veth to a MAC nobody has: every
    packet sent there vanishes, as behind a firewall that drops (ssh's connect times out)."""
    with netns_host() as host:
        address = "10.203.0.5"
        for args in (
            ["route", "add", f"{address}/32", "dev", host.veth_ns],
            ["neigh", "add", address, "lladdr", "02:00:00:00:02:03", "dev", host.veth_ns,
             "nud", "permanent"],
        ):  # fmt: skip
            subprocess.run(["ip", "-n", host.name, *args], check=True, capture_output=True)  # noqa: S603
        yield host, address


def test_closed_port_is_connection_refused(tmp_path: Path, client_key: Path) -> None:
    config, _ = write_config(tmp_path)
    port = str(free_port())
    result = run_ssh(config, "root@127.0.0.1", "-p", port, "-i", str(client_key))
    err = classified(result, "root@127.0.0.1")
    assert err.category is Category.CONNECTION_REFUSED, result.stderr
    assert f"127.0.0.1:{port}" in err.suggestion
    assert "systemctl status ssh" in err.suggestion


def test_a_port_that_drops_the_connection_before_the_handshake_is_connection_refused(
    tmp_path: Path, client_key: Path
) -> None:
    """Something accepts the TCP connection and closes it at once (not sshd, or an sshd that
    turns this client away): not an unknown failure."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = str(listener.getsockname()[1])

    def drop() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                conn.close()

    threading.Thread(target=drop, daemon=True).start()
    try:
        config, _ = write_config(tmp_path)
        result = run_ssh(config, "root@127.0.0.1", "-p", port, "-i", str(client_key))
    finally:
        listener.close()
    err = classified(result, "root@127.0.0.1")
    assert err.category is Category.CONNECTION_REFUSED, result.stderr
    assert f"127.0.0.1:{port}" in err.suggestion
    assert "before the ssh handshake" in err.suggestion and "-p" in err.suggestion


def test_rsync_to_a_closed_port_is_connection_refused(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path / "ssh")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "wheel.txt").write_text("x")
    port = str(free_port())
    argv = [
        "rsync", "-a", "-s", "-e", f"ssh -F {config} -p {port}",
        f"{tmp_path / 'src'}/", "root@127.0.0.1:/tmp/servetune-never/",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)  # noqa: S603
    result = CommandResult(
        argv=argv, returncode=done.returncode, stdout=done.stdout, stderr=done.stderr,
        duration_s=0.1,
    )  # fmt: skip
    err = classified(result, "root@127.0.0.1")
    assert err.category is Category.CONNECTION_REFUSED, result.stderr
    assert f"127.0.0.1:{port}" in err.suggestion


def test_dropped_packets_are_connection_timeout(
    tmp_path: Path, drop_host: tuple[NetnsHost, str]
) -> None:
    host, address = drop_host
    config, _ = write_config(tmp_path)
    result = run_ssh(config, f"root@{address}", netns=host)
    assert result.duration_s < CONNECT_TIMEOUT_S + 3
    err = classified(result, f"root@{address}")
    assert err.category is Category.CONNECTION_TIMEOUT, result.stderr
    assert f"{address}:22" in err.suggestion
    assert "firewall" in err.suggestion


@pytest.mark.parametrize("isolated", [False, True], ids=["root-namespace", "no-network"])
def test_unresolvable_name_is_name_not_resolved(tmp_path: Path, isolated: bool) -> None:
    """In the root namespace the resolver answers NXDOMAIN; in a namespace with no network it
    cannot ask at all ("Temporary failure in name resolution")."""
    config, _ = write_config(tmp_path)
    with contextlib.ExitStack() as stack:
        host = stack.enter_context(netns_host()) if isolated else None
        result = run_ssh(config, "root@gpu-host.x.invalid", netns=host)
    err = classified(result, "root@gpu-host.x.invalid")
    assert err.category is Category.NAME_NOT_RESOLVED, result.stderr
    assert "gpu-host.x.invalid" in err.suggestion


@pytest.mark.parametrize("route_type", ["unreachable", "prohibit"])
def test_unreachable_route_is_no_route(tmp_path: Path, route_type: str) -> None:
    """`prohibit` makes connect() fail with "Permission denied": a route, not a refused key."""
    config, _ = write_config(tmp_path)
    address = "10.204.0.9"
    with netns_host() as host:
        subprocess.run(  # noqa: S603
            ["ip", "-n", host.name, "route", "add", route_type, f"{address}/32"],
            check=True,
            capture_output=True,
        )
        result = run_ssh(config, f"root@{address}", netns=host)
    err = classified(result, f"root@{address}")
    assert err.category is Category.NO_ROUTE, result.stderr
    assert f"ip route get {address}" in err.suggestion


def test_changed_host_key_stops_and_says_how_to_forget_the_old_key(
    tmp_path: Path, loopback_host: SshServer, client_key: Path
) -> None:
    config, known_hosts = write_config(tmp_path / "ssh")
    options = ("-p", str(loopback_host.port), "-i", str(client_key))
    first = run_ssh(config, "root@127.0.0.1", *options)
    assert first.returncode == 0, first.stderr  # accept-new recorded the key
    loopback_host.stop()
    loopback_host.new_host_key()
    loopback_host.start()
    result = run_ssh(config, "root@127.0.0.1", *options)
    err = classified(result, "root@127.0.0.1")
    assert err.category is Category.HOST_KEY_CHANGED, result.stderr
    port = loopback_host.port
    assert f"127.0.0.1 port {port}" in err.suggestion
    assert f"ssh-keygen -R '[127.0.0.1]:{port}' -f {known_hosts}" in err.suggestion
    # the line it gives works: after it, accept-new records the new key and ssh gets in
    subprocess.run(  # noqa: S603
        ["ssh-keygen", "-R", f"[127.0.0.1]:{port}", "-f", str(known_hosts)],
        check=True,
        capture_output=True,
    )
    assert run_ssh(config, "root@127.0.0.1", *options).returncode == 0


def test_unknown_host_key_with_strict_checking(
    tmp_path: Path, loopback_host: SshServer, client_key: Path
) -> None:
    config, known_hosts = write_config(tmp_path, strict="yes")
    port = str(loopback_host.port)
    result = run_ssh(config, "root@127.0.0.1", "-p", port, "-i", str(client_key))
    err = classified(result, "root@127.0.0.1")
    assert err.category is Category.HOST_KEY_UNKNOWN, result.stderr
    assert f"ssh-keyscan -p {port} 127.0.0.1 >> {known_hosts}" in err.suggestion


def test_refused_key_names_user_host_and_the_key(tmp_path: Path, loopback_host: SshServer) -> None:
    config, _ = write_config(tmp_path)
    wrong = make_key(tmp_path / "keys" / "not_authorized")
    port = str(loopback_host.port)
    result = run_ssh(config, "root@127.0.0.1", "-p", port, "-i", str(wrong))
    err = classified(result, "root@127.0.0.1")
    assert err.category is Category.AUTH_REFUSED, result.stderr
    assert "root@127.0.0.1" in err.suggestion
    assert str(wrong) in err.suggestion
    assert f"ssh-copy-id -i {wrong}.pub -p {port} root@127.0.0.1" in err.suggestion


def test_missing_remote_python_is_python_missing(
    tmp_path: Path, loopback_host: SshServer, client_key: Path
) -> None:
    config, _ = write_config(tmp_path)
    port = str(loopback_host.port)
    result = run_ssh(
        config,
        "root@127.0.0.1",
        "-p",
        port,
        "-i",
        str(client_key),
        command="python3.99 -I -c pass",
    )
    err = classified(result, "root@127.0.0.1")
    assert err.category is Category.PYTHON_MISSING, (result.returncode, result.stderr)
    assert "python3.99 was not found on 127.0.0.1" in err.suggestion
    assert ">= 3.11" in err.suggestion


def test_destination_refused_behind_a_jump_host_names_the_destination(
    tmp_path: Path, loopback_host: SshServer, client_key: Path
) -> None:
    config, _ = write_config(tmp_path, identity=client_key)
    closed = str(free_port())
    jump = f"root@127.0.0.1:{loopback_host.port}"
    result = run_ssh(config, "root@127.0.0.1", "-J", jump, "-p", closed)
    err = classified(result, "root@127.0.0.1")
    assert err.category is Category.CONNECTION_REFUSED, result.stderr
    assert f"127.0.0.1:{closed}" in err.suggestion
    assert "UNKNOWN" not in err.suggestion


def test_key_refused_by_the_jump_host_names_the_jump_host(
    tmp_path: Path, loopback_host: SshServer, client_key: Path
) -> None:
    """-i on the command line is not used for the hop: the hop refuses, and says so."""
    config, _ = write_config(tmp_path)
    jump = f"root@127.0.0.1:{loopback_host.port}"
    result = run_ssh(config, "root@10.0.0.7", "-J", jump, "-i", str(client_key))
    err = classified(result, "root@10.0.0.7")
    assert err.category is Category.AUTH_REFUSED, result.stderr
    assert f"-p {loopback_host.port} root@127.0.0.1" in err.suggestion
