"""Local deployment: each engine runs as its own process group on this machine, on a free port.

The engine dies with the study process (PR_SET_PDEATHSIG, Linux); stop() ends its whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from servetune.engines.base import LaunchCommand
from servetune.errors import DeploymentError

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
"""prctl option: the signal the kernel sends a child when its parent thread dies (linux/prctl.h)."""

_POLL_S = 0.05


@functools.cache
def _prctl() -> Any:
    """libc's ``prctl`` through ctypes (None off Linux or when libc has none); looked up once:
    ``find_library`` runs ``ldconfig -p`` in a subprocess, which cost every engine launch a
    fork and exec on the event loop."""
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
    return prctl


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that asks the kernel to SIGKILL the child when its parent dies (Linux only).

    Everything is looked up before fork: the child runs only the prctl call and a getppid check
    (the parent may already be gone by the time prctl runs; then the child exits at once).
    """
    prctl = _prctl()
    if prctl is None:
        return None
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

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        stop_timeout_s: float,
        oom_before: Mapping[str, int] | None = None,
    ):
        self._proc = proc
        self.pid: int | None = proc.pid
        self.pgid: int = proc.pid
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self._stopped = False
        self._oom_before = dict(oom_before or {})
        self._oom_checked = False

    def returncode(self) -> int | None:
        """Exit status once the process exited (negative = killed by that signal), else None.

        The first time it sees the engine killed by SIGKILL (not by ``stop``), it looks for the
        kernel's evidence of an OOM kill (``oom_evidence``) and, when there is some, appends it
        to the engine's log as ``servetune: out-of-memory evidence: …``, where the classifier
        reads it.
        """
        rc = self._proc.poll()
        if rc is not None and not self._oom_checked:
            self._oom_checked = True
            if rc in (-signal.SIGKILL, 128 + signal.SIGKILL) and not self._stopped:
                evidence = oom_evidence(self._proc.pid, self._oom_before)
                if evidence:
                    logger.warning("engine pid %d: %s", self._proc.pid, evidence)
                    with contextlib.suppress(OSError), self.log_path.open("a") as log:
                        log.write(f"{OOM_EVIDENCE_PREFIX} {evidence}\n")
        return rc

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
        if self._proc.poll() is None:
            self._oom_checked = True  # a SIGKILL from here on is ours, not the kernel's
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

    ``host`` is where engines bind; ``stop_timeout_s`` is the SIGTERM → SIGKILL grace.

    ``die_with_parent`` (default True; Linux only, a no-op elsewhere): the engine gets
    PR_SET_PDEATHSIG=SIGKILL (prctl(2), set through ctypes in the child between fork and exec),
    so the kernel kills it when its parent dies, even by SIGKILL, which no ``finally`` survives.
    A worker relies on it: a worker killed mid-trial leaves no engine behind.

    Why the thread matters: the kernel fires the death signal when the *thread* that forked the
    child exits, not the process (prctl(2): "the parent thread"). ``start`` forks on the
    calling thread, so it must be the event loop's, which lives as long as the process; forking
    from ``asyncio.to_thread``'s pool would kill the engine as soon as that idle pool thread is
    reaped, in the middle of a trial.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        stop_timeout_s: float = 10.0,
        *,
        die_with_parent: bool = True,
    ) -> None:
        self.host = host
        self.stop_timeout_s = stop_timeout_s
        self.die_with_parent = die_with_parent

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
        before = oom_kill_counts()
        try:
            proc = _spawn(command, log_path, die_with_parent=self.die_with_parent)
        except OSError as e:
            raise DeploymentError(f"cannot start {command.argv[0]!r}: {e}") from e
        logger.info("started engine pid %d: %s (log %s)", proc.pid, command.display(), log_path)
        return LocalRunningEngine(proc, log_path, self.stop_timeout_s, before)


