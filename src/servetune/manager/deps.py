"""What the manager's routes depend on: the state the lifespan opens, and FastAPI dependencies.

Routes take ``StoreDep``, ``SupervisorDep``, ``RegistryDep``, ``RedisDep``, ``SlotsDep`` and call
them; they never touch SQL or Redis themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from servetune.remote.models import DeployReport, OfflineMode, WorkerSlot
from servetune.settings import Settings
from servetune.store.repo import StudyStore


class Supervisor(Protocol):
    """What the manager needs from the study supervisor (manager/supervisor.py StudySupervisor)."""

    async def start(self) -> None:
        """Start: resume the manager's studies whose owner is gone."""

    async def stop(self) -> None:
        """Stop every study loop (trials keep their lease until it lapses)."""

    async def submit(self, study_id: int) -> None:
        """Take the study's lease and run its loop in a task."""

    async def cancel(self, study_id: int) -> None:
        """Abort the study's jobs; its trials end cancelled."""

    async def resume(self, study_id: int) -> None:
        """Run a stopped study again."""

    def running(self) -> set[int]:
        """Ids of the studies whose loop runs here now."""
        ...

    def subscribe(self, study_id: int) -> AsyncIterator[dict[str, Any]]:
        """Live changes of the study: trial, study status and phase messages."""
        ...


SupervisorFactory = Callable[[Settings, StudyStore, Any], Supervisor]
"""Builds the supervisor from (settings, store, redis.asyncio.Redis); tests pass their own."""


class SlotDeployer(Protocol):
    """What the manager needs from the deployer of worker slots (remote/deploy.py Deployer).

    ``deploy`` and ``restore`` never raise for a failed step: the report says what failed
    (success False, category, suggestion, logs).
    """

    async def deploy(self, slot: WorkerSlot, *, offline: OfflineMode | None = None) -> DeployReport:
        """Install servetune on the slot's host and start a worker there; the report."""
        ...

    async def restore(self, slot: WorkerSlot) -> DeployReport:
        """Bring the slot's worker back (nothing to do when it runs and is registered)."""
        ...

    async def remove(self, slot: WorkerSlot, *, stop_worker: bool = True) -> DeployReport:
        """Stop the slot's worker on its host (``stop_worker``; an unreachable host is a
        WARNING step, not a failure), then drop its tunnel key and reverse tunnel; the report."""
        ...


DeployerFactory = Callable[[Settings, str, Any], SlotDeployer]
"""Builds the deployer from (settings, Redis URL, cluster.registry.Registry); tests pass their own."""


@dataclass
class ManagerState:
    """Everything the lifespan opened, kept on ``app.state.manager``."""

    settings: Settings
    """The settings, with ``redis_url`` set to the Redis in use (private one included)."""
    store: StudyStore
    redis: Any
    """redis.asyncio.Redis (bytes responses) from cluster.redis.connect."""
    registry: Any
    """cluster.registry.Registry on ``redis``."""
    supervisor: Supervisor
    slots: Any = None
    """manager/worker_slots.py WorkerSlots: the slots' store, statuses and deploys."""
    ws_ping_s: float = 20.0
    """Keep-alive ping period of the log WebSocket, s."""


def manager_state(conn: HTTPConnection) -> ManagerState:
    """The running manager's state (set by the lifespan)."""
    state: ManagerState = conn.app.state.manager
    return state


def _store(request: Request) -> StudyStore:
    return manager_state(request).store


def _supervisor(request: Request) -> Supervisor:
    return manager_state(request).supervisor


def _registry(request: Request) -> Any:
    return manager_state(request).registry


def _redis(request: Request) -> Any:
    return manager_state(request).redis


def _slots(request: Request) -> Any:
    return manager_state(request).slots


def _settings(request: Request) -> Settings:
    return manager_state(request).settings


StoreDep = Annotated[StudyStore, Depends(_store)]
SupervisorDep = Annotated[Supervisor, Depends(_supervisor)]
RegistryDep = Annotated[Any, Depends(_registry)]
RedisDep = Annotated[Any, Depends(_redis)]
SettingsDep = Annotated[Settings, Depends(_settings)]
SlotsDep = Annotated[Any, Depends(_slots)]
