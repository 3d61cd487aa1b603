"""A private redis-server for a manager started without --redis: a child on a loopback port.

It listens on 127.0.0.1 only, requires a random password, and dies with the manager (``stop()``,
and PR_SET_PDEATHSIG on Linux when the manager is killed); its port and password are kept in
DATA_DIR/redis/url and its data in an append-only file there, so a restarted manager brings back
the same URL (workers stay connected) and the queued jobs and results (nothing is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis.asyncio

from servetune.errors import ServetuneError

log = logging.getLogger(__name__)

INSTALL_HINT = "install redis-server (Debian: apt-get install redis-server) or pass --redis URL"
"""What to do when no redis-server is on PATH."""

START_TIMEOUT_S = 10.0
"""Longest wait for the private redis-server to answer PING, in s."""


class RedisNotInstalled(ServetuneError):
    """No ``redis-server`` on PATH for a manager started without ``--redis``."""


class RedisStartFailed(ServetuneError):
    """The private redis-server exited or did not answer in time; the message gives its log."""


@dataclass
class PrivateRedis:
    """A running private redis-server: ``url`` (with its password), ``stop()`` to end it."""

    url: str
    """redis://:<password>@127.0.0.1:<port>/0 — contains the password: log ``safe_url(url)``."""
    proc: subprocess.Popen[bytes] = field(repr=False)
    folder: Path

    async def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM it and wait up to ``timeout_s`` seconds, then SIGKILL (idempotent)."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, timeout_s)
        log.info("private redis-server (pid %d) stopped", self.proc.pid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port`` (a bind succeeds)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _previous(url_file: Path) -> tuple[int, str] | None:
    """The (port, password) of the URL a previous start left in ``url_file``, or None when
    there is none or it does not parse (then a fresh port and password are chosen)."""
    try:
        parts = urlsplit(url_file.read_text(encoding="utf-8").strip())
        port, password = parts.port, parts.password
    except (OSError, ValueError):
        return None
    if parts.scheme != "redis" or parts.hostname != "127.0.0.1" or not port or not password:
        return None
    return port, password


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGKILL the child when the manager dies (a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawn(argv: list[str], config: str) -> subprocess.Popen[bytes]:
    """Start redis-server with ``config`` written to its stdin (then closed)."""
    proc = subprocess.Popen(  # noqa: S603 - argv list, binary from PATH
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,  # only prctl: safe between fork and exec
    )
    assert proc.stdin is not None
    proc.stdin.write(config.encode())
    proc.stdin.close()
    return proc


async def start_private_redis(data_dir: Path) -> PrivateRedis:
    """Start ``redis-server`` on 127.0.0.1 with a password; the running one.

    Its working folder is ``data_dir/redis``: its log ``redis.log``, its append-only file
    (``appendonlydir``; appendfsync everysec, no RDB snapshots), and ``url``: the URL with the
    password, mode 0600, for workers on this host. A later start reuses that URL's port and
    password, so workers pointed at it reconnect by themselves and the jobs and results queued
    meanwhile are still there; only when something else holds that port is a new one chosen
    (logged as a warning: restart the workers with the new URL). Raises RedisNotInstalled when
    redis-server is not on PATH (the message says how to install it or to pass --redis), and
    RedisStartFailed when it exits or does not answer PING within ``START_TIMEOUT_S``.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisNotInstalled(f"no redis-server on PATH: {INSTALL_HINT}")
    folder = data_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    url_file = folder / "url"
    previous = _previous(url_file)
    if previous is None:
        port, password = _free_port(), secrets.token_urlsafe(24)
    else:
        port, password = previous
        if not _port_is_free(port):
            port = _free_port()
            log.warning(
                "port %d of the previous private redis-server is taken by something else: "
                "using port %d; restart the workers with the new URL in %s",
                previous[0],
                port,
                url_file,
            )
    argv = [binary, "-"]  # the configuration comes on stdin: the password never shows in ps
    config = "\n".join(
        [
            f"port {port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            f'requirepass "{password}"',
            'save ""',
            "appendonly yes",
            "appendfsync everysec",
            f'dir "{folder}"',
            f'logfile "{folder / "redis.log"}"',
            "",
        ]
    )
    proc = _spawn(argv, config)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    running = PrivateRedis(url=url, proc=proc, folder=folder)
    deadline = time.monotonic() + START_TIMEOUT_S
    client = redis.asyncio.Redis.from_url(url, socket_timeout=1)
    try:
        while True:
            if proc.poll() is not None:
                raise RedisStartFailed(
                    f"the private redis-server exited with status {proc.returncode}; see "
                    f"{folder / 'redis.log'}, or pass --redis URL"
                )
            with contextlib.suppress(redis.RedisError, OSError):
                if await client.ping():
                    break
            if time.monotonic() > deadline:
                await running.stop()
                raise RedisStartFailed(
                    f"the private redis-server on port {port} did not answer within "
                    f"{START_TIMEOUT_S:.0f} s; see {folder / 'redis.log'}, or pass --redis URL"
                )
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    fd = os.open(url_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file left by an older version may have other bits
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(url + "\n")
    log.info(
        "private redis-server (pid %d) on 127.0.0.1:%d; workers on this host: "
        'servetune worker --redis "$(cat %s)"',
        proc.pid,
        port,
        url_file,
    )
    return running
