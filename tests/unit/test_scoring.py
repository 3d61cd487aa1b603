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
    infeasible_reason,
    noise_pct,
    pareto_front,
    rank,
    recommend_from_repeats,
    top_candidates,
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


def _role(trial: Trial, role: TrialRole, repeat_of: int | None = None, **params: int) -> Trial:
    return trial.model_copy(update={"role": role, "repeat_of": repeat_of, "params": params})


def _study(
    base_runs: list[tuple[float, float]], best_runs: list[tuple[float, float]]
) -> list[Trial]:
    """Baseline = trial 0, best = trial 1 (params x=1), then repeats: (value, miss) for each run."""
    (b0, bm), *b_rep = base_runs
    (w0, wm), *w_rep = best_runs
    trials = [
        _role(_done(0, [b0], bm), TrialRole.BASELINE),
        _role(_done(1, [w0], wm), TrialRole.SEARCH, x=1),
    ]
    n = 2
    for target, runs in ((1, w_rep), (0, b_rep)):
        for value, miss in runs:
            params = {"x": 1} if target == 1 else {}
            trials.append(_role(_done(n, [value], miss), TrialRole.CONFIRM, target, **params))
            n += 1
    return trials


def _recommended(trials: list[Trial]) -> tuple[int | None, str]:
    search = [t for t in trials if t.role is not TrialRole.CONFIRM]
    rec = recommend_from_repeats(
        trials, THROUGHPUT, top_candidates(search, THROUGHPUT, 3), trials[0]
    )
    return (rec.trial.number if rec.trial else None), rec.note


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
    assert number == 0 and "misses the SLOs on fresh servers" in note
    # changed by design (noise-aware search): a gain inside the noise is a tie, and a tie goes to
    # the engine defaults (it used to recommend the candidate "within the measured noise")
    number, note = _recommended(
        _study([(100, 0), (90, 0), (110, 0)], [(104, 0), (95, 0), (115, 0)])
    )
    assert number == 0 and "within the run-to-run spread" in note and "keep the engine" in note


def test_a_lucky_repeat_is_no_confirmed_gain_when_the_search_run_lost_to_the_defaults() -> None:
    """Found by QA: the candidate's own search run (86.4 tok/s) lost to the defaults (median
    167.5) and one fresh repeat (458.1) was called a +173 % confirmed gain."""
    trials = _study([(167.5, 0), (160.0, 0), (170.0, 0)], [(86.4, 0), (458.1, 0)])
    number, note = _recommended(trials)
    assert number == 0, note
    assert "not in its own search run (86.4 vs the defaults' median 167.5)" in note
    assert "keep the engine defaults" in note and "confirmed gain" not in note
    # the same repeat after a search run that did beat the defaults is a confirmed gain
    number, note = _recommended(_study([(167.5, 0), (160.0, 0), (170.0, 0)], [(300, 0), (458, 0)]))
    assert number == 1 and "confirmed gain" in note


def test_recommendation_without_repeats_or_completed_trials() -> None:
    trials = _study([(100, 0)], [(150, 0)])
    rec = recommend_from_repeats(trials, THROUGHPUT, [trials[1]], trials[0])
    assert rec.trial is trials[1] and "not confirmed" in rec.note
    assert rec.verdict is not None and not rec.verdict.is_win and not rec.verdict.noise_known
    assert recommend_from_repeats([], THROUGHPUT, [], None).trial is None
    rec = recommend_from_repeats(trials[:1], THROUGHPUT, [], trials[0])
    assert rec.trial is trials[0] and "keep the engine defaults" in rec.note


# ---- noise-aware search ---------------------------------------------------------------------


