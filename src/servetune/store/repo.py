"""The study repository: create and find studies, record trials from start to result, recover.

``StudyStore`` is synchronous and commits before each method returns; database errors surface
as ``StoreError`` (what was being done, where) and every missing study as ``StudyNotFound``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from servetune.core.spec import Problem, StudySpec, check_study_name, error_loc
from servetune.core.study import FailureKind, Params, Trial, TrialResult, TrialRole, TrialState
from servetune.errors import SpecInvalid, StoreError, StudyBusy, StudyExists, StudyNotFound
from servetune.store.db import (
    cannot_write,
    check_current,
    describe,
    make_engine,
    sqlite_file,
    upgrade,
)
from servetune.store.tables import StudyRow, TrialRow

log = logging.getLogger(__name__)

StudyStatus = Literal["running", "finished", "failed", "interrupted", "cancelled"]
"""Where a study stands: running, finished (verdict stored), failed (an error stopped it),
interrupted (the process stopped), cancelled (the user stopped it). Any may be resumed."""

STUDY_STATUSES: tuple[str, ...] = get_args(StudyStatus)

Executor = Literal["local", "manager"]
"""Who runs a study's trials: local (``servetune run`` in its own process) or manager (the
manager places them on workers over Redis, and resumes the study when it restarts)."""

EXECUTORS: tuple[str, ...] = get_args(Executor)


class StudyRecord(BaseModel):
    """A study as stored: identity, validated spec, status and, once finished, the verdict."""

    model_config = ConfigDict(frozen=True)

    id: int = Field(description="Database id.")
    name: str = Field(description="Unique name; `servetune resume NAME` finds the study by it.")
    spec: StudySpec = Field(description="The validated spec the study runs.")
    spec_source: dict[str, Any] = Field(
        default_factory=dict, description="The document as the user wrote it."
    )
    status: StudyStatus = Field(description="running, finished, failed, interrupted or cancelled.")
    created_at: AwareDatetime = Field(description="When the study was created (UTC).")
    finished_at: AwareDatetime | None = Field(
        default=None, description="When it last stopped (UTC); None while running."
    )
    verdict: dict[str, Any] | None = Field(
        default=None, description="Confirm/repeat summary stored at the end."
    )
    engine_kind: str = Field(description="The engine's kind, e.g. llamacpp.")
    lease: StudyLease | None = Field(
        default=None, description="Who owns the study now (live or lapsed); None when free."
    )
    executor: Executor = Field(
        default="local",
        description="Who runs its trials: local (servetune run) or manager (workers over Redis).",
    )


class LeaseOwner(BaseModel):
    """Who asks for a study's lease: one run of one process (a new ``owner_id`` per run)."""

    model_config = ConfigDict(frozen=True)

    owner_id: str = Field(min_length=1, max_length=64, description="Unique id of this run.")
    host: str = Field(max_length=255, description="Host name the owner runs on.")
    pid: int = Field(description="Process id of the owner on its host.")


class StudyLease(BaseModel):
    """A study's lease as stored: who holds it and until when (aware UTC datetimes).

    A lease whose ``expires_at`` has passed is free for anyone to take over; its holder stopped
    renewing it (killed, frozen, or cut off from the database).
    """

    model_config = ConfigDict(frozen=True)

    owner_id: str = Field(description="Id of the owning run.")
    host: str = Field(description="Host of the owner.")
    pid: int = Field(description="Process id of the owner on its host.")
    acquired_at: AwareDatetime = Field(description="When the owner took the lease (UTC).")
    renewed_at: AwareDatetime = Field(description="When the owner last renewed it (UTC).")
    expires_at: AwareDatetime = Field(description="When it lapses unless renewed (UTC).")

    def is_live(self, now: datetime | None = None) -> bool:
        """True while ``now`` (default: the current UTC time) is before ``expires_at``."""
        return (now or _now()) < self.expires_at

    def describe(self) -> str:
        """``pid 123 on host gpu-1 since … (expires …)`` for messages."""
        return (
            f"pid {self.pid} on host {self.host} since "
            f"{self.acquired_at.isoformat(timespec='seconds')} "
            f"(lease expires {self.expires_at.isoformat(timespec='seconds')} unless renewed)"
        )


