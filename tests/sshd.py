"""Test hosts for the SSH deploy tests: real OpenSSH servers, in the root network namespace or in
network namespaces of their own.

- ``SshServer``: a real ``sshd -D`` on a free port with its own host key and authorized_keys
  file, optionally inside a network namespace and with some paths hidden from it (a private mount
  namespace where each hidden path is covered by /dev/null: ``rsync`` then is not executable).
- ``NetnsHost``: a network namespace joined to the root namespace by a veth pair
  (``host_side`` = 10.201.N.1 in the root namespace, ``address`` = 10.201.N.2 inside) with no
  default route: from inside, only the root namespace's 10.201.N.1 is reachable, never a package
  index. Processes started inside share the file system (same paths, same Python builds).

Everything needs root (sshd for root logins, ``ip netns``, ``mount``); ``require_root()`` skips
with the reason on a machine without it. Everything started is stopped by ``stop()`` / the
fixtures: processes (the whole namespace's), namespaces, veths.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import free_port

SSHD = "/usr/sbin/sshd"
REMOTE_UV_CACHE = (
    Path(os.environ.get("SERVETUNE_TEST_CACHE", Path.home() / ".cache" / "servetune-tests"))
    / "uv-remote"
)
"""The uv cache the test hosts' sessions use (``UV_CACHE_DIR``, set by sshd): kept across runs,
as a real host keeps its own between deploys; installs still resolve against the index (online)
or the shipped wheelhouse (offline)."""
PRIVSEP_DIR = Path("/run/sshd")

HIDE_AND_EXEC = (
    "import os, subprocess, sys\n"
    "n = int(sys.argv[1])\n"
    "for p in sys.argv[2:2 + n]:\n"
    "    subprocess.run(['mount', '--bind', '/dev/null', p], check=True)\n"
    "os.execv(sys.argv[2 + n], sys.argv[2 + n:])\n"
)
"""Run in a private mount namespace: cover each hidden path with /dev/null, then exec the rest."""


def require_root() -> None:
    """Skip the calling test, saying why, where sshd, ssh or root rights are missing."""
    if os.geteuid() != 0:
        pytest.skip("the SSH host tests need root (sshd for root logins, ip netns, mount)")
    for tool in (SSHD, "ssh", "ssh-keygen", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install openssh-server iproute2)")


def make_key(path: Path, comment: str = "servetune-test") -> Path:
    """A new passphrase-less ed25519 key pair at ``path`` (+ ``path.pub``); ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(  # noqa: S603
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None) -> None:
    """Wait until ``host:port`` accepts a TCP connection; RuntimeError after ``timeout_s`` or when
    ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {host}:{port} opened")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{host}:{port} did not open within {timeout_s} s")


class NetnsHost:
    """A network namespace joined to the root namespace by a veth pair, with no default route.

    ``address`` (10.201.N.2) is the host's address inside; ``host_side`` (10.201.N.1) is the root
    namespace's end, the only address reachable from inside (listen there for what the host must
    reach: the manager's sshd, Redis). ``argv(cmd)`` wraps a command to run inside.
    """

    def __init__(self, index: int | None = None) -> None:
        self.index = index if index is not None else _free_net_index()
        self.name = f"st-{os.getpid() % 100000}-{self.index}"
        self.veth_host = f"vsth{self.index}"
        self.veth_ns = f"vstn{self.index}"
        self.host_side = f"10.201.{self.index}.1"
        self.address = f"10.201.{self.index}.2"
        self.started = False

    def start(self) -> NetnsHost:
        """Create the namespace and the veth pair, bring them up; ``self``."""
        run = _ip
        run("netns", "add", self.name)
        self.started = True
        run("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        run("link", "set", self.veth_ns, "netns", self.name)
        run("addr", "add", f"{self.host_side}/30", "dev", self.veth_host)
        run("link", "set", self.veth_host, "up")
        run("-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.veth_ns)
        run("-n", self.name, "link", "set", self.veth_ns, "up")
        run("-n", self.name, "link", "set", "lo", "up")
        return self

    def argv(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def pids(self) -> list[int]:
        """Pids of the processes inside the namespace now."""
        out = subprocess.run(  # noqa: S603
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        """Kill every process inside, delete the namespace (its veth end goes with it)."""
        if not self.started:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while pids and self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)  # noqa: S603
        subprocess.run(["ip", "link", "del", self.veth_host], check=False, capture_output=True)  # noqa: S603
        self.started = False


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)  # noqa: S603


def _free_net_index() -> int:
    used = subprocess.run(
        ["ip", "-o", "addr", "show"], capture_output=True, text=True, check=False
    ).stdout
    start = os.getpid() % 200 + 20
    for i in range(250):
        n = (start + i) % 250 + 1
        if f"10.201.{n}." not in used:
            return n
    raise RuntimeError("no free 10.201.N.0/30 subnet for a test host")


class SshServer:
    """A real OpenSSH server for tests, started by ``start()`` and stopped by ``stop()``.

    ``folder`` holds its config, host key, authorized_keys and log. It listens on ``listen``
    addresses (default 127.0.0.1) on ``port`` (default: a free one), inside ``netns`` when given,
    with ``hide`` paths covered by /dev/null in its own mount namespace (slave propagation: mounts
    made later in the root namespace, such as a tmpfs, still reach it). Root logs in with a key
    listed in ``authorized_keys`` (``authorize``); ``extra_config`` lines are appended to its
    sshd_config.
    """

    def __init__(
        self,
        folder: Path,
        *,
        listen: list[str] | None = None,
        port: int | None = None,
        netns: NetnsHost | None = None,
        hide: list[str] | None = None,
        extra_config: list[str] | None = None,
    ) -> None:
        self.folder = folder
        self.listen = listen or (["0.0.0.0"] if netns is not None else ["127.0.0.1"])
        self.port = port or free_port()
        self.netns = netns
        self.hide = hide or []
        self.extra_config = extra_config or []
        self.authorized_keys = folder / "authorized_keys"
        self.host_key = folder / "ssh_host_ed25519_key"
        self.config = folder / "sshd_config"
        self.log = folder / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """The address clients in the root namespace connect to."""
        if self.netns is not None:
            return self.netns.address
        return "127.0.0.1" if self.listen[0] in ("0.0.0.0", "127.0.0.1") else self.listen[0]

    def start(self, timeout_s: float = 10.0) -> SshServer:
        """Write the config and host key, start sshd and wait until it accepts; ``self``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        if not self.host_key.exists():
            make_key(self.host_key, "servetune-test-host")
        self.authorized_keys.touch(mode=0o600, exist_ok=True)
        lines = [
            f"Port {self.port}",
            *(f"ListenAddress {a}" for a in self.listen),
            f"HostKey {self.host_key}",
            "PidFile none",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "AllowTcpForwarding yes",
            "X11Forwarding no",
            "PrintMotd no",
            "LogLevel VERBOSE",
            "MaxStartups 100:30:200",
            "MaxSessions 50",
            "Subsystem sftp internal-sftp",
            f"SetEnv UV_CACHE_DIR={REMOTE_UV_CACHE}",
            *self.extra_config,
        ]
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        argv = [SSHD, "-D", "-e", "-f", str(self.config)]
        if self.hide:
            argv = [
                "unshare",
                "--mount",
                "--propagation",
                "slave",
                "--",
                sys.executable,
                "-c",
                HIDE_AND_EXEC,
                str(len(self.hide)),
                *self.hide,
                *argv,
            ]
        if self.netns is not None:
            argv = self.netns.argv(argv)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_port(self.address, self.port, timeout_s, self.proc)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"sshd did not start: {e}\n{self.log.read_text()[-2000:]}") from e
        return self

    def authorize(self, public_key: Path | str, options: str = "") -> None:
        """Let the key (a .pub file or its text) log in, with ``options`` (authorized_keys ones)."""
        text = public_key.read_text() if isinstance(public_key, Path) else public_key
        line = f"{options} {text.strip()}" if options else text.strip()
        with self.authorized_keys.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    def host_public_key(self) -> str:
        """The server's host public key line (``ssh-ed25519 AAAA… comment``)."""
        return Path(f"{self.host_key}.pub").read_text().strip()

    def new_host_key(self) -> None:
        """Replace the host key (a "changed host key" for clients that knew the old one); call
        before ``start()`` or restart the server after."""
        for p in (self.host_key, Path(f"{self.host_key}.pub")):
            p.unlink(missing_ok=True)
        make_key(self.host_key, "servetune-test-host-new")

    def ssh_command(self, key: Path, user: str = "root", *extra: str) -> str:
        """The ssh command a user would type to reach this server with ``key``."""
        return " ".join(
            ["ssh", "-p", str(self.port), "-i", str(key), *extra, f"{user}@{self.address}"]
        )

    def stop(self) -> None:
        """Stop sshd and every session it started (its process group)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None


@contextlib.contextmanager
def netns_host() -> Iterator[NetnsHost]:
    """A started NetnsHost, stopped (everything inside killed) afterwards."""
    require_root()
    host = NetnsHost()
    try:
        yield host.start()
    finally:
        host.stop()


@contextlib.contextmanager
def ssh_server(folder: Path, **kwargs: object) -> Iterator[SshServer]:
    """A started SshServer (``SshServer(folder, **kwargs)``), stopped afterwards."""
    require_root()
    server = SshServer(folder, **kwargs)  # type: ignore[arg-type]
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh ed25519 key pair for the manager side (the key a user's ssh command names)."""
    return make_key(tmp_path_factory.mktemp("client-key") / "id_ed25519")


@pytest.fixture
def loopback_host(
    tmp_path_factory: pytest.TempPathFactory, client_key: Path
) -> Iterator[SshServer]:
    """An sshd on 127.0.0.1 in the root namespace (with package-index access) that lets
    ``client_key`` log in as root."""
    with ssh_server(tmp_path_factory.mktemp("sshd-loopback")) as server:
        server.authorize(Path(f"{client_key}.pub"))
        yield server


@pytest.fixture
def netns_remote(
    tmp_path_factory: pytest.TempPathFactory, client_key: Path
) -> Iterator[tuple[NetnsHost, SshServer]]:
    """A NetnsHost (no route to any package index) with its own sshd that lets ``client_key`` log
    in as root; (host, server). Reach it at ``server.address``; it reaches ``host.host_side``."""
    with (
        netns_host() as host,
        ssh_server(tmp_path_factory.mktemp("sshd-netns"), netns=host) as server,
    ):
        server.authorize(Path(f"{client_key}.pub"))
        yield host, server