def test_the_luckier_of_two_runs_of_one_configuration_is_not_a_172_percent_winner() -> None:
    """Issue 5 item 7: on a busy machine the same effective configuration measured 28.7 and
    116.7 tok/s; the search named the luckier one the winner (+172 %)."""
    trials = [
        _role(_done(0, [30.1]), TrialRole.BASELINE),
        _role(_done(1, [29.3]), TrialRole.CONFIRM, 0),  # early baseline repeat: spread 2.7 %
        _role(_done(2, [28.7]), TrialRole.SEARCH, threads=2),
        _role(_done(3, [116.7]), TrialRole.SEARCH, threads=2, parallel=1),
        _role(_done(4, [25.0]), TrialRole.SEARCH, threads=1),
    ]

    def key(t: Trial) -> object:
        """Trials 2 and 3 are the same server: the effective params drop parallel=1 (a default)."""
        return tuple(sorted((k, v) for k, v in t.params.items() if k != "parallel"))

    # one configuration, two runs: the spread is the noise, and the candidate ranks by its median
    assert noise_pct(trials, key) == pytest.approx((116.7 - 28.7) / 72.7 * 100)
    [first, second] = top_candidates(trials, THROUGHPUT, 3, key)
    assert (first.number, second.number) == (2, 4)
    # its fresh repeat lands where the unlucky run was: keep the defaults, no +172 % anywhere
    trials += [
        _role(_done(5, [29.9]), TrialRole.CONFIRM, 0),
        _role(_done(6, [31.0]), TrialRole.CONFIRM, 2, threads=2),
        _role(_done(7, [24.0]), TrialRole.CONFIRM, 4, threads=1),
    ]
    rec = recommend_from_repeats(trials, THROUGHPUT, [first, second], trials[0], key)
    assert (
        rec.trial is not None and rec.trial.number == 0 and "keep the engine defaults" in rec.note
    )
    assert rec.verdict is not None and not rec.verdict.is_win
    assert rec.verdict.gain_pct == pytest.approx((31.0 / 29.9 - 1) * 100)
    assert "172" not in rec.note and "172" not in rec.verdict.summary
    assert rec.candidates == [2, 4] and rec.compared is not None and rec.compared.number == 2
    # without the effective-params key, the lucky run is its own candidate, and still loses on
    # its fresh repeat
    plain = top_candidates(trials, THROUGHPUT, 1)
    assert plain[0].number == 3


def test_the_candidate_with_the_best_repeat_median_wins_only_beyond_the_spread() -> None:
    base = [
        _role(_done(0, [100.0]), TrialRole.BASELINE),
        _role(_done(1, [104.0]), TrialRole.CONFIRM, 0),  # spread 4 %
    ]
    search = [
        _role(_done(2, [160.0]), TrialRole.SEARCH, x=1),  # lucky search run
        _role(_done(3, [150.0]), TrialRole.SEARCH, x=2),
        _role(_done(4, [140.0]), TrialRole.SEARCH, x=3),
        _role(_done(5, [130.0]), TrialRole.SEARCH, x=4),  # not in the top 3
    ]
    cands = top_candidates(base + search, THROUGHPUT, 3)
    assert [c.number for c in cands] == [2, 3, 4]
    repeats = [
        _role(_done(6, [101.0]), TrialRole.CONFIRM, 0),
        _role(_done(7, [103.0]), TrialRole.CONFIRM, 2, x=1),  # the lucky one was noise
        _role(_done(8, [125.0]), TrialRole.CONFIRM, 3, x=2),
        _role(_done(9, [121.0]), TrialRole.CONFIRM, 4, x=3),
    ]
    rec = recommend_from_repeats(base + search + repeats, THROUGHPUT, cands, base[0])
    assert rec.trial is not None and rec.trial.number == 3 and "confirmed gain" in rec.note
    assert rec.verdict is not None and rec.verdict.is_win and rec.verdict.repeats == 1
    assert rec.verdict.gain_pct == pytest.approx((125 / 101 - 1) * 100)
    assert rec.noise_pct == pytest.approx(
        4 / 101 * 100
    )  # the lucky 160 → 103 is selection, not noise
    # the same repeats inside a wide spread (the baseline ran 70 and 130): a tie, keep the defaults
    noisy = [
        base[0].model_copy(update={"result": _done(0, [70.0]).result}),
        base[1].model_copy(update={"result": _done(1, [130.0]).result}),
    ]
    rec = recommend_from_repeats(noisy + search + repeats, THROUGHPUT, cands, noisy[0])
    assert rec.trial is not None and rec.trial.number == 0 and "a tie" in rec.note