def _lease(row: StudyRow) -> StudyLease | None:
    if row.lease_owner is None or row.lease_expires_at is None:
        return None
    return StudyLease(
        owner_id=row.lease_owner,
        host=row.lease_host or "?",
        pid=row.lease_pid or 0,
        acquired_at=row.lease_acquired_at or row.lease_expires_at,
        renewed_at=row.lease_renewed_at or row.lease_expires_at,
        expires_at=row.lease_expires_at,
    )


StudyRecord.model_rebuild()


class UnreadableStudy(BaseModel):
    """A stored study this servetune cannot read (e.g. its spec was written by a newer version)."""

    model_config = ConfigDict(frozen=True)

    id: int = Field(description="Database id.")
    name: str = Field(description="The study's name.")
    status: str = Field(description="The status column as stored.")
    engine_kind: str = Field(description="The engine column as stored.")
    created_at: AwareDatetime = Field(description="When the study was created (UTC).")
    reason: str = Field(description="Why it cannot be read, e.g. the unknown field.")


def _rowcount(result: Any) -> int:
    """Rows matched by an UPDATE (``CursorResult.rowcount``; ``Session.execute`` types it as
    a plain Result)."""
    return int(result.rowcount)


def _now() -> datetime:
    return datetime.now(UTC)


def _short_reason(e: ValidationError, limit: int = 3) -> str:
    """The first ``limit`` problems of a validation error on one line: ``loc: message``."""
    parts = [
        f"{'.'.join(str(x) for x in error_loc(err)) or '(root)'}: {err['msg']}"
        for err in e.errors(include_url=False)[:limit]
    ]
    more = e.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _unreadable(row: StudyRow, e: ValidationError) -> UnreadableStudy:
    return UnreadableStudy(
        id=row.id,
        name=row.name,
        status=row.status,
        engine_kind=row.engine_kind,
        created_at=row.created_at,
        reason=f"written by another servetune version or damaged ({_short_reason(e)})",
    )


def _study_record(row: StudyRow) -> StudyRecord:
    return StudyRecord(
        id=row.id,
        name=row.name,
        spec=StudySpec.model_validate(row.spec),
        spec_source=row.spec_source,
        status=row.status,  # validated by pydantic
        created_at=row.created_at,
        finished_at=row.finished_at,
        verdict=row.verdict,
        engine_kind=row.engine_kind,
        lease=_lease(row),
        executor=row.executor,  # validated by pydantic
    )


def _trial(row: TrialRow) -> Trial:
    return Trial(
        id=row.id,
        study_id=row.study_id,
        number=row.number,
        role=TrialRole(row.role),
        params=row.params,
        state=TrialState(row.state),
        result=TrialResult.model_validate(row.result) if row.result is not None else None,
        repeat_of=row.repeat_of,
        created_at=row.created_at,
    )


def _apply_result(row: TrialRow, result: TrialResult) -> None:
    """Copy ``result`` into ``row``: the JSON and the scalar columns kept for queries."""
    row.state = result.state.value
    row.failure_kind = result.failure_kind.value if result.failure_kind else None
    row.feasible = result.feasible
    row.objective_value = result.objective_values[0] if result.objective_values else None
    row.result = result.model_dump(mode="json")
    row.finished_at = result.finished_at or _now()
    if row.started_at is None:
        row.started_at = result.started_at


