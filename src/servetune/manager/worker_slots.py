"""Worker slots as the manager serves them: stored slots, statuses reconciled with the registry,
and one deploy or restore per slot at a time through the deployer (remote/deploy.py).

Routes call ``WorkerSlots``; it is the only place that combines the store, Redis and deploys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from servetune.core.spec import Problem
from servetune.errors import DeployFailed, SlotBusy, SpecInvalid
from servetune.manager.deps import SlotDeployer
from servetune.remote import diagnose
from servetune.remote.models import (
    Category,
    DeployReport,
    OfflineMode,
    RedisVia,
    SlotStatus,
    WorkerSlot,
    WorkerSlotCreate,
    WorkerSlotUpdate,
)
from servetune.remote.ssh import parse_ssh_command
from servetune.store.slots import SlotStore

log = logging.getLogger(__name__)

_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])"
REDIS_ADDRESS_PATTERN = rf"^{_HOST}:[0-9]{{1,5}}$"
"""``redis_address``: host:port (an IPv6 host in brackets), nothing else: no scheme, no password."""
MANAGER_SSH_PATTERN = rf"^(?:[A-Za-z0-9._][A-Za-z0-9._-]{{0,63}}@)?{_HOST}(?::[0-9]{{1,5}})?$"
"""``manager_ssh``: [user@]host[:port] as the worker reaches the manager's sshd."""
UNSAFE_PATH_CHARS = frozenset(";&|$`<>(){}[]*?!\"'\\\t")
"""Characters refused in ``install_dir`` although it never reaches a shell (it travels as JSON
to the remote's python): a path holding them is a mistake or an attack, never a need."""
TUNNEL_SAFE_PATH = re.compile(r"^(?:~/|/)[A-Za-z0-9._/+@=,-]*$")
"""``install_dir`` with redis_via forward: the worker's tunnel hands ssh files under it
(``-i``, UserKnownHostsFile), and ssh splits spaces and expands ``%`` in those
(remote/tunnel.py's FILE_PATTERN), so only these characters can work."""


def _address_ok(text: str, pattern: str) -> bool:
    """``text`` matches ``pattern`` and its port, when it ends with one, is 1-65535."""
    if not re.fullmatch(pattern, text):
        return False
    port = re.search(r":([0-9]{1,5})$", text)
    return port is None or 1 <= int(port.group(1)) <= 65535


def slot_problems(slot: WorkerSlotCreate) -> list[Problem]:
    """What is wrong with ``slot`` beyond its field types, each naming its field and the fix:
    an ssh command that ``remote.ssh.parse_ssh_command`` refuses (``;``, ``$(…)``, backticks,
    newlines, forbidden options, …), shell metacharacters, control characters, ``..`` or
    tunnel-unsafe characters in ``install_dir``, a ``python`` starting with '-', a ``redis_address``
    that is not host:port (a URL with a password is refused: no secret is stored), a
    ``manager_ssh`` that is not [user@]host[:port], and ``redis_via`` direct without an address.
    """
    problems: list[Problem] = []
    try:
        parse_ssh_command(slot.ssh_command)
    except DeployFailed as e:
        problems.append(Problem("ssh_command", f"{e}; {e.suggestion}"))
    problems += _install_dir_problems(slot)
    if slot.python.startswith("-"):
        problems.append(
            Problem(
                "python",
                f"{slot.python!r} starts with '-', so it is not an interpreter; give python3 or an "
                "absolute path such as /usr/bin/python3.11",
            )
        )
    if slot.redis_address is not None and not _address_ok(
        slot.redis_address, REDIS_ADDRESS_PATTERN
    ):
        problems.append(
            Problem(
                "redis_address",
                f"{slot.redis_address!r} is not host:port; give Redis as the worker reaches it, "
                "e.g. 10.0.0.5:6379 (no redis:// and no password: the manager hands its own to "
                "the worker in a mode-600 file)",
            )
        )
    if slot.manager_ssh is not None and not _address_ok(slot.manager_ssh, MANAGER_SSH_PATTERN):
        problems.append(
            Problem(
                "manager_ssh",
                f"{slot.manager_ssh!r} is not [user@]host[:port]; give the manager's sshd as the "
                "worker reaches it, e.g. tuner@10.0.0.1:22",
            )
        )
    if slot.redis_via == RedisVia.DIRECT and slot.redis_address is None:
        problems.append(
            Problem(
                "redis_address",
                "redis_via is direct but redis_address is not given; give host:port of Redis as "
                "the worker reaches it, or use redis_via forward (a tunnel)",
            )
        )
    return problems


