"""REST routes of workers: list with counts per state, read, rename, GPU history, recent logs.

Workers come from the registry in Redis (cluster/registry.py), logs from cluster/logs.py.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import AwareDatetime

from servetune.cluster.logs import READ_LIMIT_MAX
from servetune.cluster.logs import read_logs as read_worker_logs
from servetune.core.spec import Problem
from servetune.errors import SpecInvalid, WorkerNotFound
from servetune.manager.deps import RedisDep, RegistryDep
from servetune.manager.schemas import (
    ErrorBody,
    GpuHistory,
    LogList,
    ProblemsBody,
    WorkerList,
    WorkerPublic,
    WorkerUpdate,
)

router = APIRouter(prefix="/api/workers", tags=["workers"])

WorkerId = Annotated[
    str, Path(min_length=1, max_length=64, description="Worker id (see GET /api/workers).")
]
LEVEL_HELP = "Only this level and above: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)."
SINCE_HELP = (
    "Only records at or after this time, with a zone, e.g. 2026-01-01T12:00:00Z; write Z or "
    "%2B00:00 for +00:00 (a bare + in a URL reads as a space)."
)

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}}
_BAD_INPUT: dict[int | str, dict[str, Any]] = {422: {"model": ProblemsBody}}
_CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": ErrorBody}}


async def _status(registry: Any, worker_id: str) -> Any:
    status = await registry.worker(worker_id)
    if status is None:
        raise WorkerNotFound(f"no worker {worker_id!r}; GET /api/workers lists the registered ones")
    return status


@router.get("", summary="List workers with how many are online, busy and offline")
async def list_workers(registry: RegistryDep) -> WorkerList:
    """Every registered worker and the count in each state."""
    items = [WorkerPublic.of(s) for s in await registry.workers()]
    return WorkerList(
        items=items,
        online=sum(w.state == "online" for w in items),
        busy=sum(w.state == "busy" for w in items),
        offline=sum(w.state == "offline" for w in items),
    )


@router.get("/{worker_id}", responses=_NOT_FOUND, summary="Read a worker")
async def read_worker(worker_id: WorkerId, registry: RegistryDep) -> WorkerPublic:
    """The worker with this id (404 when none registered)."""
    return WorkerPublic.of(await _status(registry, worker_id))


@router.patch(
    "/{worker_id}",
    responses={**_NOT_FOUND, **_BAD_INPUT, **_CONFLICT},
    summary="Rename a worker",
)
async def update_worker(
    worker_id: WorkerId, body: WorkerUpdate, registry: RegistryDep
) -> WorkerPublic:
    """Set (or clear, with null) the worker's alias."""
    await _status(registry, worker_id)
    return WorkerPublic.of(await registry.set_alias(worker_id, body.alias))


@router.get("/{worker_id}/gpu-history", responses=_NOT_FOUND, summary="A worker's GPU history")
async def read_gpu_history(
    worker_id: WorkerId,
    registry: RegistryDep,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Samples, newest first.")] = 120,
) -> GpuHistory:
    """The worker's recent GPU samples (one per heartbeat), newest first."""
    await _status(registry, worker_id)
    return GpuHistory(items=await registry.gpu_history(worker_id, limit))


@router.get(
    "/{worker_id}/logs",
    responses={**_NOT_FOUND, **_BAD_INPUT},
    summary="A worker's recent log records",
)
async def read_logs(
    worker_id: WorkerId,
    redis: RedisDep,
    registry: RegistryDep,
    limit: Annotated[
        int, Query(ge=1, le=READ_LIMIT_MAX, description="Most records returned.")
    ] = 200,
    level: Annotated[str | None, Query(max_length=20, description=LEVEL_HELP)] = None,
    since: Annotated[AwareDatetime | None, Query(description=SINCE_HELP)] = None,
    trial: Annotated[
        int | None, Query(ge=1, le=2**31 - 1, description="Only records of this trial id.")
    ] = None,
) -> LogList:
    """The worker's last records, oldest first (kept in Redis: the newest ones, for a day);
    404 for a worker that is not registered, like GET /api/workers/{id}."""
    await _status(registry, worker_id)
    try:
        records = await read_worker_logs(
            redis, worker_id, limit=limit, level=level, since=since, trial_id=trial
        )
    except (ValueError, OverflowError) as e:  # e.g. a `since` at the edge of the calendar
        field = "since" if isinstance(e, OverflowError) else str(e).split(":", 1)[0]
        raise SpecInvalid([Problem(field, f"{e}; give a value in range")]) from e
    return LogList(items=records)
