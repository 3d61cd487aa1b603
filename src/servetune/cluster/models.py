"""The typed messages that cross Redis between the manager and its workers.

Every model round-trips through JSON as its own type (``Model.model_validate_json(m.model_dump_json())
== m``), datetimes are timezone-aware UTC, and unknown fields are refused: a payload that is not
valid JSON for its schema is rejected, never executed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from servetune.core.spec import StudySpec
from servetune.core.study import Params, TrialNeeds, TrialResult


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""A timezone-aware datetime, converted to UTC (a naive one is refused)."""


def utc_now() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GPUInfo(_Message):
    """One GPU as NVML reports it (nvidia-ml-py); memory in GiB (2**30 bytes)."""

    index: int = Field(ge=0, description="NVML device index.")
    name: str = Field(description="Device name, e.g. 'NVIDIA H200'.")
    uuid: str = Field(description="Device UUID (GPU-…), stable across reboots.")
    memory_total_gib: float = Field(ge=0, description="Total device memory, GiB.")
    memory_used_gib: float = Field(ge=0, description="Used device memory, GiB.")
    memory_free_gib: float = Field(ge=0, description="Free device memory, GiB.")
    utilization_pct: float | None = Field(
        default=None, ge=0, le=100, description="GPU utilisation over NVML's last sample, %."
    )
    temperature_c: float | None = Field(default=None, description="GPU core temperature, °C.")
    power_w: float | None = Field(default=None, ge=0, description="Power draw, W.")


ALIAS_MAX_CHARS = 100
"""The longest alias a worker may have, characters."""


def check_alias(alias: str | None) -> str | None:
    """``alias`` when it is a valid worker alias (None clears one): 1-100 printable characters,
    no control characters, no space at either end. Raises ValueError naming ``alias`` and the
    fix; uniqueness among workers is checked by ``Registry.set_alias``."""
    if alias is None:
        return None
    if not alias:
        raise ValueError("alias is empty; give 1-100 printable characters, or null to clear it")
    if len(alias) > ALIAS_MAX_CHARS:
        raise ValueError(
            f"alias has {len(alias)} characters; use at most {ALIAS_MAX_CHARS} (or null to clear)"
        )
    if not alias.isprintable():
        bad = next(c for c in alias if not c.isprintable())
        raise ValueError(
            f"alias {alias!r} holds the control character {bad!r}; use printable characters only"
        )
    if alias != alias.strip():
        raise ValueError(f"alias {alias!r} starts or ends with a space; remove it")
    return alias


class WorkerInfo(_Message):
    """What a worker says about itself when it registers (static while it runs)."""

    id: str = Field(min_length=1, max_length=64, description="Worker id (stable per host+name).")
    hostname: str = Field(description="Host name of the worker's machine.")
    alias: str | None = Field(default=None, max_length=100, description="Name given by the user.")
    address: str | None = Field(default=None, description="IP address the worker's host uses.")
    pid: int = Field(ge=1, description="Process id of the worker.")
    version: str = Field(description="servetune version the worker runs.")
    engines: list[str] = Field(description="Engines this worker can run (llamacpp, vllm, sglang).")
    deployments: list[str] = Field(description="Deployment kinds it can use (local, docker, …).")
    gpus: list[GPUInfo] = Field(default_factory=list, description="GPUs at registration.")
    cpu_count: int = Field(ge=1, description="Logical CPU cores of the host.")
    memory_total_gib: float = Field(ge=0, description="Host memory, GiB.")
    max_parallel: int = Field(ge=1, description="Trials this worker runs at once at most.")
    started_at: UtcDatetime = Field(description="When the worker process started (UTC).")


class RunningTrial(_Message):
    """A trial a worker is running, as its heartbeat reports it."""

    job_id: str = Field(description="ARQ job id of the trial.")
    study_id: int = Field(description="Database id of the study.")
    trial_id: int = Field(description="Database id of the trial.")
    number: int = Field(description="Trial number within the study.")
    started_at: UtcDatetime = Field(description="When the worker started it (UTC).")