OOM_EVIDENCE_PREFIX = "servetune: out-of-memory evidence:"
"""Start of the line ``LocalRunningEngine`` appends to an engine's log when the kernel recorded
an OOM kill of it (engines/llamacpp/classify.py reads it as HOST_OOM evidence)."""

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def oom_kill_counts(
    pid: int | str = "self", *, proc: Path = Path("/proc"), cgroup_root: Path = _CGROUP_ROOT
) -> dict[str, int]:
    """The kernel's OOM-kill counters that cover process ``pid``: {source: count}.

    Sources: ``/proc/vmstat`` ``oom_kill`` (the host, Linux ≥ 4.13); for the process's memory
    cgroup and each ancestor, cgroup v2 ``memory.events`` ``oom_kill`` (under
    ``/sys/fs/cgroup`` or, on hybrid hosts, ``/sys/fs/cgroup/unified``) and cgroup v1
    ``memory.oom_control`` ``oom_kill`` (``/sys/fs/cgroup/memory``). Unreadable sources are
    left out (empty dict where there is none). Sources: Documentation/admin-guide/cgroup-v2.rst
    (memory.events), cgroup-v1/memory.rst (memory.oom_control).
    """
    counts: dict[str, int] = {}
    vmstat = _counter(proc / "vmstat", "oom_kill")
    if vmstat is not None:
        counts[str(proc / "vmstat")] = vmstat
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return counts
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            bases = [(cgroup_root, "memory.events"), (cgroup_root / "unified", "memory.events")]
        elif "memory" in controllers.split(","):
            bases = [(cgroup_root / "memory", "memory.oom_control")]
        else:
            continue
        rel = Path(path.lstrip("/"))
        for base, name in bases:
            for directory in [rel, *rel.parents]:
                file = base / directory / name
                n = _counter(file, "oom_kill")
                if n is not None:
                    counts[str(file)] = n
    return counts


def _counter(file: Path, key: str) -> int | None:
    """The integer after ``key`` in a ``key value`` per line file, or None."""
    try:
        text = file.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def kernel_oom_record(
    pid: int, kmsg: Path = Path("/dev/kmsg"), max_records: int = 200_000
) -> str | None:
    """The kernel log's line saying the OOM killer killed ``pid`` (``Out of memory: Killed
    process PID (…)``, ``Memory cgroup out of memory: Killed process PID …`` or
    ``oom-kill:…,pid=PID,…``), read from ``/dev/kmsg`` when readable (root or
    kernel.dmesg_restrict=0); None when there is none or the log cannot be read.

    Source: mm/oom_kill.c (``__oom_kill_process``, ``dump_oom_summary``)."""
    pattern = re.compile(rf"Killed process {pid}\b|oom-kill:.*[,:]pid={pid},")
    found: str | None = None
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        for _ in range(max_records):
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records overwritten while reading: go on
                    continue
                break
            if not record:
                break
            text = record.decode("utf-8", errors="replace")
            message = text.split(";", 1)[-1].strip()
            if pattern.search(message):
                found = message if "Killed process" in message or found is None else found
    finally:
        os.close(fd)
    return found


def oom_evidence(pid: int, before: Mapping[str, int]) -> str | None:
    """Why we may say the kernel's OOM killer ended ``pid``, or None without evidence: its kernel
    log record for that pid, else an OOM-kill counter (``oom_kill_counts``, taken ``before`` the
    start) that grew while it ran."""
    record = kernel_oom_record(pid)
    if record:
        return f"the kernel log says: {record}"
    after = oom_kill_counts()
    grown = [(k, before[k], v) for k, v in after.items() if k in before and v > before[k]]
    if grown:
        grown.sort(key=lambda g: g[0].endswith("vmstat"))  # the engine's cgroup before the host
        source, a, b = grown[0]
        return f"the kernel's OOM killer ran while the engine ran ({source} oom_kill {a} → {b})"
    return None


def _spawn(
    command: LaunchCommand, log_path: Path, *, die_with_parent: bool = True
) -> subprocess.Popen[bytes]:
    """fork/exec the engine (fast, so fine on the event loop; it must run there when
    ``die_with_parent``, see ``LocalDeployment``).

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
            preexec_fn=_pdeathsig_preexec() if die_with_parent else None,
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