class StudyStore:
    """Studies and trials in a SQL database (SQLite file or PostgreSQL), schema kept by Alembic.

    ``StudyStore(url)`` opens the database (``sqlite:///path``, ``postgresql://user@host/db``)
    and upgrades its schema to the newest migration; opening is idempotent and safe from several
    processes at once. Each method is one short transaction, committed (durable) on return,
    and may be called from any thread. Raises StoreError when the database cannot be opened.
    ``read_only=True`` is for callers that only read (``list``, ``show``, ``export``,
    ``report``): a SQLite file this process cannot write (read-only mount, permissions) is then
    opened read-only without a schema upgrade; StoreError says so when its schema is not current.
    Use as a context manager, or call ``close()``, to release connections.
    """

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        file = sqlite_file(url)
        self.read_only = read_only and file is not None and cannot_write(file)
        """True when the database was opened read-only (only reads work)."""
        self._engine = make_engine(url, read_only=self.read_only)
        self.url = make_url(url).render_as_string(hide_password=True)
        """The database URL as given, password hidden (for messages)."""
        try:
            if self.read_only:
                check_current(self._engine)
            else:
                upgrade(self._engine)
        except BaseException:
            self._engine.dispose()
            raise
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._fences: dict[int, str] = {}
        log.debug("store open%s: %s", " read-only" if self.read_only else "", self.url)

    def close(self) -> None:
        """Close every pooled connection; the store can no longer be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> StudyStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _tx(self, doing: str) -> Iterator[Session]:
        """One committed transaction; SQLAlchemy and stale-record errors become StoreError."""
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as e:
            raise StoreError(f"{doing} in {self.url}: {describe(e)}") from e
        except ValidationError as e:
            raise StoreError(
                f"{doing} in {self.url}: a stored record does not match this servetune version: {e}"
            ) from e

    def transaction(self, doing: str) -> AbstractContextManager[Session]:
        """One committed transaction on the store's database, for the other repositories that
        share its connections (``store/slots.py``); ``doing`` names it in the StoreError raised
        when the database fails."""
        return self._tx(doing)

    def _study_row(self, session: Session, study_id: int) -> StudyRow:
        row = session.get(StudyRow, study_id)
        if row is None:
            raise self._not_found(session, study_id)
        return row

    def _owned_row(self, session: Session, study_id: int) -> StudyRow:
        """The study's row, locked for this transaction, after checking the fence (``fence``)."""
        row = session.get(StudyRow, study_id, with_for_update=True)
        if row is None:
            raise self._not_found(session, study_id)
        owner = self._fences.get(study_id)
        if owner is not None and row.lease_owner != owner:
            lease = _lease(row)
            raise StudyBusy(
                f"study {row.name}: this process lost its lease, so it writes nothing more; now "
                f"held by {lease.describe() if lease else 'nobody'}"
            )
        return row

    def fence(self, study_id: int, owner_id: str | None) -> None:
        """Make writes to the study through this store need ``owner_id``'s lease (None: stop).

        While fenced, every write (study status, new trials, trial processes and results,
        interrupting) first checks, in its own transaction and with the study row locked,
        that ``owner_id`` still holds the study's lease, and raises StudyBusy when another
        process took it over: a process that lost its lease cannot interleave trials or
        write a second verdict.
        """
        if owner_id is None:
            self._fences.pop(study_id, None)
        else:
            self._fences[study_id] = owner_id

    def _not_found(self, session: Session, ref: str | int) -> StudyNotFound:
        names = session.scalars(select(StudyRow.name).order_by(StudyRow.id.desc()).limit(10)).all()
        if names:
            hint = "recent studies: " + ", ".join(names)
        else:
            hint = "there are no studies yet; start one with `servetune run spec.yaml`"
        return StudyNotFound(f"no study {ref!r} in {self.url}; {hint}")

    # ---- studies -------------------------------------------------------------------------
    def create_study(
        self,
        name: str,
        spec: StudySpec,
        spec_source: dict[str, Any],
        executor: Executor = "local",
    ) -> StudyRecord:
        """Store a new study named ``name`` with status running.

        ``spec_source`` is the document the user wrote (kept for export); ``executor`` says who
        runs its trials ("local" or "manager"). Raises StudyExists when the name is taken (the
        message suggests ``servetune resume NAME``), SpecInvalid for a name breaking
        ``check_study_name`` (the one rule for study names), ValueError for an unknown
        executor, StoreError otherwise.
        """
        if executor not in EXECUTORS:
            raise ValueError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
        try:
            check_study_name(name)
        except ValueError as e:
            raise SpecInvalid([Problem("name", str(e))]) from None
        exists = StudyExists(
            f"a study named {name!r} already exists in {self.url}; continue it with "
            f"`servetune resume {name}`, or choose another name"
        )
        row = StudyRow(
            name=name,
            engine_kind=spec.engine.kind,
            status="running",
            spec=spec.model_dump(mode="json"),
            spec_source=spec_source,
            verdict=None,
            created_at=_now(),
            finished_at=None,
            executor=executor,
        )
        try:
            with self._tx(f"creating study {name!r}") as s:
                if s.scalar(select(StudyRow.id).where(StudyRow.name == name)) is not None:
                    raise exists
                s.add(row)
                s.flush()
                record = _study_record(row)
        except StoreError as e:
            if isinstance(e.__cause__, IntegrityError):  # another process took the name meanwhile
                raise exists from e.__cause__
            raise
        log.info("study %s created (id %d)", name, record.id)
        return record

    def get_study(self, ref: str | int) -> StudyRecord:
        """The study with id ``ref`` (an int or an all-digit string), else named ``ref``.

        Raises StudyNotFound naming ``ref`` and listing recent studies.
        """
        with self._tx(f"reading study {ref!r}") as s:
            if isinstance(ref, int) or ref.strip().isdigit():
                row = s.get(StudyRow, int(ref))
            else:
                row = s.scalar(select(StudyRow).where(StudyRow.name == ref))
            if row is None:
                raise self._not_found(s, ref)
            try:
                return _study_record(row)
            except ValidationError as e:
                raise StoreError(
                    f"study {row.name} (id {row.id}) in {self.url} cannot be read by this "
                    f"servetune: {_unreadable(row, e).reason}; upgrade servetune to read it"
                ) from e

    def list_studies(self, limit: int = 50) -> list[StudyRecord | UnreadableStudy]:
        """Up to ``limit`` studies, newest first.

        A study this servetune cannot read (its spec written by a newer version, a damaged
        row) comes back as an ``UnreadableStudy`` with the reason, so one bad row never hides
        the others.
        """
        with self._tx("listing studies") as s:
            rows = s.scalars(select(StudyRow).order_by(StudyRow.id.desc()).limit(limit)).all()
            found: list[StudyRecord | UnreadableStudy] = []
            for r in rows:
                try:
                    found.append(_study_record(r))
                except ValidationError as e:
                    log.info("study %s (id %d) is unreadable: %s", r.name, r.id, e)
                    found.append(_unreadable(r, e))
            return found

    def latest_study(self) -> StudyRecord | None:
        """The newest study this servetune can read, or None when there is none."""
        for study in self.list_studies(limit=20):
            if isinstance(study, StudyRecord):
                return study
        return None

    def set_study_status(
        self, study_id: int, status: StudyStatus, verdict: dict[str, Any] | None = None
    ) -> None:
        """Set the status; ``finished_at`` becomes now (or None for running).

        ``verdict`` replaces the stored one when given; None keeps it. Raises ValueError for an
        unknown status, StudyNotFound for an unknown study.
        """
        if status not in STUDY_STATUSES:
            raise ValueError(
                f"unknown study status {status!r}; use one of {', '.join(STUDY_STATUSES)}"
            )
        with self._tx(f"setting study {study_id} to {status}") as s:
            row = self._owned_row(s, study_id)
            row.status = status
            row.finished_at = None if status == "running" else _now()
            if verdict is not None:
                row.verdict = verdict
        log.debug("study %d: status %s", study_id, status)

    # ---- ownership (lease) ---------------------------------------------------------------
    def acquire_lease(
        self,
        study_id: int,
        owner: LeaseOwner,
        ttl_s: float,
        *,
        take_over: str | None = None,
    ) -> StudyLease:
        """Take the study's lease for ``owner`` for ``ttl_s`` seconds; the lease taken.

        One conditional ``UPDATE … WHERE`` the lease is free, expired, already ``owner``'s, or
        held by the run ``take_over`` (a holder the caller proved dead, e.g. a gone pid on this
        host), checked by its row count: atomic on SQLite (``BEGIN IMMEDIATE``) and PostgreSQL
        (the row lock; the WHERE is re-checked after a concurrent update commits), so of two
        processes racing for a study exactly one wins. Raises StudyBusy naming the live
        holder (host, pid, since, expiry), StudyNotFound for an unknown study.
        """
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, not {ttl_s}")
        now = _now()
        free = or_(
            StudyRow.lease_owner.is_(None),
            StudyRow.lease_expires_at.is_(None),
            StudyRow.lease_expires_at <= now,
            StudyRow.lease_owner == owner.owner_id,
        )
        if take_over is not None:
            free = or_(free, StudyRow.lease_owner == take_over)
        with self._tx(f"taking the lease of study {study_id}") as s:
            taken = s.execute(
                update(StudyRow)
                .where(StudyRow.id == study_id, free)
                .values(
                    lease_owner=owner.owner_id,
                    lease_host=owner.host,
                    lease_pid=owner.pid,
                    lease_acquired_at=now,
                    lease_renewed_at=now,
                    lease_expires_at=now + timedelta(seconds=ttl_s),
                )
                .execution_options(synchronize_session=False)
            )
            row = self._study_row(s, study_id)
            s.refresh(row)
            lease = _lease(row)
            if _rowcount(taken) != 1 or lease is None:
                raise StudyBusy(
                    f"study {row.name} is being run by another process: "
                    f"{lease.describe() if lease else 'unknown holder'}; wait for it to end, or "
                    "stop it and `servetune resume` it (a killed owner's lease lapses by itself)"
                )
        log.info("study %d: lease taken by %s", study_id, lease.describe())
        return lease

    def renew_lease(self, study_id: int, owner_id: str, ttl_s: float) -> StudyLease:
        """Extend ``owner_id``'s lease to now + ``ttl_s``; the renewed lease.

        Raises StudyBusy when ``owner_id`` no longer holds it (it lapsed and another process
        took the study over): the caller must stop running the study.
        """
        now = _now()
        with self._tx(f"renewing the lease of study {study_id}") as s:
            renewed = s.execute(
                update(StudyRow)
                .where(StudyRow.id == study_id, StudyRow.lease_owner == owner_id)
                .values(lease_renewed_at=now, lease_expires_at=now + timedelta(seconds=ttl_s))
                .execution_options(synchronize_session=False)
            )
            row = self._study_row(s, study_id)
            s.refresh(row)
            lease = _lease(row)
            if _rowcount(renewed) != 1 or lease is None:
                raise StudyBusy(
                    f"study {row.name}: this process lost its lease; now held by "
                    f"{lease.describe() if lease else 'nobody'}"
                )
            return lease

    def release_lease(self, study_id: int, owner_id: str) -> bool:
        """Free the lease if ``owner_id`` holds it; True when it did (idempotent)."""
        with self._tx(f"releasing the lease of study {study_id}") as s:
            released = s.execute(
                update(StudyRow)
                .where(StudyRow.id == study_id, StudyRow.lease_owner == owner_id)
                .values(
                    lease_owner=None,
                    lease_host=None,
                    lease_pid=None,
                    lease_acquired_at=None,
                    lease_renewed_at=None,
                    lease_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )
            return bool(_rowcount(released) == 1)

    def lease_holder(self, study_id: int) -> StudyLease | None:
        """The stored lease (live or expired; see ``StudyLease.is_live``), None when free."""
        with self._tx(f"reading the lease of study {study_id}") as s:
            return _lease(self._study_row(s, study_id))

    # ---- trials --------------------------------------------------------------------------
    def add_trial(
        self,
        study_id: int,
        number: int,
        role: TrialRole,
        params: Params,
        repeat_of: int | None = None,
    ) -> Trial:
        """Insert trial ``number`` of the study as RUNNING (created and started now).

        Raises StudyNotFound for an unknown study, StoreError when the number is taken.
        """
        now = _now()
        row = TrialRow(
            study_id=study_id,
            number=number,
            role=TrialRole(role).value,
            params=dict(params),
            repeat_of=repeat_of,
            state=TrialState.RUNNING.value,
            failure_kind=None,
            feasible=False,
            objective_value=None,
            result=None,
            created_at=now,
            started_at=now,
        )
        doing = f"adding trial {number} to study {study_id}"
        try:
            with self._tx(doing) as s:
                self._owned_row(s, study_id)
                s.add(row)
                s.flush()
                trial = _trial(row)
        except StoreError as e:
            if isinstance(e.__cause__, IntegrityError):
                raise StoreError(
                    f"{doing}: the study already has a trial {number}; take next_trial_number()"
                ) from e.__cause__
            raise
        return trial

    def set_trial_process(self, trial_id: int, pid: int, pgid: int) -> None:
        """Remember the engine process (id and group) of a RUNNING trial, so a resume can kill it.

        Raises StoreError for an unknown trial.
        """
        with self._tx(f"recording the engine process of trial id {trial_id}") as s:
            row = s.get(TrialRow, trial_id)
            if row is None:
                raise StoreError(f"no trial with id {trial_id} in {self.url}")
            self._owned_row(s, row.study_id)
            row.pid = pid
            row.pgid = pgid

    def finish_trial(self, trial_id: int, result: TrialResult) -> Trial:
        """Store the result of a trial in one transaction, committed on return; the saved Trial.

        Sets state, failure kind, feasible, first objective value, the result JSON and
        ``finished_at`` (``result.finished_at``, else now). Idempotent: a trial that is already
        finished keeps its stored outcome, which is returned unchanged (a redelivered or late
        result never overwrites or duplicates; logged at INFO). Raises ValueError when
        ``result.state`` is not a finished state, StoreError for an unknown trial or a database
        failure.
        """
        if not result.state.is_finished():
            raise ValueError(
                f"a trial finishes as COMPLETE, PRUNED or FAIL, not {result.state.value}"
            )
        with self._tx(f"saving the result of trial id {trial_id}") as s:
            row = s.get(TrialRow, trial_id)
            if row is None:
                raise StoreError(f"no trial with id {trial_id} in {self.url}")
            self._owned_row(s, row.study_id)
            if TrialState(row.state).is_finished():
                same = row.result == result.model_dump(mode="json")  # e.g. stored by an ingester
                log.log(
                    logging.DEBUG if same else logging.INFO,
                    "trial %d of study %d is already %s; keeping that outcome, not the new %s",
                    row.number,
                    row.study_id,
                    row.state,
                    result.state.value,
                )
                return _trial(row)
            _apply_result(row, result)
            s.flush()
            return _trial(row)

    def replace_synthesized_result(self, trial_id: int, result: TrialResult) -> Trial | None:
        """Replace an outcome the manager made up with ``result``, measured by a worker.

        Only a stored FAIL whose result has ``synthesized=True`` (the manager's FAIL
        ``worker_lost``: no worker measured it) is replaced, in one transaction under the same
        lease fence as ``finish_trial``; the saved Trial is returned. Anything else stored (a
        real result, a cancel, a trial still RUNNING) is kept and None is returned. Raises
        ValueError when ``result`` is not finished or is itself synthesized, StoreError for an
        unknown trial or a database failure, StudyBusy when fenced and the lease was lost.
        """
        if not result.state.is_finished():
            raise ValueError(
                f"a trial finishes as COMPLETE, PRUNED or FAIL, not {result.state.value}"
            )
        if result.synthesized:
            raise ValueError("only a measured result (synthesized=False) replaces a made-up one")
        with self._tx(f"replacing the made-up result of trial id {trial_id}") as s:
            row = s.get(TrialRow, trial_id)
            if row is None:
                raise StoreError(f"no trial with id {trial_id} in {self.url}")
            self._owned_row(s, row.study_id)
            stored = TrialResult.model_validate(row.result) if row.result is not None else None
            if (
                TrialState(row.state) is not TrialState.FAIL
                or stored is None
                or not stored.synthesized
            ):
                return None
            _apply_result(row, result)
            s.flush()
            return _trial(row)

    def find_trial(self, trial_id: int) -> Trial | None:
        """The trial with database id ``trial_id`` (its ``study_id`` says whose), or None when
        there is none (never created, or its study was deleted). Raises StoreError."""
        with self._tx(f"reading trial id {trial_id}") as s:
            row = s.get(TrialRow, trial_id)
            return None if row is None else _trial(row)

    def trials(self, study_id: int) -> list[Trial]:
        """Every trial of the study, by number. Raises StudyNotFound for an unknown study."""
        with self._tx(f"reading the trials of study {study_id}") as s:
            self._study_row(s, study_id)
            rows = s.scalars(
                select(TrialRow).where(TrialRow.study_id == study_id).order_by(TrialRow.number)
            )
            return [_trial(r) for r in rows]

    def trial_processes(self, study_id: int) -> list[tuple[int, int, int]]:
        """``(trial number, pid, pgid)`` of each RUNNING trial whose engine process was recorded."""
        with self._tx(f"reading the engine processes of study {study_id}") as s:
            self._study_row(s, study_id)
            rows = s.execute(
                select(TrialRow.number, TrialRow.pid, TrialRow.pgid)
                .where(
                    TrialRow.study_id == study_id,
                    TrialRow.state == TrialState.RUNNING.value,
                    TrialRow.pid.is_not(None),
                    TrialRow.pgid.is_not(None),
                )
                .order_by(TrialRow.number)
            ).all()
            return [(n, pid, pgid) for n, pid, pgid in rows if pid is not None and pgid is not None]

    def interrupt_running(
        self, study_id: int, reason: str, keep: Collection[int] = ()
    ) -> list[Trial]:
        """Mark every RUNNING trial of the study FAIL (interrupted) with ``reason``; those trials.

        Used on resume, after the engines they left were killed. Finished trials are untouched,
        and so are the RUNNING trials whose ids are in ``keep`` (still running elsewhere, e.g.
        on a worker, and adopted by the loop).
        """
        with self._tx(f"marking the running trials of study {study_id} interrupted") as s:
            self._owned_row(s, study_id)
            rows = s.scalars(
                select(TrialRow)
                .where(TrialRow.study_id == study_id, TrialRow.state == TrialState.RUNNING.value)
                .order_by(TrialRow.number)
            ).all()
            kept = set(keep)
            rows = [r for r in rows if r.id not in kept]
            now = _now()
            for row in rows:
                _apply_result(
                    row,
                    TrialResult(
                        state=TrialState.FAIL,
                        failure_kind=FailureKind.INTERRUPTED,
                        failure_reason=reason,
                        started_at=row.started_at,
                        finished_at=now,
                    ),
                )
            s.flush()
            return [_trial(r) for r in rows]

    def next_trial_number(self, study_id: int) -> int:
        """One past the highest trial number of the study (0 when it has none)."""
        with self._tx(f"numbering the next trial of study {study_id}") as s:
            self._study_row(s, study_id)
            top = s.scalar(select(func.max(TrialRow.number)).where(TrialRow.study_id == study_id))
            return 0 if top is None else top + 1

    # ---- the fleet (manager API) ---------------------------------------------------------
    def list_trials(self, study_id: int) -> list[Trial]:
        """Every trial of the study, by number (the same as ``trials``).

        Raises StudyNotFound for an unknown study.
        """
        return self.trials(study_id)

    def set_trial_worker(self, trial_id: int, worker_id: str) -> None:
        """Record that worker ``worker_id`` runs (or ran) the trial with id ``trial_id``.

        A trial placed again on another worker keeps the last one. Raises ValueError for an
        empty worker id, StoreError for an unknown trial, StudyBusy when this store is fenced
        for the study and lost its lease.
        """
        if not worker_id or len(worker_id) > 64:
            raise ValueError(f"worker_id must have 1 to 64 characters, not {worker_id!r}")
        with self._tx(f"recording the worker of trial id {trial_id}") as s:
            row = s.get(TrialRow, trial_id)
            if row is None:
                raise StoreError(f"no trial with id {trial_id} in {self.url}")
            self._owned_row(s, row.study_id)
            row.worker_id = worker_id

    def trial_workers(self, study_id: int) -> dict[int, str]:
        """``{trial id: worker id}`` for the study's trials that ran on a worker.

        Trials run in the study's own process are absent. Raises StudyNotFound for an unknown
        study.
        """
        with self._tx(f"reading the workers of study {study_id}") as s:
            self._study_row(s, study_id)
            rows = s.execute(
                select(TrialRow.id, TrialRow.worker_id).where(
                    TrialRow.study_id == study_id, TrialRow.worker_id.is_not(None)
                )
            ).all()
            return {tid: wid for tid, wid in rows if wid is not None}

    def delete_study(self, study_id: int) -> None:
        """Delete the study and all its trials, in one transaction.

        Raises StudyBusy when a live lease is held on it (a process is running it: cancel it
        first, or wait for the lease to lapse), StudyNotFound for an unknown study.
        """
        with self._tx(f"deleting study {study_id}") as s:
            row = s.get(StudyRow, study_id, with_for_update=True)
            if row is None:
                raise self._not_found(s, study_id)
            lease = _lease(row)
            if lease is not None and lease.is_live():
                raise StudyBusy(
                    f"study {row.name} is being run by {lease.describe()}; cancel it first, "
                    "then delete it"
                )
            s.execute(delete(TrialRow).where(TrialRow.study_id == study_id))
            s.delete(row)
            name = row.name
        self._fences.pop(study_id, None)
        log.info("study %s (id %d) deleted", name, study_id)
