"""A private ``redis-server`` on a free port for tests that need isolation or faults.

Tests start their own (never the machine's shared 6379) so they can kill and restart it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis


def free_port() -> int:
    """A TCP port nothing listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process with no persistence, started in ``folder`` on ``port``.

    ``url`` is its redis:// URL; ``stop()`` (SIGTERM), ``kill()`` (SIGKILL) and ``start()``
    again on the same port restart it (data is lost, as with the machine's Redis).
    """

    def __init__(self, folder: Path, port: int | None = None, password: str | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (Debian: apt-get install redis-server)")
        self.binary = binary
        self.folder = folder
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start it and wait until it answers PING; raises RuntimeError if it does not."""
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.folder)]
        if self.password:
            argv += ["--requirepass", self.password]
        log_path = self.folder / "redis.log"
        with log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}); see {log_path}")
            with contextlib.suppress(redis.RedisError):
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout_s} s")

    def stop(self) -> None:
        """SIGTERM and wait (no-op when not running)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL and wait (no-op when not running)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        """A synchronous redis-py client on it (responses decoded as str)."""
        return redis.Redis.from_url(self.url, decode_responses=True)


@contextlib.contextmanager
def redis_server(folder: Path, password: str | None = None) -> Iterator[RedisServer]:
    """A started ``RedisServer`` in ``folder``, stopped on exit."""
    server = RedisServer(folder, password=password)
    server.start()
    try:
        yield server
    finally:
        server.kill()
