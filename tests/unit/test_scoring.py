"""Unit tests of ranking: feasible by objective, infeasible by SLO miss, failed last; best, Pareto.

Trials are hand-made records; only their state, feasibility, objective values and miss matter.
"""

from __future__ import annotations

import pytest

from servetune.core.scoring import (
    Objective,
    best_trial,
    confirm_verdict,
    dominates,
    pareto_front,
    rank,
    recommend,
    runs_of,
)
from servetune.core.slo import SloCheck, SloReport
from servetune.core.study import FailureKind, Trial, TrialResult, TrialRole, TrialState

THROUGHPUT = Objective.model_validate(
    {"terms": [{"metric": "output_tokens_per_s", "direction": "maximize"}]}
)
LATENCY = Objective.model_validate({"terms": [{"metric": "ttft_ms.p99", "direction": "minimize"}]})
BOTH = Objective.model_validate(
    {
        "terms": [
            {"metric": "output_tokens_per_s", "direction": "maximize"},
            {"metric": "ttft_ms.p99", "direction": "minimize"},
        ]
    }
)


def _report(miss: float) -> SloReport:
    return SloReport(
        checks=[
            SloCheck(
                name="ttft_ms p99 ≤ 300 ms",
                level="concurrency=1",
                observed=300 * (1 + miss),
                bound=300,
                ok=miss == 0,
                miss=miss,
            )
        ]
    )


def _done(number: int, values: list[float], miss: float = 0.0) -> Trial:
    result = TrialResult(
        state=TrialState.COMPLETE,
        objective_values=values,
        slo_report=_report(miss),
        feasible=miss == 0,
    )
    return Trial(number=number, state=TrialState.COMPLETE, result=result)


def _failed(number: int) -> Trial:
    result = TrialResult(
        state=TrialState.FAIL, failure_kind=FailureKind.CUDA_OOM, failure_reason="oom"
    )
    return Trial(number=number, state=TrialState.FAIL, result=result)


def _trials() -> list[Trial]:
    return [
        _failed(0),
        _done(1, [100.0]),
        _done(2, [300.0], miss=0.5),  # best throughput, but misses the SLO
        _done(3, [250.0]),
        _done(4, [50.0], miss=0.1),
        Trial(number=5, state=TrialState.RUNNING),
        _done(6, [250.0]),  # ties trial 3: trial-number order
        _done(7, [400.0], miss=0.1),  # ties trial 4 on miss
    ]


def test_rank_puts_feasible_by_objective_then_infeasible_by_miss_then_the_rest() -> None:
    assert [t.number for t in rank(_trials(), THROUGHPUT)] == [3, 6, 1, 4, 7, 2, 0, 5]


def test_rank_follows_the_direction_of_the_objective() -> None:
    assert [t.number for t in rank(_trials(), LATENCY)] == [1, 3, 6, 4, 7, 2, 0, 5]


def test_best_trial_prefers_feasible_then_the_smallest_miss_and_never_a_failure() -> None:
    trials = _trials()
    best = best_trial(trials, THROUGHPUT)
    assert best is not None and best.number == 3
    infeasible_only = [t for t in trials if not t.feasible]
    best = best_trial(infeasible_only, THROUGHPUT)
    assert best is not None and best.number == 4  # closest to feasible, not the fastest (2)
    assert best_trial([_failed(0), Trial(number=1, state=TrialState.RUNNING)], THROUGHPUT) is None
    assert best_trial([], THROUGHPUT) is None


def test_pareto_front_keeps_feasible_non_dominated_trials_by_number() -> None:
    trials = [
        _done(1, [100.0, 50.0]),
        _done(2, [80.0, 30.0]),
        _done(3, [90.0, 60.0]),  # dominated by 1 (less throughput, more latency)
        _done(4, [200.0, 10.0], miss=0.2),  # would dominate all, but misses its SLO
        _done(5, [100.0, 50.0]),  # equal to 1: neither dominates the other
        _done(6, [120.0, 90.0]),
        _failed(7),
    ]
    assert [t.number for t in pareto_front(trials, BOTH)] == [1, 2, 5, 6]


def test_dominates_needs_no_worse_everywhere_and_better_somewhere() -> None:
    d = ["maximize", "minimize"]
    assert dominates([100, 50], [90, 60], d)
    assert dominates([100, 50], [100, 60], d)
    assert not dominates([100, 50], [100, 50], d)
    assert not dominates([100, 50], [120, 60], d)
    assert not dominates([90, 60], [100, 50], d)


