"""The supervised Redis tunnel: ``ssh -N -L`` from a worker, ``ssh -N -R`` from the manager.

``tunnel_argv`` builds the argv, ``TunnelSupervisor`` keeps one ssh running (restarted with
backoff), ``servetune tunnel --config FILE`` runs one supervisor as its own process and
``start_detached``/``stop_detached``/``detached_running`` manage those processes per slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer

from servetune.errors import ServetuneError
from servetune.remote.models import TunnelConfig, check_slot_name, read_config_file
from servetune.settings import Settings

log = logging.getLogger(__name__)

DESTINATION_PATTERN = re.compile(r"^[A-Za-z0-9._@:%\[\]-]{1,255}$")
"""An ssh destination: host, user@host or a Host alias (never starting with '-')."""

TARGET_HOST_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]{1,253})$")
"""Where forwarded connections go: a host name, an IPv4 address or a bracketed IPv6 address."""

JUMP_HOP_PATTERN = re.compile(
    r"^(?:ssh://)?(?:[A-Za-z0-9._][A-Za-z0-9._-]{0,63}@)?[A-Za-z0-9._][A-Za-z0-9._-]{0,252}"
    r"(?::[0-9]{1,5})?$"
)
"""One -J hop: [ssh://][user@]host[:port], nothing ssh could read as an option or a token."""
FILE_PATTERN = re.compile(r"^/[A-Za-z0-9._/+@=,-]{0,1023}$")
"""A file handed to ssh: absolute, with no space, quote, '%' or '~' (ssh would split or expand
them in -o values and IdentityFile)."""

BACKOFF_FIRST_S = 1.0
"""Pause before the first restart of an ssh that exited, s (doubled each time, up to the max)."""

BACKOFF_MAX_S = 30.0
"""Longest pause between two restarts, s."""

STABLE_S = 30.0
"""An ssh that ran this long before exiting counts as a fresh failure (backoff starts again), s."""

STOP_GRACE_S = 5.0
"""How long ssh gets to exit after SIGTERM before SIGKILL, s."""

STDERR_TAIL_LINES = 20
"""Lines of ssh's stderr kept for the log line of each exit."""

REMOTE_READY_MARK = "remote forward success for: listen"
"""What ``ssh -v`` prints once the server accepted a ``-R`` forward (debug1)."""


class TunnelFailed(ServetuneError):
    """The tunnel did not become ready in time; ``logs`` is ssh's stderr tail (its last run's
    when the current one has said nothing yet)."""

    def __init__(self, message: str, logs: list[str]) -> None:
        self.logs = logs
        super().__init__(message)


def _check_file(field: str, value: str | None) -> None:
    if value is not None and not FILE_PATTERN.match(value):
        raise ValueError(
            f"tunnel.{field} {value!r}: give an absolute path with no space, quote, '%' or '~' "
            "(ssh splits and expands those)"
        )


def tunnel_argv(cfg: TunnelConfig) -> list[str]:
    """The ssh argv keeping ``cfg``'s forward open (no shell, no remote command: ``-N``).

    ``direction="local"``: ``-L 127.0.0.1:bind_port:target_host:target_port`` (the worker's side);
    ``"remote"``: ``-R`` with the same spec, plus ``-v`` so the supervisor sees the server accept
    it. Always BatchMode, ExitOnForwardFailure, ServerAliveInterval=keepalive_s and
    ServerAliveCountMax=3 (a dead link ends ssh within ~3 keep-alives); IdentitiesOnly with an
    identity file; StrictHostKeyChecking=``strict_host_key_checking`` (``yes`` or ``accept-new``)
    with a known_hosts file; ``-J`` with
    ``proxy_jump``. Raises ValueError naming the field for a destination, jump host, target host
    or path ssh could misread.
    """
    if not DESTINATION_PATTERN.match(cfg.destination) or cfg.destination.startswith("-"):
        raise ValueError(
            f"tunnel.destination {cfg.destination!r}: give host, user@host or a Host alias "
            "(letters, digits and ._@:%[]-, not starting with '-')"
        )
    if not TARGET_HOST_PATTERN.match(cfg.target_host) or cfg.target_host.startswith("-"):
        raise ValueError(
            f"tunnel.target_host {cfg.target_host!r}: give a host name, an IPv4 address or a "
            "bracketed IPv6 address, e.g. 127.0.0.1"
        )
    hops = cfg.proxy_jump.split(",") if cfg.proxy_jump is not None else []
    if any(not JUMP_HOP_PATTERN.match(hop) for hop in hops):
        raise ValueError(
            f"tunnel.proxy_jump {cfg.proxy_jump!r}: give [user@]host[:port] hops separated by "
            "',' (letters, digits and ._-, not starting with '-')"
        )
    _check_file("identity_file", cfg.identity_file)
    for extra in cfg.more_identity_files:
        _check_file("more_identity_files", extra)
    _check_file("config_file", cfg.config_file)
    _check_file("known_hosts_file", cfg.known_hosts_file)
    argv = ["ssh", "-N"]
    if cfg.config_file:
        argv += ["-F", cfg.config_file]
    argv += ["-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes"]
    argv += ["-o", f"ServerAliveInterval={cfg.keepalive_s}", "-o", "ServerAliveCountMax=3"]
    if cfg.known_hosts_file:
        argv += ["-o", f"UserKnownHostsFile={cfg.known_hosts_file}"]
        argv += ["-o", f"StrictHostKeyChecking={cfg.strict_host_key_checking}"]
    if cfg.identity_file:
        argv += ["-i", cfg.identity_file, "-o", "IdentitiesOnly=yes"]
        for extra in cfg.more_identity_files:
            argv += ["-i", extra]
    if cfg.port is not None:
        argv += ["-p", str(cfg.port)]
    if cfg.proxy_jump:
        argv += ["-J", cfg.proxy_jump]  # the hops' ssh reads -F's config too (host keys, batch)
    spec = f"127.0.0.1:{cfg.bind_port}:{cfg.target_host}:{cfg.target_port}"
    if cfg.direction == "local":
        argv += ["-L", spec]
    else:
        argv += ["-v", "-R", spec]
    return [*argv, "--", cfg.destination]


_PR_SET_PDEATHSIG = 1
"""prctl option: the signal the kernel sends a child when its parent thread dies (linux/prctl.h)."""


@functools.cache
def _prctl() -> Any:
    """libc's prctl through ctypes, looked up once (None off Linux or when missing)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn making the kernel SIGTERM ssh when the supervising process dies, even by
    SIGKILL alone (its group may outlive it): no orphan keeps the tunnel's port bound."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class TunnelSupervisor:
    """Keeps one ssh tunnel (``tunnel_argv(cfg)``) running in this process's process group.

    ``start()`` (inside a running event loop) launches the supervising task; ssh is restarted
    whenever it exits, after a pause of 1 s doubling up to 30 s (back to 1 s after a run of 30 s
    or more). Each exit is logged (WARNING) with ssh's exit status and the tail of its stderr
    (the argv holds no secret; neither does ssh's stderr). ``await wait_ready(timeout_s)``
    returns once the forward works; ``await stop()`` ends ssh (SIGTERM, SIGKILL after 5 s) and
    the task. ssh gets SIGTERM from the kernel when this process dies (PR_SET_PDEATHSIG on
    Linux). Raises ValueError at construction for a config ssh could misread.
    """

    def __init__(self, cfg: TunnelConfig) -> None:
        self.cfg = cfg
        self.argv = tunnel_argv(cfg)
        self.restarts = 0
        """How many times ssh was started again after exiting."""
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._last_tail: list[str] = []
        self._remote_ready = asyncio.Event()

    @property
    def pid(self) -> int | None:
        """The running ssh's pid (None between runs)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def stderr_tail(self) -> list[str]:
        """The last lines the running ssh wrote on stderr, or those of the last one that exited
        while the running one has written none (debug lines of ``-v`` left out)."""
        return list(self._tail) or list(self._last_tail)

    def start(self) -> None:
        """Start supervising (no-op when already started); needs a running event loop."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._supervise(), name="ssh tunnel")

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once the forward works: for ``local``, the ssh runs and 127.0.0.1:bind_port
        accepts a connection; for ``remote``, ssh reported that the server accepted the forward.
        Raises TunnelFailed (message names destination and ports, ``logs`` the stderr tail)
        after ``timeout_s`` seconds, RuntimeError when not started."""
        if self._task is None:
            raise RuntimeError("TunnelSupervisor.wait_ready before start()")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self.pid is not None:
                if self.cfg.direction == "remote":
                    if self._remote_ready.is_set():
                        return
                elif await asyncio.to_thread(_port_answers, self.cfg.bind_port):
                    return
            await asyncio.sleep(0.1)
        side = "-L" if self.cfg.direction == "local" else "-R"
        raise TunnelFailed(
            f"the ssh tunnel {side} 127.0.0.1:{self.cfg.bind_port} → "
            f"{self.cfg.target_host}:{self.cfg.target_port} via {self.cfg.destination} was not "
            f"ready within {timeout_s:g} s",
            self.stderr_tail(),
        )

    async def stop(self) -> None:
        """Stop supervising and end ssh (SIGTERM, then SIGKILL after 5 s); idempotent."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._end_proc()

    async def _end_proc(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        """Read ssh's stderr to its end (never stop early: with -v a full pipe would block ssh)."""
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the stream's limit: dropped
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if REMOTE_READY_MARK in text:
                self._remote_ready.set()
            if not text.startswith("debug"):
                self._tail.append(text)

    async def _supervise(self) -> None:
        pause_s = BACKOFF_FIRST_S
        first = True
        try:
            while not self._stopping:
                if not first:
                    self.restarts += 1
                first = False
                self._tail.clear()
                self._remote_ready.clear()
                started = time.monotonic()
                try:
                    self._proc = await asyncio.create_subprocess_exec(
                        *self.argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        preexec_fn=_die_with_parent(),  # only prctl runs in the child
                    )
                except OSError as e:
                    log.error("cannot start the ssh tunnel (%s): %s", self.argv[0], e)
                    code: int | None = None
                else:
                    assert self._proc.stderr is not None
                    reader = asyncio.create_task(self._read_stderr(self._proc.stderr))
                    try:
                        code = await self._proc.wait()
                        await asyncio.wait_for(reader, 2.0)
                    except TimeoutError:
                        pass
                    finally:
                        reader.cancel()
                ran_s = time.monotonic() - started
                self._last_tail = list(self._tail)
                if self._stopping:
                    return
                if ran_s >= STABLE_S:
                    pause_s = BACKOFF_FIRST_S
                log.warning(
                    "ssh tunnel to %s (127.0.0.1:%d → %s:%d) exited with status %s after %.1f s;"
                    " restarting in %.0f s. ssh said: %s",
                    self.cfg.destination,
                    self.cfg.bind_port,
                    self.cfg.target_host,
                    self.cfg.target_port,
                    code,
                    ran_s,
                    pause_s,
                    " | ".join(self._tail) or "(nothing)",
                )
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 2, BACKOFF_MAX_S)
        finally:
            await self._end_proc()


# ---- one supervisor as its own process: `servetune tunnel --config FILE` -----------------------


def read_tunnel_config(path: Path) -> TunnelConfig:
    """The TunnelConfig in the JSON file ``path``; raises ValueError naming the file and the
    field at fault."""
    return read_config_file(path, TunnelConfig)


async def run_tunnel(cfg: TunnelConfig) -> int:
    """Supervise ``cfg``'s tunnel until SIGTERM or SIGINT; the exit status (0)."""
    supervisor = TunnelSupervisor(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    supervisor.start()
    try:
        await stop.wait()
    finally:
        await supervisor.stop()
    return 0


def tunnel_cmd(
    config: Annotated[
        Path, typer.Option("--config", help="TunnelConfig JSON file (written by servetune).")
    ],
) -> None:
    """Keep one ssh tunnel open (restarted when it dies) until SIGTERM: the manager's reverse
    Redis tunnels run as these. Exit status 0 after SIGTERM, 2 for a bad config file."""
    try:
        cfg = read_tunnel_config(config)
        tunnel_argv(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    raise typer.Exit(asyncio.run(run_tunnel(cfg)))


# ---- the manager's detached reverse tunnels, one per slot -------------------------------------


def _tunnels_dir(settings: Settings) -> Path:
    path = settings.data_dir / "tunnels"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def detached_log_tail(settings: Settings, slot_name: str, max_bytes: int = 16384) -> str:
    """The end (at most ``max_bytes``) of the slot's detached tunnel log, decoded; '' when there
    is none. Raises ValueError for a bad slot name."""
    log_path = _files(settings, slot_name)[2]
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, log_path.stat().st_size - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _files(settings: Settings, slot_name: str) -> tuple[Path, Path, Path]:
    check_slot_name(slot_name)
    folder = _tunnels_dir(settings)
    return folder / f"{slot_name}.pid", folder / f"{slot_name}.json", folder / f"{slot_name}.log"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, created with mode 600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _live_tunnel(pid_path: Path, config_path: Path) -> int | None:
    """The pid in ``pid_path`` when it is a live ``servetune tunnel --config config_path``."""
    try:
        pid = int(pid_path.read_text(encoding="utf-8").strip())
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = proc.cmdline()
    except (OSError, ValueError, psutil.Error):
        return None
    if "tunnel" in cmdline and str(config_path) in cmdline:
        return pid
    return None


def detached_running(settings: Settings, slot_name: str) -> bool:
    """Whether the slot's detached ``servetune tunnel`` process runs (its pidfile names a live
    process whose command line is that tunnel's). Raises ValueError for a bad slot name."""
    pid_path, config_path, _ = _files(settings, slot_name)
    return _live_tunnel(pid_path, config_path) is not None


def start_detached(settings: Settings, slot_name: str, cfg: TunnelConfig) -> int:
    """Start ``servetune tunnel --config FILE`` for the slot as its own session (it survives the
    caller); its pid. A tunnel already running for the slot is stopped first. Files under
    ``settings.data_dir/tunnels/``: ``<slot>.json`` (the config, mode 600), ``<slot>.pid``,
    ``<slot>.log`` (its output). Raises ValueError for a bad slot name or config, OSError when
    the files cannot be written or the process cannot start."""
    tunnel_argv(cfg)  # refuse a bad config here, not in a detached process
    pid_path, config_path, log_path = _files(settings, slot_name)
    stop_detached(settings, slot_name)
    _write_private(config_path, cfg.model_dump_json())
    argv = [sys.executable, "-m", "servetune", "tunnel", "--config", str(config_path)]
    with log_path.open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - argv list: our own interpreter and a path
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _write_private(pid_path, str(proc.pid))
    log.info("reverse tunnel for slot %s started (pid %d, log %s)", slot_name, proc.pid, log_path)
    return proc.pid


def stop_detached(settings: Settings, slot_name: str, grace_s: float = STOP_GRACE_S) -> bool:
    """Stop the slot's detached tunnel (SIGTERM to its process group, SIGKILL after
    ``grace_s``) and remove its pidfile and config; whether one was running. Raises ValueError
    for a bad slot name."""
    pid_path, config_path, _ = _files(settings, slot_name)
    pid = _live_tunnel(pid_path, config_path)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it when we started it
    for path in (pid_path, config_path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return pid is not None


def _group_alive(pgid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(-pgid, os.WNOHANG)
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False
