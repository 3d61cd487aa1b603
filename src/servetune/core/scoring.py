"""Objectives, scores and ranks: which trial is best, and the Pareto front of a two-objective study.

Feasible trials rank by their objective; infeasible ones by how far they miss; failed ones last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from servetune.core.metrics import ServingMetrics, metric_names
from servetune.core.slo import FiniteFloat
from servetune.core.study import Trial, TrialRole, TrialState


class ObjectiveTerm(BaseModel):
    """One metric to maximise or minimise at one load level.

    ``metric`` is a ``ServingMetrics.value`` name: ``output_tokens_per_s``, ``requests_per_s``,
    ``goodput_requests_per_s``, or ``<latency>.<stat>`` such as ``ttft_ms.p99``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str = Field(description="Metric name, e.g. output_tokens_per_s or ttft_ms.p99.")
    direction: Literal["maximize", "minimize"] = Field(description="maximize or minimize.")
    level: FiniteFloat | None = Field(
        default=None,
        description="Load level (concurrency or rate) to read it at; null = the last level.",
    )

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in metric_names():
            raise ValueError(f"unknown metric {v!r}; use one of: {', '.join(metric_names())}")
        return v

    @property
    def label(self) -> str:
        """Readable form, e.g. ``maximize output_tokens_per_s``."""
        at = f" @ {self.level:g}" if self.level is not None else ""
        return f"{self.direction} {self.metric}{at}"

    def read(self, metrics: Sequence[ServingMetrics]) -> float | None:
        """The term's value from a trial's per-level metrics (None when not measured)."""
        if not metrics:
            return None
        if self.level is None:
            chosen = metrics[-1]
        else:
            found = [m for m in metrics if abs(m.level.value - self.level) < 1e-9]
            if not found:
                return None
            chosen = found[0]
        return chosen.value(self.metric)