class Heartbeat(_Message):
    """A worker's periodic sign of life; three missed ones mark the worker offline."""

    worker_id: str = Field(description="Id of the worker.")
    sent_at: UtcDatetime = Field(description="When it was sent (UTC).")
    running: list[RunningTrial] = Field(default_factory=list, description="Trials in progress.")
    gpus: list[GPUInfo] = Field(default_factory=list, description="GPU state now.")
    memory_available_gib: float | None = Field(default=None, description="Host memory free, GiB.")
    cpu_load_fraction: float | None = Field(
        default=None, ge=0, description="1-minute load average / cores."
    )
    draining: bool = Field(default=False, description="Stopping: it takes no new trials.")


class GpuSample(_Message):
    """One entry of a worker's GPU history."""

    at: UtcDatetime = Field(description="When it was read (UTC).")
    gpus: list[GPUInfo] = Field(description="Every GPU at that time.")


class TrialJob(_Message):
    """The payload of one ARQ job: everything a worker needs to run one trial with ``run_trial``."""

    job_id: str = Field(
        description="ARQ job id, new for every placement: trial-<trial_id>-<attempt>[.<n>]-<8 hex>."
    )
    study_id: int = Field(description="Database id of the study.")
    study_name: str = Field(description="Study name (log folder and log lines).")
    trial_id: int = Field(description="Database id of the trial (results are ingested by it).")
    number: int = Field(ge=0, description="Trial number within the study.")
    attempt: int = Field(default=1, ge=1, description="1, then 2 when re-placed after a loss.")
    params: Params = Field(description="Flag values to try.")
    spec: StudySpec = Field(description="The study's spec.")
    needs: TrialNeeds = Field(default_factory=TrialNeeds, description="What it occupies.")
    timeout_s: float = Field(gt=0, description="The worker gives up on the trial after this, s.")
    worker_id: str = Field(description="The worker it was placed on.")


class TrialEventKind(StrEnum):
    """What a ``TrialEvent`` reports."""

    STARTED = "started"
    """The worker began the trial (engine about to launch)."""
    PHASE = "phase"
    """The trial entered a phase (starting, benchmarking, stopping)."""
    RESULT = "result"
    """The trial finished (any state); ``result`` holds it. Ingested exactly once."""
    HANDED_BACK = "handed_back"
    """The worker stopped (SIGTERM) before finishing: the manager places the trial again."""
    REJECTED = "rejected"
    """The job payload was invalid and was not executed; ``reason`` says why."""


class TrialEvent(_Message):
    """One entry of the events stream, from a worker to the manager."""

    kind: TrialEventKind = Field(description="What happened.")
    job_id: str = Field(description="ARQ job id.")
    study_id: int = Field(description="Database id of the study.")
    trial_id: int = Field(description="Database id of the trial.")
    number: int = Field(description="Trial number within the study.")
    attempt: int = Field(default=1, ge=1, description="Placement attempt.")
    worker_id: str = Field(description="Worker that sent it.")
    at: UtcDatetime = Field(default_factory=utc_now, description="When it happened (UTC).")
    phase: str | None = Field(default=None, description="Phase name (PHASE).")
    pid: int | None = Field(default=None, description="Engine pid on the worker (STARTED).")
    result: TrialResult | None = Field(default=None, description="The outcome (RESULT).")
    reason: str | None = Field(default=None, description="Why (HANDED_BACK, REJECTED).")


class LogSource(StrEnum):
    """Where a log record comes from."""

    WORKER = "worker"
    """The worker process itself."""
    TRIAL = "trial"
    """The trial's own lines (run_trial, the loop)."""
    ENGINE = "engine"
    """The engine's output (stdout/stderr of the inference server)."""
    BENCHMARK = "benchmark"
    """The benchmark client."""
    DEPLOYMENT = "deployment"
    """The deployment (process, container, InferenceService)."""


class LogRecord(_Message):
    """One log line shipped from a worker to Redis."""

    at: UtcDatetime = Field(description="When it was written (UTC).")
    level: str = Field(description="DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    levelno: int = Field(description="Numeric level (logging's).")
    message: str = Field(description="The formatted message.")
    logger: str = Field(description="Logger name (or 'engine').")
    worker_id: str = Field(description="Worker that wrote it.")
    source: LogSource = Field(description="worker, trial, engine, benchmark or deployment.")
    study_id: int | None = Field(default=None, description="Study it belongs to, if any.")
    trial_id: int | None = Field(default=None, description="Trial it belongs to, if any.")
    trial_number: int | None = Field(default=None, description="Trial number, if any.")
