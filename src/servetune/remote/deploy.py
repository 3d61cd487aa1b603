"""Deploy, restore and remove a worker on a remote host over SSH, step by step, each step timed.

``Deployer.deploy`` runs preflight → bundle → prepare → upload → install → redis → config → start
→ register; a failing step ends the deploy with a report carrying its category, suggestion and
log tail (nothing is raised out of ``deploy``/``restore``).
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import inspect
import ipaddress
import json
import logging
import math
import re
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

from servetune.cluster.registry import Registry, WorkerStatus
from servetune.errors import DeployFailed, RedisUnavailable
from servetune.remote import diagnose, keys, tunnel, venvcopy, wheelhouse
from servetune.remote.models import (
    Category,
    CommandResult,
    DeployReport,
    DeployStep,
    OfflineMode,
    RedisVia,
    RemoteFacts,
    StepStatus,
    TunnelConfig,
    WorkerLaunchConfig,
    WorkerSlot,
)
from servetune.remote.ssh import ResolvedTarget, SshSession, parse_ssh_command, run_command
from servetune.settings import Settings

__all__ = [
    "MIN_PYTHON",
    "Deployer",
    "RedisEndpoint",
    "free_space_needed_gib",
    "parse_manager_ssh",
    "parse_redis_url",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN_PYTHON = (3, 11)
"""The oldest remote Python a worker runs on (servetune's own requirement)."""

ONLINE_MIN_FREE_GIB = 2.0
"""Free space an online install needs in the install directory, GiB (venv + dependencies)."""

OFFLINE_SPACE_FACTOR = 3.0
"""An offline install needs this many times the wheelhouse's size free (copy + venv + cache)."""

AGENT_TIMEOUT_S = 60.0
"""Longest a quick agent action (probe, prepare, keygen, status, …) may run, beyond ssh's connect."""

REGISTER_POLL_S = 0.5
"""How often the register step reads the worker registry, s."""

STOP_GRACE_S = 10.0
"""How long leftover worker processes get between SIGTERM and SIGKILL, s."""
REMOVE_GRACE_S = 45.0
"""How long a removed slot's worker gets between SIGTERM and SIGKILL, s: it stops its engines
(their stop timeouts) and hands its running trials back (``worker.main.HAND_BACK_GRACE_S``
30 s at most); it exits as soon as that is done, usually within seconds."""

TUNNEL_PORT_TRIES = 3
"""How many bind ports the forward-tunnel check tries when one is taken on the remote."""

INSTALLED_MARKER = "installed.json"
"""File in the install directory naming the bundle installed there (version, bundle key)."""

_MANAGER_SSH = re.compile(
    r"^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]{0,63})@)?"
    r"(?P<host>[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?$"
)

_ENRICHED = frozenset(
    {
        Category.PYTHON_TOO_OLD,
        Category.MODULE_NOT_FOUND,
        Category.INSTALL_FAILED,
        Category.WORKER_START_FAILED,
    }
)
"""Agent error categories whose suggestion ``deploy`` fills again with what it knows (the install
directory, the interpreter, the versions)."""

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass(frozen=True)
class RedisEndpoint:
    """The manager's Redis as parsed from its URL: where it listens and how to log in."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool

    def url_at(self, host: str, port: int) -> str:
        """The same Redis (credentials, db, scheme) reached at ``host:port`` (a tunnel's end)."""
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        elif self.username:
            auth = f"{quote(self.username, safe='')}@"
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{auth}{shown}:{port}/{self.db}"


def parse_redis_url(url: str) -> RedisEndpoint:
    """The parts of a ``redis://[user:password@]host:port/db`` URL.

    Raises ValueError naming the URL's problem (another scheme, no host, a bad port or db)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"the Redis URL must start with redis:// or rediss://, not {parts.scheme}")
    if not parts.hostname:
        raise ValueError("the Redis URL has no host (redis://HOST:PORT/0)")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the Redis URL's database must be a number, not {path!r}")
    return RedisEndpoint(
        host=parts.hostname,
        port=parts.port or 6379,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme == "rediss",
    )


def parse_manager_ssh(text: str) -> tuple[str | None, str, int]:
    """``[user@]host[:port]`` (``manager_ssh``) as (user or None, host, port; 22 by default).

    Raises ValueError naming the field and the expected form."""
    found = _MANAGER_SSH.fullmatch(text)
    port = int(found["port"]) if found and found["port"] else 22
    if found is None or not 1 <= port <= 65535:
        raise ValueError(
            f"manager_ssh {text!r} is not [user@]host[:port] (e.g. tuner@10.0.0.5:22): "
            "the manager's sshd as the worker reaches it"
        )
    host = found["host"].strip("[]")
    return found["user"], host, port


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _servetune_version() -> str:
    try:
        return version("servetune")
    except PackageNotFoundError:
        return "0+unknown"


def _of_slot(status: WorkerStatus, slot: WorkerSlot) -> bool:
    """Whether a registered worker is this slot's: its name (the alias it registers with) or,
    once a user renamed it, the worker id the slot recorded."""
    return status.info.alias == slot.name or (
        slot.worker_id is not None and status.info.id == slot.worker_id
    )


def _gpu_names(status: WorkerStatus) -> list[str]:
    return [f"{g.name} ({g.memory_total_gib:.1f} GiB)" for g in status.info.gpus]


@dataclass
class _Outcome:
    """What a step function returns: its value and how the step ended."""

    value: Any = None
    detail: str = ""
    status: StepStatus = StepStatus.OK
    category: Category | None = None
    suggestion: str | None = None


@dataclass
class _Run:
    """One deploy or restore in progress: the slot, its ssh session, what was found, its steps."""

    slot: WorkerSlot
    action: str
    started_s: float = field(default_factory=time.monotonic)
    steps: list[DeployStep] = field(default_factory=list)
    session: SshSession | None = None
    resolved: ResolvedTarget | None = None
    facts: RemoteFacts | None = None
    bundle: wheelhouse.InstallBundle | None = None
    venv_copy: venvcopy.VenvCopy | None = None
    offline: bool = False
    launch: WorkerLaunchConfig | None = None
    pid: int | None = None

    @property
    def target(self) -> str:
        """The host as the user named it (for messages)."""
        if self.resolved is not None:
            return f"{self.resolved.user}@{self.resolved.hostname}:{self.resolved.port}"
        return self.slot.name

    @property
    def install_dir(self) -> str:
        """The install directory, absolute (as the probe expanded it) once known."""
        return self.facts.install_dir if self.facts is not None else self.slot.install_dir

    def path(self, *parts: str) -> str:
        """A path under the install directory on the remote."""
        return "/".join([self.install_dir.rstrip("/"), *parts])

    def found(self, **more: str | None) -> dict[str, Any]:
        """What is known of the host, for ``diagnose.failure``'s suggestion, plus ``more``
        (strings; None values left out)."""
        values: dict[str, str | None] = {
            "host": self.facts.hostname if self.facts is not None else None,
            "install_dir": self.install_dir,
            "python": self.facts.python_executable if self.facts else self.slot.python,
        }
        if self.resolved is not None:
            values.update(
                host=self.resolved.hostname,
                port=str(self.resolved.port),
                user=self.resolved.user,
            )
        values.update(more)
        return {k: v for k, v in values.items() if v}


class Deployer:
    """Deploys, restores and removes workers of worker slots.

    ``settings`` gives the ssh and install timeouts, the manager's authorized_keys file and the
    package index; ``redis_url`` is the manager's Redis as the manager reaches it (the tunnels
    lead there; its password goes into the worker's mode-600 config, never onto a command line);
    ``registry`` is read to see the worker register.

    ``deploy`` and ``restore`` never raise for a failed step: the ``DeployReport`` says
    ``success=False`` with the category, a specific suggestion and the failing command's log tail.
    """

    def __init__(self, settings: Settings, redis_url: str, registry: Registry) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.registry = registry

    # ---- public ----------------------------------------------------------------------------

    async def deploy(self, slot: WorkerSlot, *, offline: OfflineMode | None = None) -> DeployReport:
        """Install and start the worker of ``slot`` on its host and wait until it registers.

        ``offline`` overrides the slot's mode (auto: a wheelhouse when the remote cannot reach
        the package index; when the manager cannot build that wheelhouse either, its own venv is
        copied to a host whose CPython, architecture and libc match its own: the bundle step
        then ends WARNING and says so, see ``venvcopy``). Steps: preflight, bundle, prepare,
        redis, upload, install, stop, config, start, register: how the worker will reach Redis
        (tunnel, address) is checked
        before anything is uploaded or installed, so a wrong address fails in seconds. A worker
        of this slot already running there is stopped (its leftovers too) before the new one
        starts. Returns the report (success or the failure's category and suggestion)."""
        run = _Run(slot, "deploy")
        mode = offline or slot.offline

        async def body() -> DeployReport:
            await self._preflight(run, mode, tunnel_first=True)
            await self._bundle(run, mode)
            await self._prepare(run)
            await self._redis(run)
            await self._upload(run)
            await self._install(run)
            await self._stop_leftovers(run)
            return await self._launch(run, redis_checked=True)

        return await self._guarded(run, body)

    async def restore(self, slot: WorkerSlot) -> DeployReport:
        """Bring the worker of ``slot`` back, idempotently.

        When its worker runs and is registered (online), nothing is restarted (one worker process
        stays). Otherwise leftover processes are stopped, servetune is installed only when the
        install directory lacks this exact bundle, and the worker is configured, started and
        awaited as by ``deploy``. Returns the report; never raises for a failed step."""
        run = _Run(slot, "restore")

        async def body() -> DeployReport:
            await self._preflight(run, slot.offline)
            live = await self._live_worker(run)
            if live is not None:
                return self._success(run, live, already=True)
            await self._stop_leftovers(run)
            await self._bundle(run, slot.offline)
            if await self._installed_key(run) == self._bundle_key(run):
                for name in ("prepare", "upload", "install"):
                    run.steps.append(
                        DeployStep(
                            name=name,
                            status=StepStatus.SKIPPED,
                            duration_s=0.0,
                            detail=f"servetune {_servetune_version()} is installed already",
                        )
                    )
            else:
                await self._prepare(run)
                await self._upload(run)
                await self._install(run)
            return await self._launch(run)

        return await self._guarded(run, body)

    async def remove(self, slot: WorkerSlot, *, stop_worker: bool = True) -> DeployReport:
        """Undo what deploys of ``slot`` did: stop its worker on the host (``stop_worker``; its
        tunnel dies with it), then, on the manager, drop its tunnel key line from
        ``settings.authorized_keys_path`` and stop its reverse tunnel (if one runs).

        Steps: ``stop`` (connect, SIGTERM the install's worker, SIGKILL its process group after
        ``REMOVE_GRACE_S``; a running trial is handed back to the manager), ``key``, ``tunnel``,
        ``forget`` (its offline workers leave the registry; a live one stays listed).
        A host that cannot be reached (it may be gone) does not stop the removal: the ``stop``
        step ends WARNING with its category and a suggestion that says how to stop the worker
        there. The report has ``success`` True once the manager's side is clean. Raises OSError
        when the authorized_keys file cannot be rewritten.
        """
        run = _Run(slot, "remove")
        stopped: list[int] | None = None
        if stop_worker:
            try:
                stopped = await self._stop_remote(run)
            except DeployFailed as e:
                how = (
                    f"The slot is removed anyway; if its worker still runs on the host (while "
                    "its open tunnel lasts it may stay online and take trials), stop it there "
                    f"with `kill $(cat {slot.install_dir.rstrip('/')}/worker.pid)`."
                )
                run.steps[-1] = run.steps[-1].model_copy(
                    update={
                        "status": StepStatus.WARNING,
                        "suggestion": f"{e.suggestion} {how}".strip(),
                    }
                )
        else:
            run.steps.append(
                DeployStep(
                    name="stop",
                    status=StepStatus.SKIPPED,
                    duration_s=0.0,
                    detail="asked to keep the worker running on its host",
                )
            )

        async def drop_key() -> _Outcome:
            path = self.settings.authorized_keys_path
            if await asyncio.to_thread(keys.remove_key, path, slot.name):
                return _Outcome(detail=f"removed the tunnel key of {slot.name} from {path}")
            return _Outcome(detail=f"no tunnel key of {slot.name} was in {path}")

        async def stop_tunnel() -> _Outcome:
            if await _maybe_await(tunnel.stop_detached(self.settings, slot.name)):
                return _Outcome(detail="stopped its reverse tunnel")
            return _Outcome(detail="no reverse tunnel of this slot ran")

        async def forget_workers() -> _Outcome:
            gone = []
            try:
                for status in await self.registry.workers():
                    if _of_slot(status, slot) and status.state == "offline":
                        await self.registry.forget(status.info.id)
                        gone.append(status.info.id)
            except RedisUnavailable as e:  # the slot goes anyway: only the listing keeps them
                return _Outcome(
                    detail=f"its offline workers stay listed: {e}",
                    status=StepStatus.WARNING,
                    category=Category.REDIS_UNREACHABLE,
                    suggestion="Nothing to do for the removal; GET /api/workers lists them "
                    "as offline until Redis is reachable and they are forgotten.",
                )
            if not gone:
                return _Outcome(detail="no offline worker of this slot was registered")
            return _Outcome(detail=f"forgot its offline worker(s) {', '.join(gone)}")

        await self._step(run, "key", drop_key)
        await self._step(run, "tunnel", stop_tunnel)
        await self._step(run, "forget", forget_workers)
        if stopped is None and not stop_worker:
            message = f"worker slot {slot.name} removed; its worker on the host was kept"
            if slot.redis_via == RedisVia.FORWARD:
                message += (
                    " (its tunnel key is gone: it loses Redis when its tunnel next reconnects)"
                )
        elif stopped is None:
            message = (
                f"worker slot {slot.name} removed; its worker on the host was not stopped (see "
                "the stop step)"
            )
        elif stopped:
            message = f"worker slot {slot.name} removed; its worker (pid {_pids(stopped)}) stopped"
        else:
            message = f"worker slot {slot.name} removed; no worker of it ran on the host"
        return DeployReport(
            success=True,
            action="remove",
            message=message,
            steps=run.steps,
            duration_s=time.monotonic() - run.started_s,
        )

    async def _stop_remote(self, run: _Run) -> list[int]:
        """The ``stop`` step of a removal: connect and stop the install's worker processes;
        their pids. Raises DeployFailed (recorded as the failed step) when the host cannot be
        reached or the agent fails."""

        async def step() -> _Outcome:
            run.session = SshSession(parse_ssh_command(run.slot.ssh_command), self.settings)
            run.resolved = await run.session.resolve()
            stopped, owner = await self._stop_worker(run, run.slot.install_dir, REMOVE_GRACE_S)
            if owner:
                return _Outcome(
                    value=stopped,
                    detail=f"{run.slot.install_dir} on {run.target} holds the worker of slot "
                    f"{owner}, not of {run.slot.name}: left running",
                )
            if not stopped:
                return _Outcome(value=stopped, detail=f"no worker ran on {run.target}")
            return _Outcome(value=stopped, detail=f"stopped worker process(es) {_pids(stopped)}")

        stopped: list[int] = await self._step(run, "stop", step)
        return stopped

    async def _stop_worker(
        self, run: _Run, install_dir: str, grace_s: float
    ) -> tuple[list[int], str | None]:
        """The agent's ``stop_worker`` for this slot's worker in ``install_dir``, SIGKILL after
        ``grace_s`` s: (the pids stopped, the other slot whose worker runs there and was left
        alone, else None). Raises DeployFailed as ``_agent`` does."""
        result = await self._agent(
            run,
            "stop_worker",
            {"install_dir": install_dir, "grace_s": grace_s, "name": run.slot.name},
            timeout_s=self.settings.ssh_connect_timeout_s + AGENT_TIMEOUT_S + grace_s,
        )
        owner = result.get("owner")
        return [int(p) for p in result.get("stopped") or []], str(owner) if owner else None

    # ---- the run -----------------------------------------------------------------------------

    async def _guarded(
        self, run: _Run, body: Callable[[], Awaitable[DeployReport]]
    ) -> DeployReport:
        try:
            return await body()
        except DeployFailed as e:
            return self._failure(run, e)
        except Exception as e:  # never raised out of deploy/restore: reported
            log.exception("%s of slot %s failed unexpectedly", run.action, run.slot.name)
            failed = diagnose.failure(
                Category.UNKNOWN,
                f"{run.action} of {run.slot.name} failed: {type(e).__name__}: {e}",
                step=run.steps[-1].name if run.steps else "",
                **run.found(reason=f"{type(e).__name__}: {e}"),
            )
            return self._failure(run, failed)

    async def _step(self, run: _Run, name: str, fn: Callable[[], Awaitable[_Outcome]]) -> Any:
        """Run step ``name``; record it (duration, status, category); its value. A DeployFailed
        (or any other error, as UNKNOWN) is recorded as the failed step and raised."""
        started = time.monotonic()
        try:
            outcome = await fn()
        except Exception as e:
            if isinstance(e, DeployFailed):
                failed, cause = e, None
                failed.step = failed.step or name
            else:
                log.exception("step %s of %s %s failed", name, run.action, run.slot.name)
                failed = diagnose.failure(
                    Category.UNKNOWN,
                    f"{name}: {type(e).__name__}: {e}",
                    step=name,
                    **run.found(reason=f"{type(e).__name__}: {e}"),
                )
                cause = e
            run.steps.append(
                DeployStep(
                    name=name,
                    status=StepStatus.FAILED,
                    duration_s=time.monotonic() - started,
                    detail=str(failed),
                    category=failed.category,
                    suggestion=failed.suggestion,
                )
            )
            if cause is None:
                raise
            raise failed from cause
        duration_s = time.monotonic() - started
        run.steps.append(
            DeployStep(
                name=name,
                status=outcome.status,
                duration_s=duration_s,
                detail=outcome.detail,
                category=outcome.category,
                suggestion=outcome.suggestion,
            )
        )
        log.info(
            "%s %s: %s %s in %.1f s: %s",
            run.action,
            run.slot.name,
            name,
            outcome.status.value,
            duration_s,
            outcome.detail,
        )
        return outcome.value

    def _failure(self, run: _Run, e: DeployFailed) -> DeployReport:
        log.warning(
            "%s of slot %s failed at %s: %s (%s)",
            run.action,
            run.slot.name,
            e.step or "?",
            e,
            e.category.value,
        )
        return DeployReport(
            success=False,
            action="restore" if run.action == "restore" else "deploy",
            message=str(e),
            category=e.category,
            suggestion=e.suggestion,
            steps=run.steps,
            logs=diagnose.tail("\n".join(e.logs)) if e.logs else [],
            duration_s=time.monotonic() - run.started_s,
        )

    def _success(self, run: _Run, status: WorkerStatus, *, already: bool = False) -> DeployReport:
        duration_s = time.monotonic() - run.started_s
        how = "was running already" if already else f"registered after {duration_s:.1f} s"
        return DeployReport(
            success=True,
            action="restore" if run.action == "restore" else "deploy",
            message=f"worker {run.slot.name} ({status.info.id}) on {run.target} {how}",
            steps=run.steps,
            worker_id=status.info.id,
            gpus=_gpu_names(status),
            duration_s=duration_s,
        )

    async def _launch(self, run: _Run, *, redis_checked: bool = False) -> DeployReport:
        if not redis_checked:
            await self._redis(run)
        await self._config(run)
        await self._start(run)
        status = await self._register(run)
        return self._success(run, status)

    async def _agent(
        self, run: _Run, action: str, params: dict[str, Any], *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        assert run.session is not None
        timeout = timeout_s or self.settings.ssh_connect_timeout_s + AGENT_TIMEOUT_S
        python = run.facts.python_executable if run.facts is not None else run.slot.python
        try:
            return await run.session.run_agent(action, params, python=python, timeout_s=timeout)
        except DeployFailed as e:
            if e.category not in _ENRICHED:
                raise
            # the agent's error knew nothing of the slot: say what this deploy knows
            found = re.search(r"Python (\d+\.\d+(?:\.\d+)?)", str(e))
            raise diagnose.failure(
                e.category,
                str(e),
                step=e.step,
                logs=e.logs,
                **run.found(
                    reason=str(e),
                    found_version=found[1] if found else None,
                    min_version=".".join(map(str, MIN_PYTHON)),
                    python=python,
                ),
            ) from e

    # ---- steps -------------------------------------------------------------------------------

    async def _preflight(self, run: _Run, mode: OfflineMode, *, tunnel_first: bool = False) -> None:
        """Connect and read the remote's facts. ``tunnel_first`` (deploy): a forward slot's
        manager ssh address is checked before connecting, not after the install."""

        async def step() -> _Outcome:
            target = parse_ssh_command(run.slot.ssh_command)
            if tunnel_first and run.slot.redis_via == RedisVia.FORWARD:
                self._manager_ssh(run)
            run.session = SshSession(target, self.settings)
            run.resolved = await run.session.resolve()
            probe_index = mode in (OfflineMode.AUTO, OfflineMode.NEVER)
            result = await self._agent(
                run,
                "probe",
                {
                    "install_dir": run.slot.install_dir,
                    "index_url": self.settings.package_index_url if probe_index else None,
                    "index_timeout_s": min(10.0, self.settings.ssh_connect_timeout_s),
                    "min_python": list(MIN_PYTHON),
                },
                # python before the probe is the slot's own (a name on PATH or a path)
            )
            run.facts = RemoteFacts.model_validate(result)
            facts = run.facts
            index = ""
            if facts.index_reachable is not None:
                index = ", index reachable" if facts.index_reachable else ", index unreachable"
            return _Outcome(
                detail=f"{facts.hostname}: Python {facts.python_version} ({facts.arch}, "
                f"{facts.libc} {facts.libc_version}), {facts.free_disk_gib:.1f} GiB free at "
                f"{facts.install_dir}, rsync {'yes' if facts.has_rsync else 'no'}{index}"
            )

        await self._step(run, "preflight", step)

    async def _bundle(self, run: _Run, mode: OfflineMode) -> None:
        async def step() -> _Outcome:
            facts = run.facts
            assert facts is not None
            url = self.settings.package_index_url
            warning: tuple[Category, str] | None = None
            if mode == OfflineMode.ALWAYS:
                run.offline = True
            elif facts.index_reachable is False:
                why = facts.index_error or "no answer"
                if mode == OfflineMode.NEVER:
                    raise diagnose.failure(
                        Category.INDEX_UNREACHABLE,
                        f"{facts.hostname} cannot reach the package index {url}: {why}",
                        step="bundle",
                        **run.found(index_url=url, reason=why, offline=mode.value),
                    )
                run.offline = True
                warning = (
                    Category.INDEX_UNREACHABLE,
                    diagnose.failure(
                        Category.INDEX_UNREACHABLE,
                        "",
                        step="bundle",
                        **run.found(index_url=url, reason=why, offline=mode.value),
                    ).suggestion,
                )
            else:
                run.offline = False
            try:
                run.bundle = await wheelhouse.build_bundle(
                    self.settings, facts, offline=run.offline
                )
            except DeployFailed as e:
                if not run.offline or not venvcopy.wheels_unavailable(e):
                    raise
                return await self._venv_copy(run, e, warning[1] if warning else None)
            size_mib = _dir_size_bytes(run.bundle.dir) / 2**20
            what = "offline wheelhouse" if run.offline else "wheel + constraints"
            detail = (
                f"{what} for Python {facts.python_version} {facts.arch}: {size_mib:.1f} MiB "
                f"({run.bundle.dir.name})"
            )
            if warning is not None:
                return _Outcome(
                    detail=detail,
                    status=StepStatus.WARNING,
                    category=warning[0],
                    suggestion=warning[1],
                )
            return _Outcome(detail=detail)

        await self._step(run, "bundle", step)

    async def _venv_copy(
        self, run: _Run, failed: DeployFailed, host_warning: str | None
    ) -> _Outcome:
        """The bundle step's last resort once ``failed`` says the manager cannot get the
        offline wheels either: copy the manager's venv when the host's interpreter matches the
        manager's (``venvcopy.copy_refusal``), ending the step WARNING. Otherwise ``failed`` is
        raised, its message and suggestion saying why the venv could not be copied instead."""
        assert run.facts is not None
        refusal = venvcopy.copy_refusal(
            venvcopy.manager_interpreter(),
            venvcopy.Interpreter.of(run.facts),
            manager_in_venv=sys.prefix != sys.base_prefix,
        )
        plan: venvcopy.VenvCopy | None = None
        if refusal is None:
            try:
                plan = await venvcopy.plan(self.settings)
            except DeployFailed as e:
                refusal = f"servetune's wheel cannot be built here either ({e})"
        if plan is None:
            clause = f"the manager's venv cannot be copied instead: {refusal}"
            raise DeployFailed(
                failed.category,
                f"{failed}; {clause}",
                f"{failed.suggestion} ({clause[0].upper()}{clause[1:]}.)",
                step=failed.step or "bundle",
                logs=failed.logs,
            ) from failed
        run.venv_copy = plan
        facts = run.facts
        detail = (
            f"copying the manager's venv {plan.prefix} ({plan.size_bytes / 2**20:.0f} MiB) as "
            f"a last resort: the manager cannot build the offline wheelhouse either "
            f"({failed.category.value}: {failed}); the host's Python {facts.python_version} "
            f"({facts.arch}, {facts.libc} {facts.libc_version}) matches the manager's"
        )
        suggestion = (
            f"The manager could not build an offline wheelhouse ({failed}), so its own venv "
            f"{plan.prefix} was copied to the host (Python, architecture and libc match); make "
            "the package index reachable from the manager (package_index_url, "
            "SERVETUNE_PACKAGE_INDEX_URL) for a regular offline install."
        )
        if host_warning:
            suggestion = f"{host_warning} {suggestion}"
        log.warning("%s %s: %s", run.action, run.slot.name, detail)
        return _Outcome(
            detail=detail,
            status=StepStatus.WARNING,
            category=Category.INDEX_UNREACHABLE,
            suggestion=suggestion,
        )

    async def _prepare(self, run: _Run) -> None:
        async def step() -> _Outcome:
            wheelhouse_bytes = None
            if run.offline and run.venv_copy is None:
                assert run.bundle is not None
                wheelhouse_bytes = _dir_size_bytes(run.bundle.dir)
            need_gib = free_space_needed_gib(
                wheelhouse_bytes=wheelhouse_bytes,
                venv_copy_bytes=run.venv_copy.size_bytes if run.venv_copy else None,
            )
            result = await self._agent(
                run,
                "prepare",
                {
                    "install_dir": run.slot.install_dir,
                    "min_free_gib": round(need_gib, 3),
                    "name": run.slot.name,
                },
            )
            return _Outcome(detail=f"{result.get('install_dir', run.install_dir)} ready")

        await self._step(run, "prepare", step)

    async def _upload(self, run: _Run) -> None:
        async def step() -> _Outcome:
            assert run.session is not None and run.facts is not None
            copy = run.venv_copy
            sends: list[tuple[Any, str, tuple[str, ...]]] = []
            if copy is not None:
                sends.append((copy.prefix, run.path("incoming", copy.key), copy.exclude))
                sends.append((copy.wheel.parent, run.path("incoming", f"{copy.key}-wheel"), ()))
            else:
                assert run.bundle is not None
                sends.append((run.bundle.dir, run.path("incoming", run.bundle.dir.name), ()))
            local_rsync = shutil.which("rsync") is not None
            use_rsync = run.facts.has_rsync and local_rsync
            started = time.monotonic()
            for local, remote_dir, exclude in sends:
                result = await run.session.push_dir(
                    local,
                    remote_dir,
                    rsync=use_rsync,
                    timeout_s=self.settings.deploy_install_timeout_s,
                    python=run.facts.python_executable,
                    exclude=exclude,
                )
                if result.returncode != 0:
                    raise self._upload_failure(run, result, remote_dir)
            how = "rsync" if use_rsync else "tar"
            if copy is not None:
                detail = (
                    f"the manager's venv {copy.prefix} ({copy.size_bytes / 2**20:.0f} MiB) → "
                    f"{sends[0][1]} by {how} in {time.monotonic() - started:.1f} s"
                )
            else:
                assert run.bundle is not None
                detail = f"{run.bundle.dir.name} → {sends[0][1]} by {how}"
            if use_rsync:
                return _Outcome(detail=detail)
            if not local_rsync:
                suggestion = (
                    "rsync is not installed on this manager: the files were sent as a tar "
                    "stream over ssh instead (nothing to do; install rsync here for faster "
                    "re-deploys)."
                )
            else:
                suggestion = diagnose.failure(
                    Category.RSYNC_MISSING, "", step="upload", **run.found()
                ).suggestion
            return _Outcome(
                detail=detail,
                status=StepStatus.WARNING,
                category=Category.RSYNC_MISSING,
                suggestion=suggestion,
            )

        await self._step(run, "upload", step)

    def _upload_failure(self, run: _Run, result: Any, remote_dir: str) -> DeployFailed:
        found = diagnose.classify_ssh(result, target=run.target)
        if found is not None:
            found.step = "upload"
            return found
        text = f"{result.stdout}\n{result.stderr}"
        logs = diagnose.tail(text)
        if "No space left" in text or "Disk quota exceeded" in text:
            return diagnose.failure(
                Category.DISK_FULL,
                f"no space left on {run.target} while copying to {remote_dir}",
                step="upload",
                logs=logs,
                **run.found(path=run.install_dir, free_gib="no"),
            )
        if "Permission denied" in text or "Read-only file system" in text:
            return diagnose.failure(
                Category.PERMISSION_DENIED,
                f"cannot write {remote_dir} on {run.target}",
                step="upload",
                logs=logs,
                **run.found(path=remote_dir),
            )
        return diagnose.failure(
            Category.UNKNOWN,
            f"copying the install bundle to {run.target}:{remote_dir} failed "
            f"(exit {result.returncode})",
            step="upload",
            logs=logs,
            **run.found(reason=f"copying the install bundle failed (exit {result.returncode})"),
        )

    async def _install(self, run: _Run) -> None:
        async def step() -> _Outcome:
            assert run.facts is not None
            if run.venv_copy is not None:
                return await self._adopt_venv(run, run.venv_copy)
            assert run.bundle is not None
            bundle = run.bundle
            base = run.path("incoming", bundle.dir.name)
            result = await self._agent(
                run,
                "install",
                {
                    "install_dir": run.install_dir,
                    "python": run.facts.python_executable,
                    "wheel": f"{base}/{bundle.wheel}",
                    "uv": f"{base}/{bundle.uv}",
                    "constraints": f"{base}/{bundle.constraints}" if bundle.constraints else None,
                    "wheelhouse": f"{base}/{bundle.wheelhouse}" if bundle.wheelhouse else None,
                    "index_url": None if bundle.offline else self.settings.package_index_url,
                },
                timeout_s=self.settings.deploy_install_timeout_s,
            )
            await self._write_marker(run, result.get("version"))
            how = "offline (wheelhouse)" if bundle.offline else "from the index"
            seconds = result.get("seconds")
            took = f" in {float(seconds):.1f} s" if isinstance(seconds, (int, float)) else ""
            return _Outcome(detail=f"servetune {result.get('version')} installed {how}{took}")

        await self._step(run, "install", step)

    async def _adopt_venv(self, run: _Run, copy: venvcopy.VenvCopy) -> _Outcome:
        """The install step of a venv copy: the agent's ``adopt_venv`` makes the copied venv the
        install's venv; the install marker is written as by a regular install."""
        assert run.facts is not None
        result = await self._agent(
            run,
            "adopt_venv",
            {
                "install_dir": run.install_dir,
                "staging": run.path("incoming", copy.key),
                "old_prefix": str(copy.prefix),
                "python": run.facts.python_executable,
                "wheel": run.path("incoming", f"{copy.key}-wheel", copy.wheel.name),
                "timeout_s": self.settings.deploy_install_timeout_s,
            },
            timeout_s=self.settings.deploy_install_timeout_s + AGENT_TIMEOUT_S,
        )
        await self._write_marker(run, str(result.get("version")))
        seconds = result.get("seconds")
        took = f" in {float(seconds):.1f} s" if isinstance(seconds, (int, float)) else ""
        return _Outcome(
            detail=f"servetune {result.get('version')} installed by copying the manager's venv "
            f"(its own servetune replaced by the wheel with {result.get('installer')}){took}"
        )

    async def _write_marker(self, run: _Run, version: str | None) -> None:
        """The install marker: which bundle (or venv copy) is installed, so a restore skips it."""
        marker = json.dumps({"bundle": self._bundle_key(run), "version": version})
        await self._agent(
            run,
            "write_file",
            {"path": run.path(INSTALLED_MARKER), "content": marker, "mode": 0o600},
        )

    def _bundle_key(self, run: _Run) -> str:
        if run.venv_copy is not None:
            return run.venv_copy.key
        assert run.bundle is not None
        return run.bundle.dir.name

    async def _installed_key(self, run: _Run) -> str | None:
        """The bundle key recorded in the install directory's marker; None when there is none
        (or the agent cannot read it: then servetune is installed again)."""
        try:
            result = await self._agent(
                run, "read_file", {"path": run.path(INSTALLED_MARKER), "max_bytes": 4096}
            )
            data = json.loads(str(result.get("text") or "{}"))
        except (DeployFailed, ValueError) as e:
            log.info("no install marker on %s (%s): installing", run.target, e)
            return None
        key = data.get("bundle") if isinstance(data, dict) else None
        return str(key) if key else None

    async def _live_worker(self, run: _Run) -> WorkerStatus | None:
        """The ``status`` step of a restore: this slot's worker when it runs on the remote AND is
        registered online with that pid; else None."""

        async def step() -> _Outcome:
            result = await self._agent(run, "status", {"install_dir": run.install_dir})
            pids = {int(p) for p in result.get("pids") or []}
            if not result.get("running") or not pids:
                return _Outcome(detail="no worker process runs")
            for status in await self.registry.workers():
                if (
                    _of_slot(status, run.slot)
                    and status.info.pid in pids
                    and status.state in ("online", "busy")
                ):
                    return _Outcome(
                        value=status,
                        detail=f"worker {status.info.id} runs (pid {status.info.pid}) and is "
                        f"{status.state}: not restarted",
                    )
            return _Outcome(
                detail=f"worker process(es) {sorted(pids)} run but none is registered online"
            )

        live: WorkerStatus | None = await self._step(run, "status", step)
        if live is not None:
            run.steps.append(
                DeployStep(
                    name="register",
                    status=StepStatus.OK,
                    duration_s=0.0,
                    detail=f"registered as {live.info.id}",
                )
            )
        return live

    async def _stop_leftovers(self, run: _Run) -> None:
        async def step() -> _Outcome:
            stopped, owner = await self._stop_worker(run, run.install_dir, STOP_GRACE_S)
            if owner:  # another slot's worker runs from this install_dir: not a leftover
                message = (
                    f"{run.install_dir} is not a directory of servetune's own: it holds the "
                    f"worker of slot {owner}; give each slot its own"
                )
                raise diagnose.from_agent_error(
                    {"kind": "permission_denied", "message": message, "found": run.found()},
                    step="stop",
                    target=run.target,
                )
            if not stopped:
                return _Outcome(detail="no leftover worker process")
            return _Outcome(detail=f"stopped leftover worker process(es) {stopped}")

        await self._step(run, "stop", step)

    async def _redis(self, run: _Run) -> None:
        async def step() -> _Outcome:
            endpoint = parse_redis_url(self.redis_url)
            via = run.slot.redis_via
            if via == RedisVia.FORWARD:
                return await self._forward(run, endpoint)
            if via == RedisVia.REVERSE:
                return await self._reverse(run, endpoint)
            return await self._direct(run, endpoint)

        await self._step(run, "redis", step)

    def _bind_port(self, run: _Run, attempt: int) -> int:
        """The port a tunnel listens on, on 127.0.0.1 of the worker's host: stable per slot and
        install directory (a restore reuses it), another one for each retry; 20000-59999."""
        seed = f"{run.slot.name}\0{run.install_dir}\0{attempt}".encode()
        return 20000 + int.from_bytes(hashlib.sha256(seed).digest()[:4], "big") % 40000

    def _manager_ssh(self, run: _Run) -> tuple[str, str, int]:
        """The manager's sshd a forward tunnel goes to (user, host, port), from the slot or the
        settings. Raises DeployFailed (tunnel_failed) when it is not set or cannot be parsed:
        checked before the pre-flight too, so a deploy does not install for minutes first."""
        manager = run.slot.manager_ssh or self.settings.manager_ssh
        if not manager:
            raise DeployFailed(
                Category.TUNNEL_FAILED,
                f"slot {run.slot.name} uses redis_via=forward but the manager's ssh address is "
                "not set",
                "set the slot's manager_ssh (--manager-ssh user@host[:port], the manager's sshd "
                "as the worker reaches it) or SERVETUNE_MANAGER_SSH; or use --redis-via reverse",
            )
        try:
            user, host, port = parse_manager_ssh(manager)
        except ValueError as e:
            raise DeployFailed(
                Category.TUNNEL_FAILED,
                str(e),
                "set manager_ssh to [user@]host[:port] of the manager's sshd",
            ) from e
        return user or getpass.getuser(), host, port

    async def _forward(self, run: _Run, endpoint: RedisEndpoint) -> _Outcome:
        user, host, port = self._manager_ssh(run)

        def forward_cfg(attempt: int) -> tuple[TunnelConfig, list[str]]:
            return _tunnel(
                run,
                direction="local",
                destination=f"{user}@{host}",
                port=port,
                identity_file=run.path("ssh", "id_ed25519"),
                known_hosts_file=run.path("ssh", "known_hosts"),
                strict_host_key_checking="yes",  # the file holds the manager's own keys
                bind_port=self._bind_port(run, attempt),
                target_host=endpoint.host,
                target_port=endpoint.port,
            )

        forward_cfg(0)  # a path ssh would misread fails here, before any key is made
        host_keys = await self._manager_host_keys(user, host, port)
        await self._agent(
            run,
            "write_file",
            {
                "path": run.path("ssh", "known_hosts"),
                "content": keys.known_hosts_text(host, port, host_keys),
                "mode": 0o600,
            },
        )
        key = await self._agent(run, "keygen", {"install_dir": run.install_dir})
        public_key = str(key["public_key"]).strip()
        line = keys.authorized_line(public_key, run.slot.name, endpoint.host, endpoint.port)
        await asyncio.to_thread(
            keys.add_key, self.settings.authorized_keys_path, line, run.slot.name
        )
        last: DeployFailed | None = None
        for attempt in range(TUNNEL_PORT_TRIES):
            cfg, argv = forward_cfg(attempt)
            try:
                result = await self._agent(
                    run,
                    "tunnel_check",
                    {
                        "argv": argv,
                        "bind_port": cfg.bind_port,
                        "password": endpoint.password,
                        "timeout_s": self.settings.ssh_connect_timeout_s + 10.0,
                    },
                    timeout_s=self.settings.ssh_connect_timeout_s * 2 + AGENT_TIMEOUT_S,
                )
            except DeployFailed as e:
                text = f"{e} {' '.join(e.logs)}"
                if e.category != Category.TUNNEL_FAILED:
                    raise
                ssh_said = [
                    line.strip()
                    for line in e.logs
                    if line.strip() and not line.startswith(("debug", "Warning: Permanently"))
                ]
                last = diagnose.failure(
                    Category.TUNNEL_FAILED,
                    f"{e}" + (f": {ssh_said[-1]}" if ssh_said else ""),
                    step="redis",
                    logs=e.logs,
                    **run.found(
                        manager_ssh=f"{user}@{host}:{port}",
                        ssh_error=(" / ".join(ssh_said[-3:]) or str(e)).rstrip("."),
                        authorized_keys=str(self.settings.authorized_keys_path),
                        address=f"{endpoint.host}:{endpoint.port}",
                    ),
                )
                if "Address already in use" in text or "cannot listen" in text:
                    continue
                if any(m in text for m in _HOST_KEY_MARKERS):
                    pinned = ", ".join(keys.fingerprint(k) for k in host_keys)
                    last.suggestion = (
                        f"The MANAGER's sshd at {host}:{port}, as the worker's host reaches it, "
                        f"showed a host key other than the one(s) the manager read from its own "
                        f"sshd at that address ({pinned}; ssh said: "
                        f"{ssh_said[-1] if ssh_said else e}): "
                        "something between the worker and the manager answers in its place "
                        "(a man in the middle, a port forward or NAT to another machine), or "
                        "manager_ssh names another machine for the manager than for the worker. "
                        f"On the worker's host compare `ssh-keyscan -p {port} {host}` with the "
                        "manager's /etc/ssh/ssh_host_*_key.pub; make manager_ssh "
                        "(SERVETUNE_MANAGER_SSH, or --manager-ssh for this slot) an address that "
                        "reaches the manager's own sshd from both, or use --redis-via reverse."
                    )
                    raise last from e
                if any(m in text for m in _UNREACHABLE_MARKERS):
                    last.suggestion = (
                        f"The worker's host cannot reach the manager's sshd at {user}@{host}:"
                        f"{port} (ssh said: {ssh_said[-1] if ssh_said else e}): manager_ssh "
                        "(SERVETUNE_MANAGER_SSH, or --manager-ssh for this slot) must be the "
                        "manager's sshd as that host reaches it, address and port; try "
                        f"`ssh -p {port} {user}@{host}` on the host, or use --redis-via reverse."
                    )
                raise last from e
            run.launch = WorkerLaunchConfig(
                redis_url=endpoint.url_at("127.0.0.1", cfg.bind_port),
                name=run.slot.name,
                data_dir=run.path("data"),
                max_parallel=run.slot.max_parallel,
                tunnel=cfg,
            )
            seconds = result.get("seconds")
            took = f" (up in {float(seconds):.1f} s)" if isinstance(seconds, (int, float)) else ""
            return _Outcome(
                detail=f"forward tunnel 127.0.0.1:{cfg.bind_port} → {user}@{host}:{port} → "
                f"{endpoint.host}:{endpoint.port} answers PING{took}; key added to "
                f"{self.settings.authorized_keys_path}"
            )
        assert last is not None
        raise last

    async def _manager_host_keys(self, user: str, host: str, port: int) -> list[str]:
        """The host keys (``"<type> <base64>"``, ed25519/ecdsa/rsa) of the manager's sshd at
        ``host``:``port`` (``manager_ssh``), read on the manager itself with
        ``ssh-keyscan -T <connect timeout> -p <port> <host>`` (argv, no shell; killed after the
        connect timeout + 10 s): the manager reaching its own address is not exposed to the
        network between worker and manager, so these keys are what the worker's tunnel must
        meet. Raises DeployFailed (tunnel_failed, suggestion naming host:port and
        SERVETUNE_MANAGER_SSH / --manager-ssh) when ssh-keyscan is missing, times out or
        returns no such key."""
        connect_s = max(1, math.ceil(self.settings.ssh_connect_timeout_s))
        argv = ["ssh-keyscan", "-T", str(connect_s), "-p", str(port), host]
        try:
            keys.known_hosts_name(host, port)  # a host ssh-keyscan could read as an option
            result = await run_command(argv, timeout_s=connect_s + 10.0)
        except (ValueError, DeployFailed) as e:
            raise DeployFailed(
                Category.TUNNEL_FAILED,
                f"cannot read the host keys of the manager's sshd at {host}:{port}: {e}",
                "install ssh-keyscan (package openssh-client) on the manager and set manager_ssh "
                "(SERVETUNE_MANAGER_SSH, or --manager-ssh for this slot) to [user@]host[:port] "
                "of the manager's sshd; or use --redis-via reverse",
                step="redis",
            ) from e
        host_keys = keys.parse_keyscan(result.stdout)
        if host_keys:
            return host_keys
        said = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        said = [line for line in said if not line.startswith("#")] or said
        why = (
            "timed out"
            if result.timed_out
            else said[-1]
            if said
            else "no key came back: nothing listens there, or not an sshd"
        )
        raise DeployFailed(
            Category.TUNNEL_FAILED,
            f"the manager read no ed25519/ecdsa/rsa host key from its own sshd at {host}:{port} "
            f"(`{' '.join(argv)}`: {why}); the worker's tunnel would have no key to check it by",
            f"The manager cannot reach the manager's sshd at {user}@{host}:{port} itself: "
            "manager_ssh (SERVETUNE_MANAGER_SSH, or --manager-ssh for this slot) must be the "
            "manager's own sshd, running and reachable at that address and port from the "
            "manager as from the worker's host (check `systemctl status ssh` and "
            f"`ssh-keyscan -p {port} {host}` on the manager); or use --redis-via reverse.",
            step="redis",
            logs=diagnose.tail(f"{result.stdout}\n{result.stderr}"),
        )

    async def _reverse(self, run: _Run, endpoint: RedisEndpoint) -> _Outcome:
        assert run.session is not None and run.resolved is not None
        resolved = run.resolved
        options = run.session.target.options
        # ssh takes the first value given ("none" turns off a ProxyJump of ~/.ssh/config)
        jumps = _option_values(options, "-J", "proxyjump")
        jump = jumps[0] if jumps else None
        config_file = _session_config_file(run.session)
        # the key the user named (-i / IdentityFile); else ssh's defaults and ~/.ssh/config
        keys_given = _option_values(options, "-i", "identityfile")
        identity = keys_given[0] if keys_given else None
        more_keys = keys_given[1:]  # ssh tries them all, in order
        cfg, _ = _tunnel(
            run,
            direction="remote",
            destination=f"{resolved.user}@{resolved.hostname}",
            port=resolved.port,
            proxy_jump=jump,
            identity_file=identity,
            more_identity_files=more_keys,
            config_file=config_file,
            known_hosts_file=str(self.settings.ssh_dir / "known_hosts"),
            bind_port=self._bind_port(run, 0),
            target_host=endpoint.host,
            target_port=endpoint.port,
        )
        pid = await _maybe_await(tunnel.start_detached(self.settings, run.slot.name, cfg))
        deadline = time.monotonic() + self.settings.ssh_connect_timeout_s + 15.0
        while True:
            try:
                await self._agent(
                    run,
                    "redis_probe",
                    {
                        "host": "127.0.0.1",
                        "port": cfg.bind_port,
                        "password": endpoint.password,
                        "timeout_s": 5.0,
                    },
                )
                break
            except DeployFailed as e:
                if e.category != Category.REDIS_UNREACHABLE or time.monotonic() > deadline:
                    await _maybe_await(tunnel.stop_detached(self.settings, run.slot.name))
                    refused = self._tunnel_ssh_failure(run, cfg)
                    if refused is not None:
                        raise refused from e
                    raise DeployFailed(
                        Category.TUNNEL_FAILED,
                        f"the reverse tunnel to {run.target} (manager pid {pid}) does not "
                        f"reach Redis at 127.0.0.1:{cfg.bind_port} on the remote: {e}",
                        f"check that {run.target}'s sshd allows remote forwarding "
                        "(AllowTcpForwarding yes) and see the tunnel log under "
                        f"{self.settings.data_dir / 'tunnels'}; or use --redis-via forward",
                        step="redis",
                        logs=e.logs,
                    ) from e
                await asyncio.sleep(1.0)
        run.launch = WorkerLaunchConfig(
            redis_url=endpoint.url_at("127.0.0.1", cfg.bind_port),
            name=run.slot.name,
            data_dir=run.path("data"),
            max_parallel=run.slot.max_parallel,
        )
        return _Outcome(
            detail=f"reverse tunnel from the manager (pid {pid}): Redis answers at "
            f"127.0.0.1:{cfg.bind_port} on {run.target}"
        )

    def _tunnel_ssh_failure(self, run: _Run, cfg: TunnelConfig) -> DeployFailed | None:
        """What the reverse tunnel's own ssh said, when it never got up (refused key, host key,
        closed port, …: its log), as that category; None when its log names no such cause."""
        said = tunnel.detached_log_tail(self.settings, run.slot.name)
        if not said:
            return None
        result = CommandResult(
            argv=tunnel.tunnel_argv(cfg), returncode=255, stdout="", stderr=said, duration_s=0.0
        )
        found = diagnose.classify_ssh(result, target=run.target)
        if found is None or found.category in (Category.UNKNOWN, Category.STEP_TIMEOUT):
            return None
        return DeployFailed(
            found.category,
            f"the reverse tunnel's ssh to {run.target} failed: {found}",
            found.suggestion,
            step="redis",
            logs=found.logs,
        )

    async def _direct(self, run: _Run, endpoint: RedisEndpoint) -> _Outcome:
        address = run.slot.redis_address
        if not address:
            raise DeployFailed(
                Category.REDIS_UNREACHABLE,
                f"slot {run.slot.name} uses redis_via=direct but has no redis_address",
                "set the slot's redis_address (--redis-address host:port, Redis as the worker "
                "reaches it) or use --redis-via forward",
                step="redis",
            )
        host, sep, port_text = address.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise DeployFailed(
                Category.REDIS_UNREACHABLE,
                f"redis_address {address!r} is not host:port",
                "set redis_address to host:port of the manager's Redis as the worker reaches it "
                "(e.g. 10.0.0.5:6379)",
                step="redis",
            )
        port = int(port_text)
        try:
            await self._agent(
                run,
                "redis_probe",
                {
                    "host": host,
                    "port": port,
                    "password": endpoint.password,
                    "timeout_s": min(10.0, self.settings.ssh_connect_timeout_s),
                },
            )
        except DeployFailed as e:
            if e.category != Category.REDIS_UNREACHABLE:
                raise
            found = diagnose.failure(
                Category.REDIS_UNREACHABLE,
                str(e),
                step="redis",
                logs=e.logs,
                **run.found(address=address, reason=e.logs[-1] if e.logs else str(e)),
            )
            if _is_loopback(host):
                where = run.facts.hostname if run.facts else run.target
                found.suggestion = (
                    f"{address} is {where}'s own loopback, not the manager's Redis: use "
                    "--redis-via forward (the worker opens an ssh tunnel to the manager) or "
                    "--redis-via reverse (the manager opens one to the worker), or give "
                    "redis_address as the manager's address the worker can reach"
                )
            raise found from e
        run.launch = WorkerLaunchConfig(
            redis_url=endpoint.url_at(host, port),
            name=run.slot.name,
            data_dir=run.path("data"),
            max_parallel=run.slot.max_parallel,
        )
        return _Outcome(detail=f"Redis answers PING at {address} from {run.target}")

    async def _config(self, run: _Run) -> None:
        async def step() -> _Outcome:
            assert run.launch is not None
            path = run.path("worker.json")
            await self._agent(
                run,
                "write_file",
                {"path": path, "content": run.launch.model_dump_json(indent=2), "mode": 0o600},
            )
            return _Outcome(detail=f"{path} (mode 600)")

        await self._step(run, "config", step)

    async def _start(self, run: _Run) -> None:
        async def step() -> _Outcome:
            result = await self._agent(
                run,
                "start_worker",
                {"install_dir": run.install_dir, "config_path": run.path("worker.json")},
                timeout_s=self.settings.ssh_connect_timeout_s + AGENT_TIMEOUT_S + STOP_GRACE_S,
            )
            run.pid = int(result["pid"])
            return _Outcome(detail=f"worker started (pid {run.pid})")

        await self._step(run, "start", step)

    async def _register(self, run: _Run) -> WorkerStatus:
        async def step() -> _Outcome:
            timeout_s = self.settings.register_timeout_s
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    for status in await self.registry.workers():
                        if (
                            _of_slot(status, run.slot)
                            and status.info.pid == run.pid
                            and status.state in ("online", "busy")
                        ):
                            gpus = ", ".join(_gpu_names(status)) or "no GPU"
                            return _Outcome(
                                value=status,
                                detail=f"registered as {status.info.id} ({gpus})",
                            )
                except RedisUnavailable as e:
                    log.warning("register step: the manager cannot read its Redis: %s", e)
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(REGISTER_POLL_S)
            logs = await self._worker_log_tail(run)
            assert run.launch is not None
            raise diagnose.failure(
                Category.REGISTER_TIMEOUT,
                f"worker {run.slot.name} (pid {run.pid}) on {run.target} did not register "
                f"within {timeout_s:g} s",
                step="register",
                logs=logs,
                **run.found(timeout_s=f"{timeout_s:g}", redis_url=run.launch.redis_url),
            )

        status: WorkerStatus = await self._step(run, "register", step)
        return status

    async def _worker_log_tail(self, run: _Run) -> list[str]:
        try:
            result = await self._agent(
                run,
                "read_file",
                {"path": run.path("logs", "worker.out"), "max_bytes": 16384},
            )
        except DeployFailed as e:
            log.info("cannot read the worker's log on %s: %s", run.target, e)
            return []
        return diagnose.tail(str(result.get("text") or ""))


def _tunnel(run: _Run, **fields: Any) -> tuple[TunnelConfig, list[str]]:
    """The TunnelConfig of ``fields`` and its ssh argv; DeployFailed TUNNEL_FAILED naming the
    field when ssh could misread one of its paths or names."""
    try:
        cfg = TunnelConfig(**fields)
        return cfg, tunnel.tunnel_argv(cfg)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        if fields.get("direction") == "local":
            where = (
                f"the worker's tunnel key and known_hosts live under install_dir "
                f"({run.slot.install_dir}): choose an install_dir made of letters, digits and "
                "._/+@=,- only (e.g. ~/.servetune), or use --redis-via direct"
            )
        else:
            where = (
                "the manager's tunnel uses the ssh command's -i key and files under the "
                "manager's data directory: give them paths of letters, digits and ._/+@=,- "
                "only, or use --redis-via forward"
            )
        raise DeployFailed(
            Category.TUNNEL_FAILED,
            f"the Redis tunnel of slot {run.slot.name} cannot be set up: {e}",
            where,
            step="redis",
        ) from e


_UNREACHABLE_MARKERS = (
    "Connection refused",
    "Connection timed out",
    "No route to host",
    "Network is unreachable",
    "Could not resolve hostname",
)
"""ssh's words for a manager sshd the worker's host cannot reach (a wrong manager_ssh)."""

_HOST_KEY_MARKERS = (
    "Host key verification failed",
    "REMOTE HOST IDENTIFICATION HAS CHANGED",
    "host key is known for",
    "Host key for",
)
"""ssh's words for a host key that is not the one in known_hosts (StrictHostKeyChecking=yes)."""


def _option_values(options: tuple[str, ...], flag: str, config_key: str) -> list[str]:
    """The values given to ``flag`` (``-i``) or ``-o <config_key>=…`` in canonical ssh options."""
    found = []
    for n, word in enumerate(options[:-1]):
        value = options[n + 1]
        if word == flag:
            found.append(value)
        elif word == "-o":
            key, _, rest = (value if "=" in value else value.replace(" ", "=", 1)).partition("=")
            if key.strip().lower() == config_key:
                found.append(rest.strip())
    return found


def _session_config_file(session: SshSession) -> str:
    """The generated ssh config of ``session`` (BatchMode, servetune's known_hosts, …)."""
    return str(session.config_path())


def free_space_needed_gib(*, wheelhouse_bytes: int | None, venv_copy_bytes: int | None) -> float:
    """Free space, GiB, the prepare step asks for in the install directory: ONLINE_MIN_FREE_GIB,
    or more for an offline install (OFFLINE_SPACE_FACTOR × the bundle's ``wheelhouse_bytes``) or
    a venv copy (venvcopy.SPACE_FACTOR × the venv's ``venv_copy_bytes``); None: not that kind.
    Pure."""
    need_gib = ONLINE_MIN_FREE_GIB
    if wheelhouse_bytes is not None:
        need_gib = max(need_gib, wheelhouse_bytes / 2**30 * OFFLINE_SPACE_FACTOR)
    if venv_copy_bytes is not None:
        need_gib = max(need_gib, venv_copy_bytes / 2**30 * venvcopy.SPACE_FACTOR)
    return need_gib


def _pids(pids: list[int]) -> str:
    """``[7807, 7808]`` as ``7807, 7808`` for messages."""
    return ", ".join(str(p) for p in pids)


def _dir_size_bytes(path: Any) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def _maybe_await(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value
