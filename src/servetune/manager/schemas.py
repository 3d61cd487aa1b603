"""The manager API's request and response bodies (pydantic; every field described).

They are the API's schema of record: /openapi.json, the web UI and `servetune submit` read them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from servetune.cluster.models import GpuSample, Heartbeat, LogRecord, WorkerInfo, check_alias
from servetune.core.spec import Problem, StudySpec
from servetune.core.study import Trial
from servetune.remote.models import OfflineMode, WorkerSlot
from servetune.store.repo import Executor, StudyRecord, StudyStatus, UnreadableStudy


class StudyCreate(BaseModel):
    """A new study for the manager to run: its spec (an object, or YAML/JSON text) and a name."""

    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] | None = Field(
        default=None, description="The study spec as a JSON object (as `servetune schema` shows)."
    )
    spec_yaml: str | None = Field(
        default=None,
        max_length=4 * 1024 * 1024,
        description="The study spec as YAML or JSON text (the contents of a spec file).",
    )
    name: str | None = Field(
        default=None,
        description="Study name (default: the spec's name, else one made from the engine and "
        "the time).",
    )


class ProblemPublic(BaseModel):
    """One thing wrong with a request, as `servetune validate` reports it."""

    field: str = Field(description="Dotted path of the field, e.g. workload.concurrency.")
    message: str = Field(description="What is wrong.")
    fix: str | None = Field(default=None, description="How to fix it, when the message says so.")

    @classmethod
    def of(cls, p: Problem) -> ProblemPublic:
        """Split a core Problem's message at its first ``; `` into message and fix."""
        message, sep, fix = p.message.partition("; ")
        return cls(field=p.loc, message=message, fix=fix if sep else None)

    def text(self) -> str:
        """The message as `servetune validate` prints it (message and fix joined again)."""
        return self.message if self.fix is None else f"{self.message}; {self.fix}"


class ProblemsBody(BaseModel):
    """A 422 answer: every problem of the request at once."""

    detail: str = Field(description="Summary, e.g. 'the spec has 2 problem(s)'.")
    problems: list[ProblemPublic] = Field(description="Every problem, each with field and fix.")


class ErrorBody(BaseModel):
    """An error answer (404, 409, 401, 503): what went wrong and what to do."""

    detail: str = Field(description="What went wrong and what to do about it.")


class StudyPublic(BaseModel):
    """A study as the API shows it."""

    id: int = Field(description="Database id.")
    name: str = Field(description="Unique name.")
    status: StudyStatus = Field(description="running, finished, failed, interrupted or cancelled.")
    executor: Executor = Field(description="local (servetune run) or manager (workers).")
    engine_kind: str = Field(description="The engine's kind, e.g. llamacpp.")
    created_at: AwareDatetime = Field(description="When it was created (UTC).")
    finished_at: AwareDatetime | None = Field(
        default=None, description="When it last stopped (UTC); null while running."
    )
    running_here: bool = Field(description="True while this manager runs its loop.")
    verdict: dict[str, Any] | None = Field(
        default=None, description="Confirm/repeat summary once finished."
    )
    spec: StudySpec = Field(description="The validated spec it runs.")

    @classmethod
    def of(cls, record: StudyRecord, running: set[int]) -> StudyPublic:
        """The public view of a stored study; ``running``: ids this manager runs now."""
        return cls(
            id=record.id,
            name=record.name,
            status=record.status,
            executor=record.executor,
            engine_kind=record.engine_kind,
            created_at=record.created_at,
            finished_at=record.finished_at,
            running_here=record.id in running,
            verdict=record.verdict,
            spec=record.spec,
        )


class StudyList(BaseModel):
    """Stored studies, newest first."""

    items: list[StudyPublic] = Field(description="Studies this servetune can read.")
    unreadable: list[UnreadableStudy] = Field(
        description="Studies it cannot read (written by another version), with the reason."
    )


class TrialPublic(Trial):
    """A trial as the API shows it: the stored Trial and the worker that ran it."""

    worker_id: str | None = Field(
        default=None, description="Worker that ran it; null when run by the study's process."
    )


class TrialList(BaseModel):
    """A study's trials, by number."""

    items: list[TrialPublic] = Field(description="Every trial of the study, by number.")


WorkerState = Literal["online", "busy", "offline"]


class WorkerPublic(BaseModel):
    """A worker as the registry sees it."""

    info: WorkerInfo = Field(description="What the worker said when it registered.")
    state: WorkerState = Field(
        description="online, busy (online with a trial running) or offline (3 beats missed)."
    )
    last_heartbeat: Heartbeat | None = Field(
        default=None, description="Its last heartbeat while online; null when offline."
    )
    last_seen_at: AwareDatetime | None = Field(
        default=None, description="When it was last heard from (UTC)."
    )

    @classmethod
    def of(cls, status: Any) -> WorkerPublic:
        """From the registry's WorkerStatus (same fields)."""
        return cls(
            info=status.info,
            state=status.state,
            last_heartbeat=status.last_heartbeat,
            last_seen_at=status.last_seen_at,
        )


class WorkerList(BaseModel):
    """Every known worker and how many are in each state."""

    items: list[WorkerPublic] = Field(description="Every worker that registered.")
    online: int = Field(description="Workers online and idle.")
    busy: int = Field(description="Workers online with at least one trial running.")
    offline: int = Field(description="Workers that missed three heartbeats.")


class WorkerUpdate(BaseModel):
    """A change to a worker: its alias."""

    model_config = ConfigDict(extra="forbid")

    alias: str | None = Field(
        description="The name to show for the worker: 1-100 printable characters, no control "
        "characters, no space at either end, unique among known workers (409 names the one "
        "that has it). null clears it (the worker's own --name shows again)."
    )

    @field_validator("alias")
    @classmethod
    def _valid_alias(cls, alias: str | None) -> str | None:
        return check_alias(alias)


class GpuHistory(BaseModel):
    """A worker's recent GPU samples, newest first."""

    items: list[GpuSample] = Field(description="One sample per heartbeat, newest first.")


class LogList(BaseModel):
    """A worker's recent log records, oldest first."""

    items: list[LogRecord] = Field(description="Log records, oldest first.")


class Health(BaseModel):
    """Whether the manager and what it depends on answer."""

    status: Literal["ok", "degraded"] = Field(description="ok when the database and Redis answer.")
    version: str = Field(description="servetune version of the manager.")
    database: bool = Field(description="The database answered.")
    redis: bool = Field(description="Redis answered PING.")
    studies_running: int = Field(description="Studies this manager runs now.")


class WorkerSlotList(BaseModel):
    """Every saved worker slot, by name, each reconciled with the worker registry."""

    items: list[WorkerSlot] = Field(description="Every slot, by name.")


class DeployRequest(BaseModel):
    """The (optional) body of ``POST /api/worker-slots/{id}/deploy``."""

    model_config = ConfigDict(extra="forbid")

    offline: OfflineMode | None = Field(
        default=None,
        description="auto (probe the index from the remote), always (ship a wheelhouse) or "
        "never (install from the index); default: the slot's own setting.",
    )