class Objective(BaseModel):
    """One term (single-objective study) or two (Pareto study)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    terms: list[ObjectiveTerm] = Field(min_length=1, max_length=2, description="1 or 2 terms.")

    def values(self, metrics: Sequence[ServingMetrics]) -> list[float] | None:
        """The value of every term, or None if any is unmeasured."""
        out = [t.read(metrics) for t in self.terms]
        if any(v is None for v in out):
            return None
        return [float(v) for v in out if v is not None]

    @property
    def directions(self) -> list[str]:
        """``maximize``/``minimize`` per term (Optuna's ``directions``)."""
        return [t.direction for t in self.terms]


def _signed(value: float, direction: str) -> float:
    """Value turned so that larger is better."""
    return value if direction == "maximize" else -value


def rank_key(trial: Trial, objective: Objective) -> tuple[int, float]:
    """Sort key, smaller = better: (tier, score).

    Tier 0: feasible COMPLETE, by the first term (direction-aware). Tier 1: COMPLETE but
    infeasible, by total relative SLO overshoot. Tier 2: everything else (FAIL, unfinished).
    """
    r = trial.result
    if trial.state is not TrialState.COMPLETE or r is None:
        return (2, 0.0)
    if r.feasible and r.objective_values:
        return (0, -_signed(r.objective_values[0], objective.terms[0].direction))
    miss = r.slo_report.total_miss if r.slo_report else float("inf")
    return (1, miss)


def rank(trials: Sequence[Trial], objective: Objective) -> list[Trial]:
    """Trials best first (see ``rank_key``); ties keep trial-number order."""
    return sorted(trials, key=lambda t: (rank_key(t, objective), t.number))


def best_trial(trials: Sequence[Trial], objective: Objective) -> Trial | None:
    """The best COMPLETE trial, feasible or not (None when no trial completed)."""
    ranked = [t for t in rank(trials, objective) if t.state is TrialState.COMPLETE]
    return ranked[0] if ranked else None


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """True when ``a`` is at least as good as ``b`` in every term and better in one."""
    sa = [_signed(v, d) for v, d in zip(a, directions, strict=True)]
    sb = [_signed(v, d) for v, d in zip(b, directions, strict=True)]
    return all(x >= y for x, y in zip(sa, sb, strict=True)) and any(
        x > y for x, y in zip(sa, sb, strict=True)
    )


def pareto_front(trials: Sequence[Trial], objective: Objective) -> list[Trial]:
    """Feasible COMPLETE trials that no other feasible trial dominates, by trial number."""
    pool = [
        t
        for t in trials
        if t.state is TrialState.COMPLETE and t.feasible and t.result and t.result.objective_values
    ]
    front = []
    for t in pool:
        assert t.result and t.result.objective_values
        if not any(
            o is not t
            and o.result
            and o.result.objective_values
            and dominates(
                o.result.objective_values, t.result.objective_values, objective.directions
            )
            for o in pool
        ):
            front.append(t)
    return sorted(front, key=lambda t: t.number)


class Verdict(BaseModel):
    """The confirmed comparison of the best trial against the baseline, from fresh repeats.

    ``gain_pct`` compares the means of the repeats (fresh servers), signed so that positive is
    better for the objective's direction. ``spread_pct`` is the run-to-run noise: the larger
    relative range (max − min) / mean of either configuration's repeats (see ``confirm_verdict``).
    The gain ``is_win`` only when it exceeds that spread and the ranges do not overlap.
    """

    model_config = ConfigDict(frozen=True)

    metric: str = Field(description="The objective metric compared.")
    direction: Literal["maximize", "minimize"] = Field(description="Objective direction.")
    baseline_values: list[float] = Field(description="Baseline: original run then repeats.")
    best_values: list[float] = Field(description="Best trial: original run then repeats.")
    baseline_mean: float = Field(description="Mean of the baseline repeats (original if none).")
    best_mean: float = Field(description="Mean of the best trial's repeats (original if none).")
    gain_pct: float = Field(
        description="Improvement of best over baseline in %, positive = better."
    )
    spread_pct: float = Field(
        description="Run-to-run spread (max − min) / mean in % (see class doc)."
    )
    is_win: bool = Field(
        description="Gain beyond the spread with non-overlapping ranges, from repeats."
    )
    repeats: int = Field(
        default=0, description="Fresh repeats per configuration behind the verdict."
    )

    @property
    def summary(self) -> str:
        """One line for people."""
        if self.repeats == 0:
            return (
                f"{self.metric}: baseline {self.baseline_mean:.4g} → best {self.best_mean:.4g} "
                f"({self.gain_pct:+.1f} %) from single runs; not confirmed on fresh servers "
                "(budget.confirm_repeats is 0), so the noise is unknown"
            )
        if self.is_win:
            what = "a real gain"
        elif self.gain_pct < -self.spread_pct:
            what = "worse than the baseline beyond the noise"
        else:
            what = "within the measured noise: not a confirmed win"
        return (
            f"{self.metric} on fresh servers: baseline {self.baseline_mean:.4g} → best "
            f"{self.best_mean:.4g} ({self.gain_pct:+.1f} %; run-to-run spread, max − min, "
            f"{self.spread_pct:.1f} %): {what}"
        )


def _rel_range(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return (max(values) - min(values)) / abs(mean) * 100.0 if mean else 0.0


def confirm_verdict(
    metric: str,
    direction: Literal["maximize", "minimize"],
    baseline_values: Sequence[float],
    best_values: Sequence[float],
) -> Verdict:
    """Compare best vs baseline from their measurements (original first, then fresh repeats).

    The gain compares the means of the repeats only: the original best run was picked as the
    maximum of a noisy search, so it is biased upwards. The spread is the relative range of the
    repeats (originals included only with a single repeat, where a range needs them). With no
    repeats (one value each) the gain is reported but never called a win: one run each says
    nothing about run-to-run noise. Raises ValueError when either list is empty.
    """
    if not baseline_values or not best_values:
        raise ValueError("confirm_verdict needs at least one measurement of each configuration")
    repeats = min(len(baseline_values), len(best_values)) - 1
    base_rep = list(baseline_values[1:]) or list(baseline_values)
    best_rep = list(best_values[1:]) or list(best_values)
    base_mean = sum(base_rep) / len(base_rep)
    best_mean = sum(best_rep) / len(best_rep)
    raw = (best_mean - base_mean) / abs(base_mean) * 100.0 if base_mean else 0.0
    gain = raw if direction == "maximize" else -raw
    base_noise = base_rep if len(base_rep) >= 2 else list(baseline_values)
    best_noise = best_rep if len(best_rep) >= 2 else list(best_values)
    spread = max(_rel_range(base_noise), _rel_range(best_noise))
    if direction == "maximize":
        apart = min(best_noise) > max(base_noise)
    else:
        apart = max(best_noise) < min(base_noise)
    return Verdict(
        metric=metric,
        direction=direction,
        baseline_values=list(baseline_values),
        best_values=list(best_values),
        baseline_mean=base_mean,
        best_mean=best_mean,
        gain_pct=gain,
        spread_pct=spread,
        is_win=repeats > 0 and gain > spread and apart,
        repeats=repeats,
    )


def runs_of(target: Trial, trials: Sequence[Trial]) -> list[Trial]:
    """``target`` and every COMPLETE repeat of it (CONFIRM trials with ``repeat_of`` = its number)."""
    return [target] + [
        t
        for t in trials
        if t.repeat_of == target.number
        and t.number != target.number
        and t.state is TrialState.COMPLETE
    ]


def mean_metric(runs: Sequence[Trial], name: str, level: float | None = None) -> float | None:
    """Mean of metric ``name`` over the COMPLETE ``runs`` at ``level`` (None = the last level).

    None when no run measured it. ``name`` as in ``ServingMetrics.value``.
    """
    term = ObjectiveTerm(metric=name, direction="maximize", level=level)
    values = [
        v
        for t in runs
        if t.state is TrialState.COMPLETE
        and t.result is not None
        and (v := term.read(t.result.metrics)) is not None
    ]
    return sum(values) / len(values) if values else None


def recommend(
    best: Trial | None,
    baseline: Trial | None,
    verdict: Verdict | None,
    trials: Sequence[Trial],
) -> tuple[Trial | None, str]:
    """The configuration to recommend, given the search and the repeats, and why.

    The repeats on fresh servers overrule the single search measurement: when the best
    trial is not better than the defaults on them, or misses the SLOs on them while the
    defaults meet them, the engine defaults are recommended.
    """
    if best is None:
        return None, "no trial completed: nothing to recommend (see each trial's failure)"
    if baseline is None or baseline.number == best.number:
        if best.role is TrialRole.BASELINE:
            return best, "the engine defaults were the best configuration found: keep them"
        return best, ""
    feasible_word = "" if best.feasible else " (it misses the SLOs: no trial met them)"
    if verdict is None or verdict.repeats == 0:
        return (
            best,
            f"recommending trial {best.number}{feasible_word}; not confirmed on fresh servers",
        )
    best_ok = repeats_feasible(best, trials)
    base_ok = repeats_feasible(baseline, trials)
    if base_ok and not best_ok:
        return baseline, (
            f"trial {best.number} missed the SLOs on fresh servers while the engine defaults met "
            "them: keep the engine defaults"
        )
    if verdict.gain_pct <= 0 and (base_ok or not best_ok):
        return baseline, (
            f"on fresh servers trial {best.number} was not better than the engine defaults "
            f"({verdict.gain_pct:+.1f} %): keep the engine defaults"
        )
    if not verdict.is_win:
        return best, (
            f"recommending trial {best.number}{feasible_word}, but its gain is within the "
            "measured noise"
        )
    return best, f"recommending trial {best.number}{feasible_word}: a confirmed gain"


def repeats_feasible(target: Trial, trials: Sequence[Trial]) -> bool:
    """True when every COMPLETE repeat of ``target`` met the SLOs."""
    repeats = [
        t
        for t in trials
        if t.role is TrialRole.CONFIRM
        and t.repeat_of == target.number
        and t.state is TrialState.COMPLETE
    ]
    return bool(repeats) and all(t.feasible for t in repeats)