def test_objective_reads_each_term_at_its_level() -> None:
    from servetune.core.metrics import LoadLevel, ServingMetrics

    def m(c: int, tput: float) -> ServingMetrics:
        return ServingMetrics(
            level=LoadLevel(concurrency=c),
            completed=1,
            failed=0,
            duration_s=1.0,
            output_tokens_per_s=tput,
            requests_per_s=1.0,
            goodput_requests_per_s=1.0,
            error_rate=0.0,
        )

    metrics = [m(1, 10.0), m(8, 80.0)]
    last = Objective.model_validate(
        {"terms": [{"metric": "output_tokens_per_s", "direction": "maximize"}]}
    )
    at_1 = Objective.model_validate(
        {"terms": [{"metric": "output_tokens_per_s", "direction": "maximize", "level": 1}]}
    )
    assert last.values(metrics) == [80.0]
    assert at_1.values(metrics) == [10.0]
    assert BOTH.values(metrics) is None  # TTFT was not measured
    assert BOTH.directions == ["maximize", "minimize"]


def test_confirm_verdict_wins_only_beyond_the_run_to_run_spread() -> None:
    win = confirm_verdict("output_tokens_per_s", "maximize", [100, 102, 98], [120, 118, 122])
    assert win.is_win
    assert win.gain_pct == pytest.approx(20.0)
    assert win.spread_pct == pytest.approx(4.0)
    noise = confirm_verdict("output_tokens_per_s", "maximize", [100, 102, 98], [101, 99, 104])
    assert not noise.is_win
    faster = confirm_verdict("ttft_ms.p99", "minimize", [200, 202, 198], [150, 151, 149])
    assert faster.is_win and faster.gain_pct == pytest.approx(25.0)
    with pytest.raises(ValueError):
        confirm_verdict("output_tokens_per_s", "maximize", [], [1.0])


def test_confirm_verdict_without_repeats_is_never_a_win() -> None:
    single = confirm_verdict("output_tokens_per_s", "maximize", [100.0], [300.0])
    assert single.repeats == 0
    assert single.gain_pct == pytest.approx(200.0)
    assert not single.is_win
    assert "not confirmed" in single.summary
    repeated = confirm_verdict("output_tokens_per_s", "maximize", [100.0, 101.0], [300.0, 298.0])
    assert repeated.repeats == 1 and repeated.is_win


def _role(trial: Trial, role: TrialRole, repeat_of: int | None = None) -> Trial:
    return trial.model_copy(update={"role": role, "repeat_of": repeat_of})


def _study(
    base_runs: list[tuple[float, float]], best_runs: list[tuple[float, float]]
) -> list[Trial]:
    """Baseline = trial 0, best = trial 1, then repeats: (value, miss) for each run."""
    (b0, bm), *b_rep = base_runs
    (w0, wm), *w_rep = best_runs
    trials = [
        _role(_done(0, [b0], bm), TrialRole.BASELINE),
        _role(_done(1, [w0], wm), TrialRole.SEARCH),
    ]
    n = 2
    for target, runs in ((1, w_rep), (0, b_rep)):
        for value, miss in runs:
            trials.append(_role(_done(n, [value], miss), TrialRole.CONFIRM, repeat_of=target))
            n += 1
    return trials


def _recommended(trials: list[Trial]) -> tuple[int | None, str]:
    base, best = trials[0], trials[1]
    verdict = confirm_verdict(
        "output_tokens_per_s",
        "maximize",
        [t.result.objective_values[0] for t in runs_of(base, trials)],  # type: ignore[index,union-attr]
        [t.result.objective_values[0] for t in runs_of(best, trials)],  # type: ignore[index,union-attr]
    )
    chosen, note = recommend(best, base, verdict, trials)
    return (chosen.number if chosen else None), note


def test_recommendation_follows_the_repeats_not_the_single_search_run() -> None:
    # a confirmed gain: the best trial is recommended
    number, note = _recommended(
        _study([(100, 0), (101, 0), (99, 0)], [(150, 0), (148, 0), (151, 0)])
    )
    assert number == 1 and "confirmed gain" in note
    # the baseline's search run was an outlier; on fresh servers the defaults are better: keep them
    number, note = _recommended(
        _study([(40, 0), (200, 0), (205, 0)], [(150, 0), (148, 0), (151, 0)])
    )
    assert number == 0 and "keep the engine defaults" in note
    # the best misses the SLOs on its repeats while the defaults meet them: keep the defaults
    number, note = _recommended(_study([(100, 0), (101, 0)], [(150, 0), (149, 0.3)]))
    assert number == 0 and "missed the SLOs" in note
    # a gain inside the noise is still recommended, but said to be within the noise
    number, note = _recommended(
        _study([(100, 0), (90, 0), (110, 0)], [(104, 0), (95, 0), (115, 0)])
    )
    assert number == 1 and "within the measured noise" in note


def test_recommendation_without_repeats_or_completed_trials() -> None:
    trials = _study([(100, 0)], [(150, 0)])
    chosen, note = recommend(trials[1], trials[0], None, trials)
    assert chosen is trials[1] and "not confirmed" in note
    assert recommend(None, None, None, [])[0] is None
    chosen, note = recommend(trials[0], trials[0], None, trials)
    assert chosen is trials[0] and "engine defaults were the best" in note
