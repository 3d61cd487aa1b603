"""A minimal real OpenSSH sshd on a free loopback port and client key pairs, for the tunnel and
authorized_keys tests (until the shared ``tests/sshd.py`` fixtures are used)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.redis_server import free_port

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass(frozen=True)
class KeyPair:
    """An ed25519 key pair made with ssh-keygen (no passphrase)."""

    private: Path
    public: str


def make_key(folder: Path, name: str = "id_ed25519") -> KeyPair:
    """A fresh key pair at ``folder/name`` (+ ``.pub``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    subprocess.run(  # noqa: S603 - argv list, fixed tool
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return KeyPair(path, (folder / f"{name}.pub").read_text().strip())


class MiniSshd:
    """``sshd -D -e`` on 127.0.0.1:<free port> with its own host key and ``authorized_keys``
    file (StrictModes off, public keys only, root login by key); ``stop()`` kills it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.authorized_keys = folder / "authorized_keys"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start it and wait for its banner; raises RuntimeError when it does not answer."""
        self.folder.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        host_key = self.folder / "host_ed25519"
        if not host_key.exists():
            make_key(self.folder, "host_ed25519")
        self.authorized_keys.touch()
        config = self.folder / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\nPidFile none\nStrictModes no\n"
            "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
            "AllowTcpForwarding yes\nLogLevel VERBOSE\n"
        )
        log = (self.folder / "sshd.log").open("ab")
        self.proc = subprocess.Popen(  # noqa: S603 - argv list
            [SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.folder / 'sshd.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"sshd on port {self.port} did not answer in {timeout_s} s")

    def stop(self) -> None:
        """Kill it (the connections it forked go with their clients)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        """What sshd logged so far."""
        return (self.folder / "sshd.log").read_text(errors="replace")


def client_files(folder: Path) -> tuple[Path, Path]:
    """(empty ssh config, known_hosts path) so the client reads nothing of the user's."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "ssh_config"
    config.write_text("")
    return config, folder / "known_hosts"
