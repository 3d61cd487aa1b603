"""Service-level objectives: bounds on one latency metric at one percentile, checked per load level.

SLOs are never averaged across levels: each named level must meet each bound on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from servetune.core.metrics import LatencyMetric, Percentile, RequestSloBounds, ServingMetrics

MAX_SLO_MS = 86_400_000.0
"""Largest SLO bound: one day in milliseconds."""


def _finite_number(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"must be a finite number, not {v}")
    return v


FiniteFloat = Annotated[float, BeforeValidator(_finite_number)]
"""A float that is neither NaN nor ±inf (the message says so)."""


class Slo(BaseModel):
    """One bound: ``metric`` at ``percentile`` must be ≤ ``max_ms`` at each level in ``levels``.

    Example: ``{metric: ttft_ms, percentile: p99, max_ms: 500}`` = TTFT p99 ≤ 500 ms.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: LatencyMetric = Field(
        description="Latency metric: ttft_ms, tpot_ms, itl_ms or e2e_latency_ms."
    )
    percentile: Percentile = Field(default="p99", description="mean, p50, p90, p95, p99 or max.")
    max_ms: FiniteFloat = Field(
        gt=0, le=MAX_SLO_MS, description="Upper bound in milliseconds (≤ 86,400,000: a day)."
    )
    levels: list[FiniteFloat] | None = Field(
        default=None,
        description="Load levels (concurrency or rate values) where the SLO applies; null = every level.",
    )

    @property
    def label(self) -> str:
        """Readable form, e.g. ``ttft_ms p99 ≤ 500 ms``."""
        return f"{self.metric} {self.percentile} ≤ {self.max_ms:g} ms"

    def applies_to(self, level_value: float) -> bool:
        """True when this SLO is checked at the level whose value is ``level_value``."""
        return self.levels is None or any(abs(v - level_value) < 1e-9 for v in self.levels)


class SloCheck(BaseModel):
    """The outcome of one SLO (or the error-rate limit) at one level."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The SLO's label, or 'error_rate ≤ x'.")
    level: str = Field(description="The level's label, e.g. concurrency=4.")
    observed: float | None = Field(description="Measured value (None when nothing was measured).")
    bound: float = Field(description="The bound.")
    ok: bool = Field(description="observed ≤ bound.")
    miss: float = Field(
        description="Relative overshoot max(0, observed/bound − 1); 1.0 if unmeasured."
    )


class SloReport(BaseModel):
    """Every check of one trial; ``feasible`` when all hold."""

    model_config = ConfigDict(frozen=True)

    checks: list[SloCheck] = Field(default_factory=list, description="One per SLO per level.")

    @property
    def feasible(self) -> bool:
        """True when every check holds."""
        return all(c.ok for c in self.checks)

    def missed(self) -> list[str]:
        """The failed checks, one readable line each: ``ttft_ms p99 ≤ 500 ms at concurrency=8: 812``."""
        return [
            f"{c.name} at {c.level}: "
            + ("not measured" if c.observed is None else f"{c.observed:.4g}")
            for c in self.checks
            if not c.ok
        ]

    @property
    def total_miss(self) -> float:
        """Sum of relative overshoots: how far an infeasible trial is from feasible (0 if feasible)."""
        return sum(c.miss for c in self.checks)


def _check(name: str, level: str, observed: float | None, bound: float) -> SloCheck:
    if observed is None:
        return SloCheck(name=name, level=level, observed=None, bound=bound, ok=False, miss=1.0)
    miss = max(0.0, observed / bound - 1.0) if bound > 0 else max(0.0, observed - bound)
    return SloCheck(
        name=name, level=level, observed=observed, bound=bound, ok=observed <= bound, miss=miss
    )


def check_slos(
    slos: Sequence[Slo], metrics: Sequence[ServingMetrics], max_error_rate: float
) -> SloReport:
    """Check each SLO at each level it applies to, plus the error-rate limit at every level.

    A level where the metric was not measured (every request failed) fails the check.
    """
    checks: list[SloCheck] = []
    for m in metrics:
        checks.append(
            _check(f"error_rate ≤ {max_error_rate:g}", m.level.label, m.error_rate, max_error_rate)
        )
        for slo in slos:
            if slo.applies_to(m.level.value):
                checks.append(
                    _check(
                        slo.label,
                        m.level.label,
                        m.value(f"{slo.metric}.{slo.percentile}"),
                        slo.max_ms,
                    )
                )
    return SloReport(checks=checks)


def request_bounds(slos: Sequence[Slo]) -> RequestSloBounds:
    """Per-request bounds for goodput: the tightest ``max_ms`` per metric (ITL SLOs are not per-request)."""

    def tightest(metric: str) -> float | None:
        values = [s.max_ms for s in slos if s.metric == metric]
        return min(values) if values else None

    return RequestSloBounds(
        ttft_ms=tightest("ttft_ms"),
        tpot_ms=tightest("tpot_ms"),
        e2e_latency_ms=tightest("e2e_latency_ms"),
    )
