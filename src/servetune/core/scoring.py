"""Objectives, scores and ranks: which trial is best, and the Pareto front of a two-objective study.

Feasible trials rank by their objective; infeasible ones by how far they miss; failed ones last.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from servetune.core.metrics import ServingMetrics, metric_names
from servetune.core.slo import FiniteFloat
from servetune.core.strategies.base import params_key
from servetune.core.study import FailureKind, Trial, TrialRole, TrialState


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
    statistic: Literal["mean", "median"] = Field(
        default="mean",
        description="What gain_pct compares: the means (confirm_verdict) or the medians "
        "(compare_runs, the noise-aware recommendation).",
    )
    baseline_median: float | None = Field(default=None, description="Median of baseline_values.")
    best_median: float | None = Field(default=None, description="Median of best_values.")
    noise_known: bool = Field(
        default=True, description="False when no configuration ran twice (spread unknown)."
    )

    @property
    def summary(self) -> str:
        """One line for people."""
        base = self.baseline_median if self.statistic == "median" else self.baseline_mean
        best = self.best_median if self.statistic == "median" else self.best_mean
        assert base is not None and best is not None
        what_of = f"{self.statistic} of " if self.statistic == "median" else ""
        if self.repeats == 0:
            noise = (
                f"run-to-run spread {self.spread_pct:.1f} %"
                if self.noise_known
                else "so the noise is unknown"
            )
            return (
                f"{self.metric}: defaults {what_of}{len(self.baseline_values)} run(s) "
                f"{base:.4g} → best {best:.4g} ({self.gain_pct:+.1f} %) from search runs; not "
                f"confirmed on fresh servers, {noise}"
            )
        if self.is_win:
            what = "a real gain"
        elif self.gain_pct < -self.spread_pct:
            what = "worse than the defaults beyond the noise"
        else:
            what = "within the measured noise: a tie, not a win"
        if self.statistic == "median":
            return (
                f"{self.metric} on fresh servers: defaults median of "
                f"{len(self.baseline_values)} runs {base:.4g} → candidate median of "
                f"{self.repeats} repeat(s) {best:.4g} ({self.gain_pct:+.1f} %; run-to-run "
                f"spread, max − min, {self.spread_pct:.1f} %): {what}"
            )
        return (
            f"{self.metric} on fresh servers: baseline {base:.4g} → best "
            f"{best:.4g} ({self.gain_pct:+.1f} %; run-to-run spread, max − min, "
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


def mean_metric(
    runs: Sequence[Trial], name: str, level: float | None = None, *, median: bool = False
) -> float | None:
    """Mean (or, with ``median``, median) of metric ``name`` over the COMPLETE ``runs`` at
    ``level`` (None = the last level).

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
    if not values:
        return None
    return statistics.median(values) if median else sum(values) / len(values)


# ---- noise-aware choice: configurations, their runs, the run-to-run spread ----------------

ConfigKey = Callable[[Trial], Hashable]
"""Identity of the configuration a trial ran: trials with equal keys ran the same server."""


def params_config_key(trial: Trial) -> Hashable:
    """The default ``ConfigKey``: the params as given (True and 1 differ; 2 and 2.0 do not).

    An engine that knows which params it runs identically (e.g. two context sizes that round to
    the same per-slot context) passes a key built from its effective params instead.
    """
    return params_key(trial.params)


def objective_value(trial: Trial) -> float | None:
    """The first objective value of a COMPLETE trial (None when failed or not measured)."""
    r = trial.result
    if trial.state is not TrialState.COMPLETE or r is None or not r.objective_values:
        return None
    return r.objective_values[0]


def relative_range_pct(values: Sequence[float]) -> float:
    """Run-to-run spread of repeated measurements: (max − min) / |median| in %; 0 for fewer
    than two values or a zero median. The median, not the mean, so one outlier run does not
    shrink the denominator it inflates."""
    if len(values) < 2:
        return 0.0
    mid = statistics.median(values)
    return (max(values) - min(values)) / abs(mid) * 100.0 if mid else 0.0


