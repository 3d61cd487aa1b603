"""The study repository: create and find studies, record trials from start to result, recover.

``StudyStore`` is synchronous and commits before each method returns; database errors surface
as ``StoreError`` (what was being done, where) and every missing study as ``StudyNotFound``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from servetune.core.spec import Problem, StudySpec
from servetune.core.study import FailureKind, Params, Trial, TrialResult, TrialRole, TrialState
from servetune.errors import SpecInvalid, StoreError, StudyExists, StudyNotFound
from servetune.store.db import describe, make_engine, upgrade
from servetune.store.tables import STUDY_NAME_MAX, StudyRow, TrialRow

log = logging.getLogger(__name__)

StudyStatus = Literal["running", "finished", "failed", "interrupted", "cancelled"]
"""Where a study stands: running, finished (verdict stored), failed (an error stopped it),
interrupted (the process stopped), cancelled (the user stopped it). Any may be resumed."""

STUDY_STATUSES: tuple[str, ...] = get_args(StudyStatus)


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


def _now() -> datetime:
    return datetime.now(UTC)


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
    Use as a context manager, or call ``close()``, to release connections.
    """

    def __init__(self, url: str) -> None:
        self._engine = make_engine(url)
        self.url = make_url(url).render_as_string(hide_password=True)
        """The database URL as given, password hidden (for messages)."""
        try:
            upgrade(self._engine)
        except BaseException:
            self._engine.dispose()
            raise
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        log.debug("store open: %s", self.url)

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

    def _study_row(self, session: Session, study_id: int) -> StudyRow:
        row = session.get(StudyRow, study_id)
        if row is None:
            raise self._not_found(session, study_id)
        return row

    def _not_found(self, session: Session, ref: str | int) -> StudyNotFound:
        names = session.scalars(select(StudyRow.name).order_by(StudyRow.id.desc()).limit(10)).all()
        if names:
            hint = "recent studies: " + ", ".join(names)
        else:
            hint = "there are no studies yet; start one with `servetune run spec.yaml`"
        return StudyNotFound(f"no study {ref!r} in {self.url}; {hint}")

    # ---- studies -------------------------------------------------------------------------
    def create_study(self, name: str, spec: StudySpec, spec_source: dict[str, Any]) -> StudyRecord:
        """Store a new study named ``name`` with status running.

        ``spec_source`` is the document the user wrote (kept for export). Raises StudyExists
        when the name is taken (the message suggests ``servetune resume NAME``), SpecInvalid
        for an empty, all-digit (it would read as an id) or over-long name, StoreError otherwise.
        """
        if not name.strip() or name.strip().isdigit() or len(name) > STUDY_NAME_MAX:
            raise SpecInvalid(
                [
                    Problem(
                        "name",
                        f"study name {name!r} must be 1 to {STUDY_NAME_MAX} characters and not all digits",
                    )
                ]
            )
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
            return _study_record(row)

    def list_studies(self, limit: int = 50) -> list[StudyRecord]:
        """Up to ``limit`` studies, newest first."""
        with self._tx("listing studies") as s:
            rows = s.scalars(select(StudyRow).order_by(StudyRow.id.desc()).limit(limit)).all()
            return [_study_record(r) for r in rows]

    def latest_study(self) -> StudyRecord | None:
        """The newest study, or None when there is none."""
        studies = self.list_studies(limit=1)
        return studies[0] if studies else None

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
            row = self._study_row(s, study_id)
            row.status = status
            row.finished_at = None if status == "running" else _now()
            if verdict is not None:
                row.verdict = verdict
        log.debug("study %d: status %s", study_id, status)

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
                self._study_row(s, study_id)
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
            row.pid = pid
            row.pgid = pgid

    def finish_trial(self, trial_id: int, result: TrialResult) -> Trial:
        """Store the result of a trial in one transaction, committed on return; the saved Trial.

        Sets state, failure kind, feasible, first objective value, the result JSON and
        ``finished_at`` (``result.finished_at``, else now). Finishing an already finished trial
        replaces its result (ingestion is idempotent). Raises ValueError when ``result.state``
        is not a finished state, StoreError for an unknown trial or a database failure.
        """
        if not result.state.is_finished():
            raise ValueError(
                f"a trial finishes as COMPLETE, PRUNED or FAIL, not {result.state.value}"
            )
        with self._tx(f"saving the result of trial id {trial_id}") as s:
            row = s.get(TrialRow, trial_id)
            if row is None:
                raise StoreError(f"no trial with id {trial_id} in {self.url}")
            if row.state != TrialState.RUNNING.value:
                log.warning(
                    "trial %d of study %d was already %s; replacing its result",
                    row.number,
                    row.study_id,
                    row.state,
                )
            _apply_result(row, result)
            s.flush()
            return _trial(row)

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

    def interrupt_running(self, study_id: int, reason: str) -> list[Trial]:
        """Mark every RUNNING trial of the study FAIL (interrupted) with ``reason``; those trials.

        Used on resume, after the engines they left were killed. Finished trials are untouched.
        """
        with self._tx(f"marking the running trials of study {study_id} interrupted") as s:
            self._study_row(s, study_id)
            rows = s.scalars(
                select(TrialRow)
                .where(TrialRow.study_id == study_id, TrialRow.state == TrialState.RUNNING.value)
                .order_by(TrialRow.number)
            ).all()
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
