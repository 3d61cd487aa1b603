"""The health route: whether the manager, its database and its Redis answer.

Load balancers and `servetune submit` call it; it never fails with 5xx itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging

from fastapi import APIRouter

from servetune.manager.deps import RedisDep, StoreDep, SupervisorDep
from servetune.manager.schemas import Health

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["health"])


def _version() -> str:
    try:
        return importlib.metadata.version("servetune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@router.get("/health", summary="Health of the manager, its database and Redis")
async def read_health(store: StoreDep, redis: RedisDep, supervisor: SupervisorDep) -> Health:
    """ok when the database and Redis both answer; degraded otherwise (still 200)."""
    database = redis_ok = False
    try:
        await asyncio.to_thread(store.list_studies, 1)
        database = True
    except Exception as e:  # the answer is the health, not an error
        log.warning("health: the database does not answer: %s", e)
    with contextlib.suppress(Exception):
        redis_ok = bool(await asyncio.wait_for(redis.ping(), timeout=2.0))
    return Health(
        status="ok" if database and redis_ok else "degraded",
        version=_version(),
        database=database,
        redis=redis_ok,
        studies_running=len(supervisor.running()),
    )