SYSTEM_TREES = frozenset(
    {"bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "run", "sbin", "sys"}
)
"""Top-level directories whose trees belong to the operating system: no install_dir there."""


def _install_dir_problems(slot: WorkerSlotCreate) -> list[Problem]:
    """What is wrong with ``slot.install_dir``: shell metacharacters, invisible or control
    characters (U+202E would show another path than the real one), a directory that is not one
    of its own (``/``, ``~``, ``..`` parts), and for redis_via forward anything ssh would split
    or expand in the tunnel's key and known_hosts paths (a space, ``%``, non-ASCII)."""
    path = slot.install_dir
    fix = "use a plain path of letters, digits, '/', '.', '_', '-', '~' (e.g. ~/.servetune)"
    bad = sorted({c for c in path if c in UNSAFE_PATH_CHARS})
    if bad:
        return [Problem("install_dir", f"{path!r} holds {' '.join(repr(c) for c in bad)}; {fix}")]
    hidden = sorted({c for c in path if not c.isprintable()})
    if hidden:
        names = ", ".join(f"U+{ord(c):04X}" for c in hidden)
        return [
            Problem(
                "install_dir", f"{path!r} holds invisible or control characters ({names}); {fix}"
            )
        ]
    parts = [p for p in path.split("/") if p not in ("", "~", ".")]
    own = (
        "servetune puts venv/, data/, logs/ and ssh/ in it and stops the processes running from "
        "it; give a directory of its own, e.g. ~/.servetune or /opt/servetune"
    )
    if ".." in parts:
        return [Problem("install_dir", f"{path!r} holds '..': {own}")]
    if not parts:
        return [Problem("install_dir", f"{path!r} is the root or the home directory: {own}")]
    absolute = path.startswith("/")
    if absolute and (
        len(parts) == 1
        or parts[0] in SYSTEM_TREES
        or (len(parts) == 2 and parts[0] in ("usr", "var", "home"))
    ):
        return [Problem("install_dir", f"{path!r} is a system or shared directory: {own}")]
    if slot.redis_via == RedisVia.FORWARD and not TUNNEL_SAFE_PATH.match(path):
        odd = sorted({c for c in path[1:] if not re.match(r"[A-Za-z0-9._/+@=,~-]", c)})
        return [
            Problem(
                "install_dir",
                f"{path!r} holds {' '.join(repr(c) for c in odd)}: with redis_via forward the "
                "worker's ssh tunnel reads its key from this directory and ssh splits or expands "
                f"those characters in file paths; {fix}",
            )
        ]
    return []


def check_slot(slot: WorkerSlotCreate) -> WorkerSlotCreate:
    """``slot`` when ``slot_problems`` finds nothing; else raises SpecInvalid with every problem
    (the API's 422 naming each field)."""
    problems = slot_problems(slot)
    if problems:
        raise SpecInvalid(problems)
    return slot


def _settings_of(slot: WorkerSlot) -> dict[str, Any]:
    return slot.model_dump(mode="json", include=set(WorkerSlotCreate.model_fields))


def _interrupted(slot: WorkerSlot, action: str) -> DeployReport:
    """The failure stored when a deploy or restore starts, so one cut short by a manager that
    was killed says so (category deploy_interrupted) instead of looking never tried."""
    failed = diagnose.failure(
        Category.DEPLOY_INTERRUPTED,
        f"the {action} of worker slot {slot.name} started at "
        f"{datetime.now(UTC).isoformat(timespec='seconds')} and did not finish (the manager "
        "stopped during it)",
        step="",
        name=slot.name,
    )
    return DeployReport(
        success=False,
        action="restore" if action == "restore" else "deploy",
        message=str(failed),
        category=failed.category,
        suggestion=failed.suggestion,
    )


def _failed_report(action: str, e: BaseException, started: float) -> DeployReport:
    """The report of a deploy whose deployer raised (a bug or a cancellation), not a step."""
    return DeployReport(
        success=False,
        action=action,  # "deploy" or "restore"
        message=f"the {action} stopped: {type(e).__name__}: {e}".rstrip(": "),
        category=Category.UNKNOWN,
        suggestion="see the manager's log for the traceback, then try again",
        duration_s=time.monotonic() - started,
    )


class WorkerSlots:
    """The manager's worker slots: CRUD on ``store``, statuses reconciled with ``registry``
    (cluster.registry.Registry) on every read, deploys and restores through the deployer.

    ``deployer_factory()`` builds the deployer the first time one is needed (a manager that
    never deploys never imports the SSH side). At most one deploy or restore runs per slot: a
    second one, an update or a delete meanwhile raises SlotBusy. A deploy runs in its own task,
    so a client that goes away does not stop it halfway; its outcome is stored when it ends.
    Methods raise SlotNotFound, SlotExists, SpecInvalid (bad fields), StoreError and
    RedisUnavailable as the store and the registry do.
    """

    def __init__(
        self, store: SlotStore, registry: Any, deployer_factory: Callable[[], SlotDeployer]
    ) -> None:
        self.store = store
        self.registry = registry
        self._deployer_factory = deployer_factory
        self._deployer: SlotDeployer | None = None
        self._running: dict[int, asyncio.Task[DeployReport]] = {}
        self._deleting: set[int] = set()

    @property
    def deployer(self) -> SlotDeployer:
        """The deployer, built on first use."""
        if self._deployer is None:
            self._deployer = self._deployer_factory()
        return self._deployer

    def deploying(self) -> set[int]:
        """Ids of the slots with a deploy or restore running now."""
        return set(self._running)

    # ---- reads ---------------------------------------------------------------------------
    async def _reconcile(self, slot: WorkerSlot, worker: Any) -> WorkerSlot:
        """``slot`` with its status and last_seen_at as they are now; a change is stored.

        ``worker`` is the registry's WorkerStatus of the slot's worker (None: not registered).
        Order: a deploy running here → deploying; its worker heartbeating → online or busy;
        the last deploy failed → failed; its worker registered once (in the registry or in the
        slot) → offline; otherwise never_seen.
        """
        last_seen_at: datetime | None = slot.last_seen_at
        seen: datetime | None = worker.last_seen_at if worker is not None else None
        if seen is not None and (last_seen_at is None or seen > last_seen_at):
            last_seen_at = seen
        if slot.id in self._running:
            status = SlotStatus.DEPLOYING
        elif worker is not None and worker.state in ("online", "busy"):
            status = SlotStatus.ONLINE if worker.state == "online" else SlotStatus.BUSY
        elif slot.status == SlotStatus.FAILED:
            status = SlotStatus.FAILED
        elif worker is not None or slot.worker_id is not None:
            status = SlotStatus.OFFLINE
        else:
            status = SlotStatus.NEVER_SEEN
        if status == slot.status and last_seen_at == slot.last_seen_at:
            return slot
        if status != SlotStatus.DEPLOYING:  # deploying is not stored: it ends with the deploy
            slot = await asyncio.to_thread(self.store.set_status, slot.id, status, last_seen_at)
        return slot.model_copy(update={"status": status, "last_seen_at": last_seen_at})

    async def list(self) -> list[WorkerSlot]:
        """Every slot, by name, reconciled with the registry."""
        slots = await asyncio.to_thread(self.store.list)
        if not slots:
            return []
        workers = {w.info.id: w for w in await self.registry.workers()}
        return [await self._reconcile(s, workers.get(s.worker_id or "")) for s in slots]

    async def read(self, slot_id: int) -> WorkerSlot:
        """The slot ``slot_id``, reconciled with the registry. Raises SlotNotFound."""
        slot = await asyncio.to_thread(self.store.get, slot_id)
        worker = await self.registry.worker(slot.worker_id) if slot.worker_id else None
        return await self._reconcile(slot, worker)

    # ---- changes -------------------------------------------------------------------------
    async def create(self, body: WorkerSlotCreate) -> WorkerSlot:
        """Check (``check_slot``) and save a new slot. Raises SpecInvalid, SlotExists."""
        check_slot(body)
        return await asyncio.to_thread(self.store.create, body)

    def _refuse_while_deploying(self, slot: WorkerSlot, doing: str) -> None:
        self._refuse_while_deleting(slot)
        if slot.id in self._running:
            raise SlotBusy(
                f"worker slot {slot.name} is being deployed or restored now; {doing} once it "
                f"ends (GET /api/worker-slots/{slot.id} or `servetune worker-slots` shows its status)"
            )

    def _refuse_while_deleting(self, slot: WorkerSlot) -> None:
        if slot.id in self._deleting:
            raise SlotBusy(
                f"worker slot {slot.name} is being deleted now (its tunnel key is being removed); "
                "save it again once the delete has ended to deploy there"
            )

    async def update(self, slot_id: int, changes: WorkerSlotUpdate) -> WorkerSlot:
        """Apply ``changes`` after checking the slot they make (``check_slot``). Raises
        SlotNotFound, SlotBusy (a deploy is running), SlotExists (name taken), SpecInvalid (a
        bad field, a null for a required one, or a new name or install_dir for a slot deployed
        before: its worker alias and its tunnel key's authorized_keys line carry the old name,
        and its worker may still run from the old directory)."""
        slot = await asyncio.to_thread(self.store.get, slot_id)
        self._refuse_while_deploying(slot, "change it")
        given = changes.model_dump(mode="json", exclude_unset=True)
        required = [f for f in ("name", "ssh_command", "install_dir", "python") if f in given]
        nulls = [f for f in required if given[f] is None]
        if nulls:
            raise SpecInvalid(
                [Problem(f, f"{f} cannot be null; leave it out to keep it") for f in nulls]
            )
        deployed = slot.status != SlotStatus.NEVER_SEEN or slot.worker_id or slot.deployed_at
        moved = [f for f in ("name", "install_dir") if given.get(f) not in (None, getattr(slot, f))]
        if deployed and moved:
            why = {
                "name": f"worker slot {slot.name} was deployed, and its worker, its tunnel key "
                "and its files carry that name, so it cannot be renamed; delete it and save it "
                f"again as {given.get('name')}",
                "install_dir": f"worker slot {slot.name} was deployed to {slot.install_dir}, and "
                "a worker may still run from there, which the slot would no longer stop; remove "
                "the slot (servetune worker-remove, which stops that worker) and deploy it "
                f"again with --install-dir {given.get('install_dir')}",
            }
            raise SpecInvalid([Problem(f, why[f]) for f in moved])
        check_slot(WorkerSlotCreate.model_validate({**_settings_of(slot), **given}))
        await asyncio.to_thread(self.store.update, slot_id, changes)
        return await self.read(slot_id)

    async def delete(self, slot_id: int, *, stop_worker: bool = True) -> DeployReport:
        """Remove the slot: refused while it deploys (SlotBusy); the deployer stops its worker
        on the host (``stop_worker``; a host it cannot reach is a WARNING step of the report,
        and the slot goes anyway), removes its tunnel key and stops its reverse tunnel, then
        the row goes; the report. A deploy, restore, update or second delete asked meanwhile
        gets SlotBusy (a deploy slipping in would leave a tunnel key in authorized_keys). Runs
        shielded: a client that goes away does not leave it half done. Raises SlotNotFound."""
        slot = await asyncio.to_thread(self.store.get, slot_id)
        self._refuse_while_deploying(slot, "delete it")
        # claimed with no await since the check: a deploy starting while the key is removed
        # would add a tunnel key that nothing removes any more
        self._deleting.add(slot.id)

        async def remove() -> DeployReport:
            try:
                report = await self.deployer.remove(slot, stop_worker=stop_worker)
                await asyncio.to_thread(self.store.delete, slot_id)
            finally:
                self._deleting.discard(slot.id)
            log.info("worker slot %s: %s", slot.name, report.message)
            return report

        return await asyncio.shield(asyncio.create_task(remove()))

    # ---- deploys -------------------------------------------------------------------------
    async def deploy(self, slot_id: int, offline: OfflineMode | None = None) -> DeployReport:
        """Deploy a worker on the slot's host (``offline`` overrides the slot's own mode); the
        report, stored on the slot. Raises SlotNotFound, SlotBusy."""
        slot = await asyncio.to_thread(self.store.get, slot_id)
        return await self._run(slot, "deploy", offline)

    async def restore(self, slot_id: int) -> DeployReport:
        """Bring the slot's worker back (idempotent); the report, stored on the slot. Raises
        SlotNotFound, SlotBusy."""
        slot = await asyncio.to_thread(self.store.get, slot_id)
        return await self._run(slot, "restore", None)

    async def _run(
        self, slot: WorkerSlot, action: str, offline: OfflineMode | None
    ) -> DeployReport:
        self._refuse_while_deleting(slot)
        if slot.id in self._running:  # checked and claimed with no await in between
            raise SlotBusy(
                f"a deploy or restore of worker slot {slot.name} is already running; wait for "
                f"it to end (GET /api/worker-slots/{slot.id} or `servetune worker-slots` shows its status)"
            )
        deployer = self.deployer
        task = asyncio.create_task(self._deploy_task(deployer, slot, action, offline))
        self._running[slot.id] = task
        task.add_done_callback(lambda _: self._running.pop(slot.id, None))
        return await asyncio.shield(task)

    async def _deploy_task(
        self, deployer: SlotDeployer, slot: WorkerSlot, action: str, offline: OfflineMode | None
    ) -> DeployReport:
        started = time.monotonic()
        log.info("worker slot %s: %s started", slot.name, action)
        # what a manager killed halfway leaves on the slot (the report replaces it): a trace, and
        # a status that keeps the slot from being renamed while its tunnel key may exist
        await asyncio.to_thread(self.store.record_deploy, slot.id, _interrupted(slot, action))
        try:
            if action == "deploy":
                report = await deployer.deploy(slot, offline=offline)
            else:
                report = await deployer.restore(slot)
        except asyncio.CancelledError as e:
            report = _failed_report(action, RuntimeError("the manager stopped"), started)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.record_deploy, slot.id, report)
            raise e
        except Exception as e:
            log.exception("worker slot %s: the %s raised", slot.name, action)
            report = _failed_report(action, e, started)
        log.info(
            "worker slot %s: %s %s in %.1f s%s",
            slot.name,
            action,
            "succeeded" if report.success else "failed",
            report.duration_s,
            "" if report.success else f" [{report.category}]: {report.message}",
        )
        await asyncio.to_thread(self.store.record_deploy, slot.id, report)
        return report

    async def stop(self) -> None:
        """Cancel the deploys still running (the manager is stopping) and wait for them."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