def test_the_candidates_are_distinct_feasible_first_and_never_the_defaults() -> None:
    trials = [
        _role(_done(0, [100.0]), TrialRole.BASELINE),
        _role(_done(1, [300.0], miss=0.2), TrialRole.SEARCH, x=1),  # fastest, misses the SLOs
        _role(_done(2, [150.0]), TrialRole.SEARCH, x=2),
        _role(_done(3, [140.0]), TrialRole.SEARCH, x=2),  # same configuration as trial 2
        _role(_failed(4), TrialRole.SEARCH, x=5),
        _role(_done(5, [120.0]), TrialRole.SEARCH),  # params {}: the defaults' configuration
    ]
    assert [c.number for c in top_candidates(trials, THROUGHPUT, 3)] == [2, 1]
    assert [c.number for c in top_candidates(trials, LATENCY, 1)] == [2]  # feasible first


def test_an_objective_never_measured_recommends_nothing_and_says_so() -> None:
    unmeasured = TrialResult(state=TrialState.COMPLETE, slo_report=SloReport(checks=[]))
    trials = [
        Trial(number=0, role=TrialRole.BASELINE, state=TrialState.COMPLETE, result=unmeasured),
        Trial(number=1, params={"x": 1}, state=TrialState.COMPLETE, result=unmeasured),
    ]
    rec = recommend_from_repeats(trials, LATENCY, top_candidates(trials, LATENCY, 3), trials[0])
    assert rec.trial is None and not rec.objective_measured
    assert "no completed trial measured the objective (minimize ttft_ms.p99)" in rec.note
    assert "keep" not in rec.note and "SLO" not in rec.note
    assert infeasible_reason(trials[1]) == "its objective was not measured"


def test_infeasible_reason_names_slos_only_when_an_slo_was_missed() -> None:
    error_only = SloReport(
        checks=[
            SloCheck(
                name="error_rate ≤ 0",
                level="concurrency=1",
                observed=0.5,
                bound=0,
                ok=False,
                miss=1,
            )
        ]
    )
    result = TrialResult(
        state=TrialState.COMPLETE, slo_report=error_only, objective_values=[10.0], feasible=False
    )
    trial = Trial(number=1, state=TrialState.COMPLETE, result=result)
    assert infeasible_reason(trial) == "fails more requests than workload.max_error_rate allows"
    assert infeasible_reason(_done(2, [1.0], miss=0.3)) == "misses the SLOs"
    assert infeasible_reason(_done(3, [1.0])) is None and infeasible_reason(_failed(4)) is None


def test_a_candidate_that_fails_on_a_fresh_server_is_not_recommended() -> None:
    trials = _study([(100, 0), (101, 0)], [(150, 0)])
    crashed = TrialResult(
        state=TrialState.FAIL, failure_kind=FailureKind.ENGINE_CRASHED, failure_reason="SIGSEGV"
    )
    trials.append(
        Trial(
            number=3,
            role=TrialRole.CONFIRM,
            repeat_of=1,
            params={"x": 1},
            state=TrialState.FAIL,
            result=crashed,
        )
    )
    rec = recommend_from_repeats(trials, THROUGHPUT, [trials[1]], trials[0])
    assert rec.trial is trials[0] and "failed on a fresh server" in rec.note
    assert "trial 3, a repeat of trial 1: engine_crashed" in rec.note
    # an interrupted repeat is no evidence: without another repeat it is simply unconfirmed
    interrupted = crashed.model_copy(update={"failure_kind": FailureKind.INTERRUPTED})
    trials[-1] = trials[-1].model_copy(update={"result": interrupted})
    rec = recommend_from_repeats(trials, THROUGHPUT, [trials[1]], trials[0])
    assert rec.trial is trials[1] and "not confirmed on fresh servers" in rec.note
