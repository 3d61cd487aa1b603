"""The worker slot repository: saved SSH targets, and what their last deploy or restore found.

``SlotStore(store)`` shares the ``StudyStore``'s database; every method is one committed
transaction. Missing slots raise ``SlotNotFound``, a taken name ``SlotExists``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from servetune.errors import SlotExists, SlotNotFound, StoreError
from servetune.remote.models import (
    Category,
    DeployReport,
    SlotStatus,
    WorkerSlot,
    WorkerSlotCreate,
    WorkerSlotUpdate,
)
from servetune.store.repo import StudyStore
from servetune.store.tables import WorkerSlotRow

log = logging.getLogger(__name__)

_SETTINGS = (
    "name",
    "ssh_command",
    "install_dir",
    "python",
    "redis_via",
    "manager_ssh",
    "redis_address",
    "max_parallel",
    "offline",
)
"""The columns a user sets (``WorkerSlotCreate``'s fields); the others are what deploys found."""


def _now() -> datetime:
    return datetime.now(UTC)


def _slot(row: WorkerSlotRow) -> WorkerSlot:
    return WorkerSlot(
        id=row.id,
        name=row.name,
        ssh_command=row.ssh_command,
        install_dir=row.install_dir,
        python=row.python,
        redis_via=row.redis_via,  # validated by pydantic
        manager_ssh=row.manager_ssh,
        redis_address=row.redis_address,
        max_parallel=row.max_parallel,
        offline=row.offline,
        status=row.status,
        worker_id=row.worker_id,
        error=row.error,
        category=row.category,
        suggestion=row.suggestion,
        last_seen_at=row.last_seen_at,
        deployed_at=row.deployed_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


class SlotStore:
    """Worker slots in the database of ``store`` (SQLite or PostgreSQL, migration 0004).

    Holds no secret: a slot is an ssh command, paths, and Redis as host:port at most.
    Every method raises StoreError when the database fails.
    """

    def __init__(self, store: StudyStore) -> None:
        self.store = store

    def _exists(self, name: str) -> SlotExists:
        return SlotExists(
            f"a worker slot named {name!r} already exists; deploy it again with "
            f"POST /api/worker-slots/{{id}}/deploy, or choose another name"
        )

    def _not_found(self, session: Session, ref: int | str) -> SlotNotFound:
        names = session.scalars(select(WorkerSlotRow.name).order_by(WorkerSlotRow.name)).all()
        what = f"id {ref}" if isinstance(ref, int) else repr(ref)
        if names:
            hint = "saved slots: " + ", ".join(names[:20])
        else:
            hint = 'no slot is saved yet; add one with `servetune worker-deploy "ssh user@host"`'
        return SlotNotFound(f"no worker slot {what}; {hint}")

    def _row(self, session: Session, ref: int | str, lock: bool = False) -> WorkerSlotRow:
        if isinstance(ref, int):
            row = session.get(WorkerSlotRow, ref, with_for_update=lock)
        else:
            query = select(WorkerSlotRow).where(WorkerSlotRow.name == ref)
            row = session.scalar(query.with_for_update() if lock else query)
        if row is None:
            raise self._not_found(session, ref)
        return row

    def create(self, slot: WorkerSlotCreate) -> WorkerSlot:
        """Save a new slot (status never_seen). Raises SlotExists when its name is taken."""
        now = _now()
        row = WorkerSlotRow(
            **slot.model_dump(mode="json", include=set(_SETTINGS)),
            status=SlotStatus.NEVER_SEEN.value,
            created_at=now,
            updated_at=now,
        )
        try:
            with self.store.transaction(f"saving worker slot {slot.name!r}") as s:
                taken = select(WorkerSlotRow.id).where(WorkerSlotRow.name == slot.name)
                if s.scalar(taken) is not None:
                    raise self._exists(slot.name)
                s.add(row)
                s.flush()
                saved = _slot(row)
        except StoreError as e:
            if isinstance(e.__cause__, IntegrityError):  # another request took the name meanwhile
                raise self._exists(slot.name) from e.__cause__
            raise
        log.info("worker slot %s saved (id %d)", saved.name, saved.id)
        return saved

    def list(self) -> list[WorkerSlot]:
        """Every slot, by name."""
        with self.store.transaction("listing worker slots") as s:
            rows = s.scalars(select(WorkerSlotRow).order_by(WorkerSlotRow.name)).all()
            return [_slot(row) for row in rows]

    def get(self, ref: int | str) -> WorkerSlot:
        """The slot with id ``ref`` (an int) or named ``ref`` (a str). Raises SlotNotFound naming
        ``ref`` and the saved slots."""
        with self.store.transaction(f"reading worker slot {ref!r}") as s:
            return _slot(self._row(s, ref))

    def update(self, slot_id: int, changes: WorkerSlotUpdate) -> WorkerSlot:
        """Change the fields set in ``changes`` (``exclude_unset``: a field given as null is set
        to null). Raises SlotNotFound, SlotExists when renamed to a taken name."""
        given = changes.model_dump(mode="json", exclude_unset=True)
        name = given.get("name")
        try:
            with self.store.transaction(f"updating worker slot {slot_id}") as s:
                row = self._row(s, slot_id, lock=True)
                if name is not None and name != row.name:
                    taken = select(WorkerSlotRow.id).where(WorkerSlotRow.name == name)
                    if s.scalar(taken) is not None:
                        raise self._exists(name)
                for field, value in given.items():
                    if field in ("name", "ssh_command", "install_dir", "python") and value is None:
                        continue  # required columns: null means "unchanged" for them
                    setattr(row, field, value)
                row.updated_at = _now()
                s.flush()
                return _slot(row)
        except StoreError as e:
            if isinstance(e.__cause__, IntegrityError) and name is not None:
                raise self._exists(name) from e.__cause__
            raise

    def delete(self, slot_id: int) -> None:
        """Delete the slot's row. Raises SlotNotFound."""
        with self.store.transaction(f"deleting worker slot {slot_id}") as s:
            s.delete(self._row(s, slot_id, lock=True))
        log.info("worker slot %d deleted", slot_id)

    def set_status(
        self, slot_id: int, status: SlotStatus, last_seen_at: datetime | None = None
    ) -> WorkerSlot:
        """Store ``status`` as the slot's last known one (and ``last_seen_at`` when given, an
        aware datetime). Raises SlotNotFound."""
        with self.store.transaction(f"updating worker slot {slot_id}") as s:
            row = self._row(s, slot_id, lock=True)
            row.status = status.value
            if last_seen_at is not None:
                row.last_seen_at = last_seen_at
            row.updated_at = _now()
            s.flush()
            return _slot(row)

    def set_worker(self, slot_id: int, worker_id: str | None) -> WorkerSlot:
        """Tie the slot to the worker ``worker_id`` (None: to none). Raises SlotNotFound."""
        with self.store.transaction(f"updating worker slot {slot_id}") as s:
            row = self._row(s, slot_id, lock=True)
            row.worker_id = worker_id
            row.updated_at = _now()
            s.flush()
            return _slot(row)

    def record_deploy(self, slot_id: int, report: DeployReport) -> WorkerSlot:
        """Save what a deploy or restore found.

        Success: status online, the report's worker id, ``deployed_at`` and last seen now, the
        last error cleared. Failure: status failed, the report's message, category and
        suggestion (the worker id is kept unless the report names one). Raises SlotNotFound.
        """
        now = _now()
        values: dict[str, Any]
        if report.success:
            values = {
                "status": SlotStatus.ONLINE.value,
                "error": None,
                "category": None,
                "suggestion": None,
                "deployed_at": now,
                "last_seen_at": now,
            }
        else:
            category = report.category or Category.UNKNOWN
            values = {
                "status": SlotStatus.FAILED.value,
                "error": report.message,
                "category": category.value,
                "suggestion": report.suggestion,
            }
        with self.store.transaction(f"recording a {report.action} of worker slot {slot_id}") as s:
            row = self._row(s, slot_id, lock=True)
            for field, value in values.items():
                setattr(row, field, value)
            if report.worker_id is not None:
                row.worker_id = report.worker_id
            row.updated_at = now
            s.flush()
            return _slot(row)
