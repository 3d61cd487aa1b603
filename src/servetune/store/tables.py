"""SQLAlchemy 2 tables of the store: one row per study, one per trial, one per worker slot.

The pydantic records (StudySpec, TrialResult) are stored whole as JSON; the scalar columns beside
them (status, state, failure kind, feasible, first objective value) are copies for cheap queries.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Constraint names, fixed so Alembic migrations name the same things on every database."""

STUDY_NAME_MAX = 200
"""Longest study name the ``studies.name`` column holds."""


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime in, an aware UTC datetime out, on every database.

    PostgreSQL stores ``timestamptz``; SQLite keeps no zone, so the value is stored as UTC wall
    time and UTC is attached again on load. Binding a naive datetime raises ValueError (wrapped
    by SQLAlchemy in a StatementError): the store never guesses a zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC; drop the zone on SQLite, which cannot store it."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given to the store; use UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach UTC to a naive value (SQLite), convert an aware one (PostgreSQL) to UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Base of the store's tables; Alembic compares ``Base.metadata`` to the database."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: UtcDateTime}


class StudyRow(Base):
    """One study: its validated spec (JSON), the document it came from, status and verdict."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(STUDY_NAME_MAX), unique=True)
    engine_kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(comment="StudySpec.model_dump(mode='json')")
    spec_source: Mapped[dict[str, Any]] = mapped_column(comment="The document the user wrote")
    verdict: Mapped[dict[str, Any] | None] = mapped_column(
        comment="Confirm/repeat summary at the end"
    )
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(
        String(64), comment="Id of the process run that owns the study now (null = free)"
    )
    lease_host: Mapped[str | None] = mapped_column(String(255), comment="Host of the lease owner")
    lease_pid: Mapped[int | None] = mapped_column(Integer, comment="Process id of the lease owner")
    lease_acquired_at: Mapped[datetime | None]
    lease_renewed_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        comment="The lease is free for anyone to take after this (UTC)"
    )
    executor: Mapped[str] = mapped_column(
        String(16),
        default="local",
        server_default="local",
        comment="Who runs its trials: local (servetune run) or manager (workers over Redis)",
    )


class TrialRow(Base):
    """One trial: params, lifecycle, engine process, and its TrialResult (JSON) once finished."""

    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("study_id", "number"),
        Index("ix_trials_study_id_state", "study_id", "state"),
        Index(
            "ix_trials_study_id_feasible_objective_value", "study_id", "feasible", "objective_value"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]]
    repeat_of: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    failure_kind: Mapped[str | None] = mapped_column(String(32), index=True)
    feasible: Mapped[bool] = mapped_column(Boolean, default=False)
    objective_value: Mapped[float | None] = mapped_column(
        Float, comment="First objective term's value (a copy of result.objective_values[0])"
    )
    result: Mapped[dict[str, Any] | None] = mapped_column(
        comment="TrialResult.model_dump(mode='json')"
    )
    pid: Mapped[int | None] = mapped_column(Integer, comment="Engine process id while RUNNING")
    pgid: Mapped[int | None] = mapped_column(
        Integer, comment="Engine process group id while RUNNING"
    )
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    worker_id: Mapped[str | None] = mapped_column(
        String(64), comment="Worker that ran the trial (null: run in the study's own process)"
    )


SLOT_NAME_MAX = 63
"""Longest worker slot name (``remote.models.SLOT_NAME_PATTERN``)."""


class WorkerSlotRow(Base):
    """One worker slot: a saved SSH target (no secret: no password, Redis as host:port only) and
    what its last deploy or restore found."""

    __tablename__ = "worker_slots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(SLOT_NAME_MAX), unique=True)
    ssh_command: Mapped[str] = mapped_column(
        String(2000), comment="The ssh command as the user typed it (parsed, never run by a shell)"
    )
    install_dir: Mapped[str] = mapped_column(String(1024))
    python: Mapped[str] = mapped_column(String(255))
    redis_via: Mapped[str] = mapped_column(String(16), comment="forward, reverse or direct")
    manager_ssh: Mapped[str | None] = mapped_column(String(300))
    redis_address: Mapped[str | None] = mapped_column(
        String(300), comment="host:port of Redis as the worker sees it (direct only; no password)"
    )
    max_parallel: Mapped[int] = mapped_column(Integer)
    offline: Mapped[str] = mapped_column(String(16), comment="auto, always or never")
    status: Mapped[str] = mapped_column(
        String(16), comment="Last known status (reads reconcile it with the worker registry)"
    )
    worker_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text, comment="Last deploy/restore failure")
    category: Mapped[str | None] = mapped_column(String(32))
    suggestion: Mapped[str | None] = mapped_column(Text)
    last_seen_at: Mapped[datetime | None]
    deployed_at: Mapped[datetime | None] = mapped_column(comment="Last successful deploy/restore")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
