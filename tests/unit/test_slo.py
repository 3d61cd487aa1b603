"""Unit tests of SLO checks: each SLO at each level it names, the error-rate limit, and the miss.

Metrics are built by hand so each level's TTFT p99 and error rate are known exactly.
"""

from __future__ import annotations

import pytest

from servetune.core.metrics import Distribution, LoadLevel, ServingMetrics
from servetune.core.slo import Slo, SloCheck, SloReport, check_slos, request_bounds


def _dist(p99: float) -> Distribution:
    return Distribution(
        mean=p99 / 2, p50=p99 / 2, p90=p99 * 0.9, p95=p99 * 0.95, p99=p99, max=p99 * 1.1, count=100
    )


def _level(concurrency: int, ttft_p99: float | None, error_rate: float = 0.0) -> ServingMetrics:
    return ServingMetrics(
        level=LoadLevel(concurrency=concurrency),
        completed=100,
        failed=0,
        duration_s=10.0,
        ttft_ms=_dist(ttft_p99) if ttft_p99 is not None else None,
        tpot_ms=_dist(20.0),
        output_tokens_per_s=1000.0,
        requests_per_s=10.0,
        goodput_requests_per_s=9.0,
        error_rate=error_rate,
    )


TTFT_300 = Slo(metric="ttft_ms", percentile="p99", max_ms=300)


def test_an_slo_is_checked_at_every_level_and_must_hold_at_each() -> None:
    metrics = [_level(1, 200.0), _level(4, 400.0)]
    report = check_slos([TTFT_300], metrics, max_error_rate=0.0)
    ttft = [c for c in report.checks if c.name == TTFT_300.label]
    assert [(c.level, c.ok) for c in ttft] == [("concurrency=1", True), ("concurrency=4", False)]
    assert not report.feasible  # good at 1 does not make up for bad at 4: no averaging
    assert report.total_miss == pytest.approx(400 / 300 - 1)
    assert ttft[1].observed == 400.0 and ttft[1].bound == 300.0


def test_an_slo_restricted_to_one_level_ignores_the_others() -> None:
    metrics = [_level(1, 200.0), _level(4, 400.0)]
    low_only = Slo(metric="ttft_ms", percentile="p99", max_ms=300, levels=[1])
    report = check_slos([low_only], metrics, max_error_rate=0.0)
    assert report.feasible
    assert report.total_miss == 0.0
    assert [c.level for c in report.checks if c.name == low_only.label] == ["concurrency=1"]
    high_only = Slo(metric="ttft_ms", percentile="p99", max_ms=300, levels=[4])
    assert not check_slos([high_only], metrics, max_error_rate=0.0).feasible
    both = Slo(metric="ttft_ms", percentile="p99", max_ms=300, levels=[1, 4])
    assert not check_slos([both], metrics, max_error_rate=0.0).feasible


def test_the_percentile_named_is_the_one_checked() -> None:
    metrics = [_level(1, 400.0)]  # p50 = 200, p99 = 400
    assert check_slos([Slo(metric="ttft_ms", percentile="p50", max_ms=300)], metrics, 0.0).feasible
    assert not check_slos(
        [Slo(metric="ttft_ms", percentile="p99", max_ms=300)], metrics, 0.0
    ).feasible


def test_error_rate_limit_is_checked_at_every_level() -> None:
    metrics = [_level(1, 100.0, error_rate=0.0), _level(4, 100.0, error_rate=0.1)]
    lenient = check_slos([], metrics, max_error_rate=0.2)
    assert lenient.feasible and len(lenient.checks) == 2
    strict = check_slos([], metrics, max_error_rate=0.05)
    assert not strict.feasible
    assert strict.total_miss == pytest.approx(0.1 / 0.05 - 1)
    zero = check_slos([], metrics, max_error_rate=0.0)
    assert not zero.feasible
    assert zero.total_miss == pytest.approx(0.1)  # a zero bound: the miss is the excess itself


def test_an_unmeasured_metric_fails_its_check_with_a_unit_miss() -> None:
    report = check_slos([TTFT_300], [_level(1, None)], max_error_rate=0.0)
    check = next(c for c in report.checks if c.name == TTFT_300.label)
    assert check.observed is None and not check.ok and check.miss == 1.0
    assert not report.feasible


def test_total_miss_sums_relative_overshoots_and_is_zero_when_feasible() -> None:
    slos = [TTFT_300, Slo(metric="tpot_ms", percentile="p99", max_ms=10)]
    report = check_slos(slos, [_level(1, 450.0), _level(4, 600.0)], max_error_rate=0.0)
    # ttft: 0.5 + 1.0; tpot (p99 = 20 at both): 1.0 + 1.0
    assert report.total_miss == pytest.approx(0.5 + 1.0 + 1.0 + 1.0)
    assert check_slos(slos[:1], [_level(1, 100.0)], 0.0).total_miss == 0.0


def test_request_bounds_take_the_tightest_bound_per_metric() -> None:
    bounds = request_bounds(
        [
            TTFT_300,
            Slo(metric="ttft_ms", percentile="p50", max_ms=150),
            Slo(metric="e2e_latency_ms", max_ms=2000),
            Slo(metric="itl_ms", max_ms=5),  # not a per-request bound
        ]
    )
    assert bounds.ttft_ms == 150 and bounds.e2e_latency_ms == 2000
    assert bounds.tpot_ms is None


def test_slo_label_and_spec_validation() -> None:
    assert TTFT_300.label == "ttft_ms p99 ≤ 300 ms"
    with pytest.raises(ValueError):
        Slo.model_validate({"metric": "ttft_ms", "max_ms": 0})
    with pytest.raises(ValueError):
        Slo.model_validate({"metric": "output_tokens_per_s", "max_ms": 10})


def test_missed_lists_each_failed_check_readably() -> None:
    report = SloReport(
        checks=[
            SloCheck(
                name="ttft_ms p99 ≤ 500 ms",
                level="concurrency=8",
                observed=812.0,
                bound=500,
                ok=False,
                miss=0.624,
            ),
            SloCheck(
                name="error_rate ≤ 0",
                level="concurrency=1",
                observed=0.0,
                bound=0,
                ok=True,
                miss=0.0,
            ),
            SloCheck(
                name="tpot_ms p50 ≤ 20 ms",
                level="concurrency=1",
                observed=None,
                bound=20,
                ok=False,
                miss=1.0,
            ),
        ]
    )
    assert report.missed() == [
        "ttft_ms p99 ≤ 500 ms at concurrency=8: 812",
        "tpot_ms p50 ≤ 20 ms at concurrency=1: not measured",
    ]
