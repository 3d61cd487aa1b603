"""REST routes of worker slots: saved SSH targets; create, list, read, change, delete, deploy
a worker there, restore it.

Statuses are reconciled with the worker registry on every read; deploys run through
``manager/worker_slots.py`` (one at a time per slot), which stores their outcome.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from servetune.manager.deps import SlotsDep
from servetune.manager.schemas import DeployRequest, ErrorBody, ProblemsBody, WorkerSlotList
from servetune.remote.models import DeployReport, WorkerSlot, WorkerSlotCreate, WorkerSlotUpdate

router = APIRouter(prefix="/api/worker-slots", tags=["worker slots"])

SlotId = Annotated[int, Path(ge=1, le=2**31 - 1, description="Database id of the slot.")]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}}
_BAD_INPUT: dict[int | str, dict[str, Any]] = {422: {"model": ProblemsBody}}
_CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": ErrorBody}}


@router.post(
    "",
    status_code=201,
    responses={**_BAD_INPUT, **_CONFLICT},
    summary="Save a worker slot (an SSH target)",
)
async def create_slot(body: WorkerSlotCreate, slots: SlotsDep) -> WorkerSlot:
    """Check the slot (422 naming each bad field: an ssh command with `;`, `$(…)`, backticks,
    newlines or a forbidden option, a path with shell characters, …) and save it (409 when the
    name is taken). Nothing is run: deploy it with POST /api/worker-slots/{id}/deploy."""
    slot: WorkerSlot = await slots.create(body)
    return slot


@router.get("", summary="List worker slots with their status")
async def list_slots(slots: SlotsDep) -> WorkerSlotList:
    """Every slot, by name; each status reconciled with the worker registry now."""
    return WorkerSlotList(items=await slots.list())


@router.get("/{slot_id}", responses=_NOT_FOUND, summary="Read a worker slot")
async def read_slot(slot_id: SlotId, slots: SlotsDep) -> WorkerSlot:
    """The slot, its status reconciled with the worker registry (404 when none)."""
    slot: WorkerSlot = await slots.read(slot_id)
    return slot


@router.patch(
    "/{slot_id}",
    responses={**_NOT_FOUND, **_BAD_INPUT, **_CONFLICT},
    summary="Change a worker slot",
)
async def update_slot(slot_id: SlotId, body: WorkerSlotUpdate, slots: SlotsDep) -> WorkerSlot:
    """Change the fields given (checked as on create); 409 while a deploy of it runs or when a
    new name is taken. A running worker keeps its settings until the next deploy or restore."""
    slot: WorkerSlot = await slots.update(slot_id, body)
    return slot


@router.delete(
    "/{slot_id}",
    responses={**_NOT_FOUND, **_CONFLICT},
    summary="Delete a worker slot (and stop its worker)",
)
async def delete_slot(
    slot_id: SlotId,
    slots: SlotsDep,
    keep_worker: Annotated[
        bool, Query(description="Leave the worker running on its host (default: stop it).")
    ] = False,
) -> DeployReport:
    """Forget the slot (409 while a deploy of it runs): its worker on the host is stopped
    (unless ``keep_worker``; a running trial is handed back), its key leaves the manager's
    authorized_keys and its reverse tunnel stops. The answer is a report (``action`` remove)
    whose ``stop`` step says what happened on the host: a host that cannot be reached is a
    ``warning`` step with its category and a suggestion, and the slot is removed anyway."""
    report: DeployReport = await slots.delete(slot_id, stop_worker=not keep_worker)
    return report


@router.post(
    "/{slot_id}/deploy",
    responses={**_NOT_FOUND, **_BAD_INPUT, **_CONFLICT},
    summary="Deploy a worker on the slot's host",
)
async def deploy_slot(
    slot_id: SlotId, slots: SlotsDep, body: DeployRequest | None = None
) -> DeployReport:
    """Install servetune on the host and start a worker there, step by step; answers when it
    ends (minutes). HTTP 200 even when it failed: ``success``, ``category`` and ``suggestion``
    say what failed and how to fix it. 409 while another deploy or restore of it runs."""
    offline = body.offline if body is not None else None
    report: DeployReport = await slots.deploy(slot_id, offline)
    return report


@router.post(
    "/{slot_id}/restore",
    responses={**_NOT_FOUND, **_CONFLICT},
    summary="Restore the slot's worker",
)
async def restore_slot(slot_id: SlotId, slots: SlotsDep) -> DeployReport:
    """Bring the worker back: nothing is restarted when it runs and is registered; a dead
    worker's leftovers are stopped and it is started again. HTTP 200 even when it failed."""
    report: DeployReport = await slots.restore(slot_id)
    return report
