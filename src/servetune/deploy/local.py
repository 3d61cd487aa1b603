"""Local deployment: each engine runs as its own process group on this machine, on a free port.

The engine dies with the study process (PR_SET_PDEATHSIG, Linux); stop() ends its whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from servetune.engines.base import LaunchCommand
from servetune.errors import DeploymentError

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
"""prctl option: the signal the kernel sends a child when its parent thread dies (linux/prctl.h)."""

_POLL_S = 0.05


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that asks the kernel to SIGKILL the child when its parent dies (Linux only).

    Everything is looked up before fork: the child runs only the prctl call and a getppid check
    (the parent may already be gone by the time prctl runs; then the child exits at once).
    """
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    except (OSError, AttributeError):
        logger.warning("prctl unavailable; engines will not die with the study process")
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class LocalRunningEngine:
    """An engine process started by LocalDeployment, leader of its own process group.

    ``pid`` is also the process group id. ``returncode()`` polls without blocking; ``stop()``
    signals the whole group.
    """

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, stop_timeout_s: float):
        self._proc = proc
        self.pid: int | None = proc.pid
        self.pgid: int = proc.pid
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self._stopped = False

    def returncode(self) -> int | None:
        """Exit status once the process exited (negative = killed by that signal), else None."""
        return self._proc.poll()

    def log_text(self, max_bytes: int = 200_000) -> str:
        """The last ``max_bytes`` of the log (stdout and stderr), decoded as UTF-8 (replacing)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    async def stop(self) -> int | None:
        """SIGTERM the group, wait up to ``stop_timeout_s``, then SIGKILL it and wait; idempotent.

        Returns the engine's exit status (e.g. 0 after a clean shutdown, -9 when it was killed).
        """
        if self._stopped:
            return self._proc.poll()
        if self._proc.poll() is None or group_alive(self.pgid):
            _signal_group(self.pgid, signal.SIGTERM)
            if not await _wait_gone(self._proc, self.pgid, self.stop_timeout_s):
                logger.warning(
                    "engine group %d still alive %.0f s after SIGTERM; sending SIGKILL",
                    self.pgid,
                    self.stop_timeout_s,
                )
                _signal_group(self.pgid, signal.SIGKILL)
                if not await _wait_gone(self._proc, self.pgid, 10.0):
                    raise DeploymentError(f"engine process group {self.pgid} survived SIGKILL")
        self._stopped = True
        return self._proc.poll()


class LocalDeployment:
    """Runs engines as local processes, each in a new session (its own process group).

    ``host`` is where engines bind; ``stop_timeout_s`` is the SIGTERM → SIGKILL grace. The engine
    gets PR_SET_PDEATHSIG=SIGKILL, so it dies when the thread that started it dies: call
    ``start`` from a long-lived thread (the event loop's).
    """

    def __init__(self, host: str = "127.0.0.1", stop_timeout_s: float = 10.0) -> None:
        self.host = host
        self.stop_timeout_s = stop_timeout_s

    def reserve_port(self) -> tuple[str, int]:
        """(host, a port free right now): bind port 0 on ``host``, read the port, close.

        Another process may take it before the engine binds; the engine then fails with
        PORT_IN_USE, which is retried. Raises DeploymentError when ``host`` cannot be bound.
        """
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((self.host, 0))
                port = int(s.getsockname()[1])
        except OSError as e:
            raise DeploymentError(f"cannot bind {self.host}: {e}; check deployment.host") from e
        return self.host, port

    async def start(self, command: LaunchCommand, log_path: Path) -> LocalRunningEngine:
        """Spawn ``command.argv`` in a new session, stdout and stderr appended to ``log_path``.

        The environment is this process's plus ``command.env``. Raises DeploymentError when the
        program cannot be executed or the log cannot be opened.
        """
        log_path = Path(log_path)
        try:
            proc = _spawn(command, log_path)
        except OSError as e:
            raise DeploymentError(f"cannot start {command.argv[0]!r}: {e}") from e
        logger.info("started engine pid %d: %s (log %s)", proc.pid, command.display(), log_path)
        return LocalRunningEngine(proc, log_path, self.stop_timeout_s)


def _spawn(command: LaunchCommand, log_path: Path) -> subprocess.Popen[bytes]:
    """fork/exec the engine (fast, so fine on the event loop).

    A plain Popen rather than an asyncio subprocess: its handle polls and signals from any event
    loop or thread, and nothing depends on the loop that started it still running.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(  # noqa: S603 - argv list from the engine adapter, no shell
            command.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **command.env},
            start_new_session=True,
            preexec_fn=_pdeathsig_preexec(),
            close_fds=True,
        )


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group ``pgid``, from /proc (Linux).

    Elsewhere: ``[pgid]`` when ``killpg(pgid, 0)`` succeeds, else [].
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            return [pgid]
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may contain spaces or parens.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def group_alive(pgid: int) -> bool:
    """True while any non-zombie process of group ``pgid`` runs."""
    return bool(group_members(pgid))


async def _wait_gone(proc: subprocess.Popen[bytes], pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        proc.poll()  # reap the leader as soon as it exits
        if proc.returncode is not None and not group_alive(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)


def kill_process_group(
    pgid: int, *, must_contain: str | None = None, timeout_s: float = 10.0
) -> bool:
    """Stop a recorded engine group that may still run (found on resume): SIGTERM, then SIGKILL.

    No error when the group is gone. ``must_contain``: only act when some member's command line
    contains this text (e.g. the model path), so a reused process group id is left alone.
    Returns True when it signalled something. Raises ValueError for pgid ≤ 1 or this process's
    own group; blocks up to ``timeout_s`` + 5 s.
    """
    if pgid <= 1 or pgid == os.getpgrp():
        raise ValueError(f"refusing to kill process group {pgid}")
    members = group_members(pgid)
    if not members:
        return False
    if must_contain is not None and not any(must_contain in _cmdline(p) for p in members):
        logger.info("process group %d does not run %r; left alone", pgid, must_contain)
        return False
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    if group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
    logger.info("killed leftover engine process group %d", pgid)
    return True


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""