def configuration_runs(
    trials: Sequence[Trial], key: ConfigKey = params_config_key
) -> dict[Hashable, list[Trial]]:
    """Every COMPLETE trial with an objective value, grouped by configuration (any role), in
    trial-number order within a group."""
    groups: dict[Hashable, list[Trial]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if objective_value(t) is not None:
            groups.setdefault(key(t), []).append(t)
    return groups


def noise_pct(trials: Sequence[Trial], key: ConfigKey = params_config_key) -> float | None:
    """The study's run-to-run spread: the largest ``relative_range_pct`` of the first objective
    over the runs of any configuration measured at least twice, in %. None when no
    configuration ran twice, so the noise is unknown.

    Runs of a configuration: the baseline's runs and confirm repeats always; a search run only
    when its configuration was proposed at least twice in the search (the same effective
    params, e.g. 28.7 and 116.7 tok/s). A configuration's single search run is left out: the
    search confirms its best configurations, so that run is the maximum of a noisy search and
    its distance to the fresh repeat is selection bias on top of the noise.
    """
    spreads = []
    for runs in configuration_runs(trials, key).values():
        searched = [t for t in runs if t.role is TrialRole.SEARCH]
        used = runs if len(searched) >= 2 else [t for t in runs if t.role is not TrialRole.SEARCH]
        values = [v for t in used if (v := objective_value(t)) is not None]
        if len(values) >= 2:
            spreads.append(relative_range_pct(values))
    return max(spreads) if spreads else None


def top_candidates(
    trials: Sequence[Trial],
    objective: Objective,
    k: int,
    key: ConfigKey = params_config_key,
) -> list[Trial]:
    """Up to ``k`` SEARCH trials to confirm on fresh servers, one per distinct configuration,
    best first; each stands for its configuration (its first search run).

    A configuration ranks by the median first objective value of its search runs, so two runs
    of the same effective params (28.7 and 116.7 tok/s) count as one configuration at 72.7, not
    as a winner at 116.7. Configurations whose runs all met the SLOs come first, then the
    others by their median SLO overshoot; configurations that are the baseline's (same key as
    a BASELINE trial) are not candidates. Ties keep trial-number order.
    """
    base_keys = {key(t) for t in trials if t.role is TrialRole.BASELINE}
    groups: dict[Hashable, list[Trial]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.role is TrialRole.SEARCH and objective_value(t) is not None:
            groups.setdefault(key(t), []).append(t)
    direction = objective.terms[0].direction

    def order(item: tuple[Hashable, list[Trial]]) -> tuple[int, float, int]:
        runs = item[1]
        values = [v for t in runs if (v := objective_value(t)) is not None]
        if all(t.feasible for t in runs):
            return (0, -_signed(statistics.median(values), direction), runs[0].number)
        misses = [
            t.result.slo_report.total_miss if t.result and t.result.slo_report else 0.0
            for t in runs
        ]
        return (1, statistics.median(misses), runs[0].number)

    ranked = sorted((i for i in groups.items() if i[0] not in base_keys), key=order)
    return [runs[0] for _, runs in ranked[:k]]


def infeasible_reason(trial: Trial) -> str | None:
    """Why a COMPLETE trial is infeasible, in words a spec's author recognises; None when it is
    feasible or did not complete. An objective that was not measured, SLOs missed (named only
    when the spec has SLOs that failed), or more failed requests than
    ``workload.max_error_rate`` allows."""
    r = trial.result
    if trial.state is not TrialState.COMPLETE or r is None or r.feasible:
        return None
    missed = [c for c in (r.slo_report.checks if r.slo_report else []) if not c.ok]
    slo_missed = [c for c in missed if not c.name.startswith("error_rate")]
    if slo_missed:
        return "misses the SLOs"
    if missed:
        return "fails more requests than workload.max_error_rate allows"
    if not r.objective_values:
        return "its objective was not measured"
    return "is infeasible"


class Recommendation(BaseModel):
    """What a finished study recommends, and the comparison behind it.

    ``trial`` is the configuration to run (the baseline trial = keep the engine defaults; None
    = nothing to recommend, ``note`` says why). ``verdict`` compares the chosen candidate with
    the defaults (None when there was nothing to compare). ``candidates`` are the confirmed
    candidates' trial numbers, best first. ``objective_measured`` is False when no completed
    trial measured the objective.
    """

    model_config = ConfigDict(frozen=True)

    trial: Trial | None = Field(description="The trial whose params to run, or None.")
    note: str = Field(description="Why, in one sentence.")
    verdict: Verdict | None = Field(default=None, description="Chosen candidate vs defaults.")
    compared: Trial | None = Field(
        default=None, description="The candidate the verdict compares with the defaults."
    )
    candidates: list[int] = Field(default_factory=list, description="Confirmed candidates.")
    noise_pct: float | None = Field(default=None, description="Run-to-run spread in %.")
    objective_measured: bool = Field(default=True, description="Some trial measured it.")


def _median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def recommend_from_repeats(
    trials: Sequence[Trial],
    objective: Objective,
    candidates: Sequence[Trial],
    baseline: Trial | None,
    key: ConfigKey = params_config_key,
) -> Recommendation:
    """The configuration to recommend from the fresh repeats of the candidates and the defaults.

    Each candidate's fresh runs are its CONFIRM trials (every trial of its configuration with
    role confirm); its search run is left out when repeats exist, because the search picked it
    as a maximum of noisy runs (biased upwards). The defaults' runs are every run of the
    baseline's configuration (the baseline, its early and its confirm repeats). The chosen
    candidate has the best median over its fresh runs among those whose fresh runs all met the
    SLOs (all candidates when none did). It is recommended when its median beats the
    defaults' median by more than the study's run-to-run spread (``noise_pct``) and its runs lie
    entirely beyond the defaults' runs; or when it met the SLOs on every fresh run while the
    defaults missed them. A gain is not confirmed when the candidate's own search run did not
    beat the defaults' median (selection bias only inflates a search run, so such a run shows
    runs that disagree more than the gain). Otherwise the engine defaults are kept: a
    difference inside the spread is a tie, and a tie goes to the defaults. A candidate that failed on a fresh server
    (interrupted and cancelled repeats aside) is not recommended; when every candidate did, the
    defaults are kept. Without repeats (``confirm_repeats: 0``)
    the best candidate is recommended as not confirmed. When no trial measured the objective,
    nothing is recommended.
    """
    term = objective.terms[0]
    completed = [t for t in trials if t.state is TrialState.COMPLETE]
    if not completed:
        return Recommendation(
            trial=None, note="no trial completed: nothing to recommend (see each trial's failure)"
        )
    if not any(objective_value(t) is not None for t in completed):
        return Recommendation(
            trial=None,
            objective_measured=False,
            note=f"no completed trial measured the objective ({term.label}): nothing to "
            "recommend; see `servetune show` for what each trial measured",
        )
    noise = noise_pct(trials, key)
    groups = configuration_runs(trials, key)
    base_runs = groups.get(key(baseline), []) if baseline is not None else []
    base_values = [v for t in base_runs if (v := objective_value(t)) is not None]
    numbers = [c.number for c in candidates]
    if not candidates:
        if baseline is not None and base_values:
            return Recommendation(
                trial=baseline,
                note="no search trial measured the objective: keep the engine defaults",
                noise_pct=noise,
            )
        return Recommendation(trial=None, note="nothing measured the objective", noise_pct=noise)

    def fresh(c: Trial) -> list[Trial]:
        return [t for t in groups.get(key(c), []) if t.role is TrialRole.CONFIRM]

    def failed_repeats(c: Trial) -> list[Trial]:
        return [
            t
            for t in trials
            if t.role is TrialRole.CONFIRM
            and t.repeat_of == c.number
            and t.state is TrialState.FAIL
            and t.failure_kind not in (FailureKind.INTERRUPTED, FailureKind.CANCELLED)
        ]

    confirmed = [c for c in candidates if fresh(c) and not failed_repeats(c)]
    failed = [t for c in candidates for t in failed_repeats(c)]
    if not confirmed and failed:
        first = failed[0]
        kind = first.failure_kind.value if first.failure_kind else first.state.value
        return Recommendation(
            trial=baseline if base_values else None,
            note=f"every candidate failed on a fresh server (e.g. trial {first.number}, a "
            f"repeat of trial {first.repeat_of}: {kind}), so none is confirmed"
            + (": keep the engine defaults" if base_values else ""),
            candidates=numbers,
            noise_pct=noise,
        )
    if not confirmed:
        best = candidates[0]
        if not base_values or baseline is None:
            return Recommendation(
                trial=best,
                note=f"recommending trial {best.number}; the engine defaults were not measured, "
                "so there is no comparison",
                candidates=numbers,
                noise_pct=noise,
            )
        best_values = [
            v for t in groups.get(key(best), []) if (v := objective_value(t)) is not None
        ]
        verdict = compare_runs(term.metric, term.direction, base_values, best_values, noise, 0)
        word = "" if best.feasible else f" (it {infeasible_reason(best)})"
        return Recommendation(
            trial=best,
            note=f"recommending trial {best.number}{word}; not confirmed on fresh servers",
            verdict=verdict,
            compared=best,
            candidates=numbers,
            noise_pct=noise,
        )

    def fresh_values(c: Trial) -> list[float]:
        return [v for t in fresh(c) if (v := objective_value(t)) is not None]

    feasible_ones = [c for c in confirmed if all(t.feasible for t in fresh(c))]
    pool = feasible_ones or confirmed
    direction = term.direction
    chosen = max(
        pool, key=lambda c: (_signed(statistics.median(fresh_values(c)), direction), -c.number)
    )
    chosen_values = fresh_values(chosen)
    chosen_ok = chosen in feasible_ones
    if baseline is None or not base_values:
        return Recommendation(
            trial=chosen,
            note=f"recommending trial {chosen.number}; the engine defaults were not measured, so "
            "there is no comparison",
            candidates=numbers,
            noise_pct=noise,
        )
    base_ok = all(t.feasible for t in base_runs)
    verdict = compare_runs(
        term.metric, direction, base_values, chosen_values, noise, len(chosen_values)
    )
    common = {"verdict": verdict, "compared": chosen, "candidates": numbers, "noise_pct": noise}
    if base_ok and not chosen_ok:
        return Recommendation(
            trial=baseline,
            note=f"the best candidate, trial {chosen.number}, {infeasible_reason(fresh(chosen)[0]) or 'missed the SLOs'} on "
            "fresh servers while the engine defaults met them: keep the engine defaults",
            **common,
        )
    if chosen_ok and not base_ok:
        return Recommendation(
            trial=chosen,
            note=f"recommending trial {chosen.number}: it met the SLOs on every fresh server "
            f"while the engine defaults did not ({verdict.gain_pct:+.1f} % {term.metric})",
            **common,
        )
    base_median = statistics.median(base_values)
    contrary = [
        v
        for t in groups.get(key(chosen), [])
        if t.role is TrialRole.SEARCH
        and (v := objective_value(t)) is not None
        and _signed(v, direction) <= _signed(base_median, direction)
    ]
    if verdict.is_win and contrary:
        # selection bias only inflates a search run; one that did not even beat the defaults
        # says the candidate's own runs disagree more than the gain its repeats show
        return Recommendation(
            trial=baseline,
            note=f"trial {chosen.number} beat the engine defaults on its fresh repeat(s) "
            f"({verdict.gain_pct:+.1f} %) but not in its own search run ({contrary[0]:.4g} vs "
            f"the defaults' median {base_median:.4g}): its runs disagree more than the gain, so "
            "it is not confirmed: keep the engine defaults",
            **common,
        )
    if verdict.is_win:
        word = "" if chosen_ok else " (no configuration met the SLOs)"
        return Recommendation(
            trial=chosen,
            note=f"recommending trial {chosen.number}{word}: a confirmed gain of "
            f"{verdict.gain_pct:+.1f} % beyond the run-to-run spread of {verdict.spread_pct:.1f} %",
            **common,
        )
    if verdict.gain_pct < -verdict.spread_pct:
        why = f"worse than the engine defaults ({verdict.gain_pct:+.1f} %)"
    elif verdict.gain_pct <= 0:
        why = f"not better than the engine defaults ({verdict.gain_pct:+.1f} %)"
    else:
        why = (
            f"{verdict.gain_pct:+.1f} % against the engine defaults, within the run-to-run "
            f"spread of {verdict.spread_pct:.1f} % (a tie)"
        )
    return Recommendation(
        trial=baseline,
        note=f"on fresh servers the best candidate, trial {chosen.number}, was {why}: keep the "
        "engine defaults",
        **common,
    )


def compare_runs(
    metric: str,
    direction: Literal["maximize", "minimize"],
    baseline_values: Sequence[float],
    best_values: Sequence[float],
    noise: float | None,
    repeats: int,
) -> Verdict:
    """Compare a candidate's runs with the defaults' by their medians.

    ``spread_pct`` is the largest of ``noise`` (the study's spread, see ``noise_pct``) and the
    relative range of either list. ``is_win`` when ``repeats`` > 0 (the candidate's values are
    fresh repeats), the gain exceeds the spread, and every candidate run is beyond every
    baseline run. Raises ValueError when either list is empty.
    """
    if not baseline_values or not best_values:
        raise ValueError("compare_runs needs at least one measurement of each configuration")
    base_mid = statistics.median(baseline_values)
    best_mid = statistics.median(best_values)
    raw = (best_mid - base_mid) / abs(base_mid) * 100.0 if base_mid else 0.0
    gain = raw if direction == "maximize" else -raw
    spread = max(noise or 0.0, relative_range_pct(baseline_values), relative_range_pct(best_values))
    if direction == "maximize":
        apart = min(best_values) > max(baseline_values)
    else:
        apart = max(best_values) < min(baseline_values)
    return Verdict(
        metric=metric,
        direction=direction,
        baseline_values=list(baseline_values),
        best_values=list(best_values),
        baseline_mean=statistics.fmean(baseline_values),
        best_mean=statistics.fmean(best_values),
        baseline_median=base_mid,
        best_median=best_mid,
        gain_pct=gain,
        spread_pct=spread,
        is_win=repeats > 0 and gain > spread and apart,
        repeats=repeats,
        statistic="median",
        noise_known=noise is not None or len(baseline_values) >= 2 or len(best_values) >= 2,
    )
