"""Immutable records of a tuning Study: trial states, failure kinds, results and trials.

These records cross every seam (runner → store → strategy → report) and serialize to JSON.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from servetune.core.metrics import MeasurementWarning, ServingMetrics
from servetune.core.slo import SloReport

ParamValue = int | float | str | bool
"""One flag value a trial tries."""

Params = dict[str, ParamValue]
"""Flag name (the engine's own CLI name, without dashes) → value."""


def format_params(params: Params) -> str:
    """Params as ``name=value`` pairs for tables and logs; ``(engine defaults)`` when empty."""
    return " ".join(f"{k}={v}" for k, v in params.items()) if params else "(engine defaults)"


class TrialNeeds(BaseModel):
    """What one trial occupies on a host while it runs (``Engine.needs``): the scheduler only
    places it where these fit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_threads: int = Field(default=1, ge=1, description="CPU threads the engine uses.")
    gpus: int = Field(default=0, ge=0, description="GPUs the engine uses (0 = CPU only).")


class TrialState(StrEnum):
    """Lifecycle of a trial; the members and their meaning follow Optuna's ``TrialState``."""

    WAITING = "WAITING"
    """Proposed, not started yet."""
    RUNNING = "RUNNING"
    """Engine starting or being benchmarked."""
    COMPLETE = "COMPLETE"
    """Benchmarked; metrics are present (the trial may still miss its SLOs)."""
    PRUNED = "PRUNED"
    """Stopped early on purpose (e.g. already hopeless after one level)."""
    FAIL = "FAIL"
    """No usable measurement; ``failure_kind`` says why."""

    def is_finished(self) -> bool:
        """True for COMPLETE, PRUNED and FAIL."""
        return self in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class FailureKind(StrEnum):
    """Stable codes for why a trial failed; deterministic ones are never retried with the same params."""

    INVALID_ARGS = "invalid_args"
    """The engine rejected its flags (unknown flag, bad value)."""
    PREFLIGHT_REJECTED = "preflight_rejected"
    """servetune rejected the params before launch (e.g. ctx-size too small for parallel slots)."""
    CUDA_OOM = "cuda_oom"
    """Out of GPU memory at start-up or under load."""
    HOST_OOM = "host_oom"
    """Out of host memory (allocation failed, OOM-killed)."""
    KV_CACHE_TOO_SMALL = "kv_cache_too_small"
    """The engine could not fit the KV cache the params ask for."""
    MODEL_LOAD_FAILED = "model_load_failed"
    """The model file could not be read or is not supported."""
    PORT_IN_USE = "port_in_use"
    """The engine could not bind its port."""
    STARTUP_TIMEOUT = "startup_timeout"
    """The engine was not ready within the start-up timeout."""
    ENGINE_CRASHED = "engine_crashed"
    """The engine process exited during start-up or the benchmark."""
    BENCHMARK_FAILED = "benchmark_failed"
    """The benchmark could not measure (every request failed, or too many)."""
    WORKER_LOST = "worker_lost"
    """The worker running the trial disappeared."""
    INTERRUPTED = "interrupted"
    """The study process died while the trial was RUNNING (found on resume)."""
    CANCELLED = "cancelled"
    """The user cancelled the trial or the study."""
    UNKNOWN = "unknown"
    """A failure servetune could not classify; the reason holds the evidence."""

    def is_deterministic(self) -> bool:
        """True when the same params would fail the same way, so retrying them is pointless."""
        return self in _DETERMINISTIC


_DETERMINISTIC = frozenset(
    {
        FailureKind.INVALID_ARGS,
        FailureKind.PREFLIGHT_REJECTED,
        FailureKind.CUDA_OOM,
        FailureKind.HOST_OOM,
        FailureKind.KV_CACHE_TOO_SMALL,
        FailureKind.MODEL_LOAD_FAILED,
    }
)


class TrialRole(StrEnum):
    """Why a trial exists within its study."""

    BASELINE = "baseline"
    """The engine's defaults; always trial 0."""
    SEARCH = "search"
    """Proposed by the strategy."""
    CONFIRM = "confirm"
    """A repeat of the best or the baseline on a fresh server, to measure noise before the verdict."""


class TrialResult(BaseModel):
    """What ``run_trial`` returns: the measurement of one candidate, or why there is none.

    ``metrics`` holds one ``ServingMetrics`` per load level, in workload order. ``feasible`` is
    True only for a COMPLETE trial whose SLOs all hold; ``objective_values`` has one value per
    objective term (None when the trial failed). Times are aware UTC datetimes; durations in s.
    """

    model_config = ConfigDict(frozen=True)

    state: TrialState = Field(description="COMPLETE, PRUNED or FAIL.")
    failure_kind: FailureKind | None = Field(default=None, description="Why it failed (FAIL only).")
    failure_reason: str | None = Field(default=None, description="Readable reason, with evidence.")
    metrics: list[ServingMetrics] = Field(
        default_factory=list, description="One entry per load level."
    )
    slo_report: SloReport | None = Field(
        default=None, description="Every SLO checked at every level."
    )
    feasible: bool = Field(default=False, description="COMPLETE and every SLO holds.")
    objective_values: list[float] | None = Field(
        default=None, description="One value per objective term, in the spec's order."
    )
    launch_argv: list[str] = Field(
        default_factory=list, description="The exact engine command run."
    )
    log_path: str | None = Field(default=None, description="Engine log file of this trial.")
    started_at: AwareDatetime | None = Field(
        default=None, description="When the engine was launched (UTC)."
    )
    finished_at: AwareDatetime | None = Field(
        default=None, description="When the trial ended (UTC)."
    )
    engine_start_s: float | None = Field(default=None, description="Launch → ready, in seconds.")
    benchmark_s: float | None = Field(default=None, description="Wall time of the benchmark, in s.")
    notes: list[str] = Field(
        default_factory=list, description="What happened worth telling (e.g. a retry)."
    )
    outside_cpu_fraction: float | None = Field(
        default=None,
        description="Share of all CPU cores other processes used while it was measured (0-1).",
    )
    warnings: list[MeasurementWarning] = Field(
        default_factory=list,
        description="Why its numbers may mislead: every level's warnings, then outside_load.",
    )
    synthesized: bool = Field(
        default=False,
        description=(
            "True when the manager made this outcome up (FAIL worker_lost): no worker measured "
            "it, so a result a worker measured that arrives later replaces it."
        ),
    )


class Trial(BaseModel):
    """A trial as stored: identity, params and, once finished, its result."""

    model_config = ConfigDict(frozen=True)

    id: int | None = Field(default=None, description="Database id (None before it is saved).")
    study_id: int | None = Field(default=None, description="Database id of the study.")
    number: int = Field(description="0-based number within the study; trial 0 is the baseline.")
    role: TrialRole = Field(default=TrialRole.SEARCH, description="baseline, search or confirm.")
    params: Params = Field(
        default_factory=dict, description="Flag values tried; {} = engine defaults."
    )
    state: TrialState = Field(default=TrialState.WAITING, description="Lifecycle state.")
    result: TrialResult | None = Field(default=None, description="Set once the trial finished.")
    repeat_of: int | None = Field(
        default=None, description="For CONFIRM trials: the number repeated."
    )
    created_at: datetime | None = Field(
        default=None, description="When the trial was proposed (UTC)."
    )

    @property
    def failure_kind(self) -> FailureKind | None:
        """Shortcut to ``result.failure_kind``."""
        return self.result.failure_kind if self.result else None

    @property
    def feasible(self) -> bool:
        """Shortcut to ``result.feasible`` (False while unfinished)."""
        return bool(self.result and self.result.feasible)

    def summary(self) -> dict[str, Any]:
        """The JSON shape `servetune show --json` prints for one trial."""
        return {
            "number": self.number,
            "role": self.role.value,
            "state": self.state.value,
            "params": self.params,
            "metrics": [m.model_dump(mode="json") for m in self.result.metrics]
            if self.result
            else [],
            "feasible": self.feasible,
            "failure_kind": self.failure_kind.value if self.failure_kind else None,
            "failure_reason": self.result.failure_reason if self.result else None,
            "objective_values": self.result.objective_values if self.result else None,
            "outside_cpu_fraction": self.result.outside_cpu_fraction if self.result else None,
            "warnings": [w.model_dump(mode="json") for w in self.result.warnings]
            if self.result
            else [],
            "notes": self.result.notes if self.result else [],
        }
