"""Unit tests of the serving metrics: per-request latencies, distributions and per-level summaries.

Hand-made request records with known timings; expected values worked out by hand (DESIGN.md §4).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from servetune.core.metrics import (
    LoadLevel,
    RequestRecord,
    RequestSloBounds,
    ServingMetrics,
    distribution,
    metric_names,
    percentile,
    summarize,
)

LEVEL = LoadLevel(concurrency=4)


def _ok(sent: float, chunks: list[float], tokens: int | None = None, **kw: object) -> RequestRecord:
    return RequestRecord.model_validate(
        {
            "sent_s": sent,
            "chunk_times_s": tuple(chunks),
            "done_s": chunks[-1] + 0.01,
            "output_tokens": len(chunks) if tokens is None else tokens,
            **kw,
        }
    )


def test_per_request_latencies_follow_vllm_definitions() -> None:
    r = _ok(10.0, [10.1, 10.15, 10.25, 10.30], tokens=5)
    assert r.ttft_ms() == pytest.approx(100.0)
    assert r.e2e_latency_ms() == pytest.approx(300.0)
    # TPOT = (e2e − ttft) / (output_tokens − 1), with the server's token count (5), not chunks (4)
    assert r.tpot_ms() == pytest.approx((300.0 - 100.0) / 4)
    assert r.itl_ms() == pytest.approx([50.0, 100.0, 50.0])


def test_single_token_and_empty_requests_have_no_tpot_or_itl() -> None:
    one = _ok(0.0, [0.2], tokens=1)
    assert one.ttft_ms() == pytest.approx(200.0)
    assert one.tpot_ms() is None
    assert one.itl_ms() == []
    empty = RequestRecord(sent_s=0.0, done_s=1.0, error_kind="timeout")
    assert not empty.ok
    assert empty.ttft_ms() is None and empty.e2e_latency_ms() is None and empty.tpot_ms() is None


def test_percentiles_match_numpy_linear() -> None:
    rng = random.Random(4)
    for n in (1, 2, 3, 10, 101, 999):
        xs = sorted(rng.uniform(0, 1000) for _ in range(n))
        for q in (0, 1, 37.5, 50, 90, 95, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
        d = distribution(xs)
        assert d is not None
        assert d.count == n
        assert d.mean == pytest.approx(float(np.mean(xs)))
        assert d.max == max(xs)
        for name, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
            assert d.get(name) == pytest.approx(float(np.percentile(xs, q)))  # type: ignore[arg-type]


def test_percentile_rejects_empty_input_and_bad_q() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    assert distribution([]) is None


def _records() -> list[RequestRecord]:
    return [
        # warm-up: slow and early; it must not move any number
        _ok(-5.0, [-3.0, -2.0], warmup=True),
        _ok(0.0, [0.1, 0.15, 0.25, 0.30], tokens=4, prompt_tokens=128, expected_prompt_tokens=128),
        _ok(0.05, [0.25, 0.45], tokens=2, prompt_tokens=140, expected_prompt_tokens=128),
        _ok(0.3, [0.35], tokens=1, prompt_tokens=129, expected_prompt_tokens=128),
        RequestRecord(sent_s=0.1, done_s=0.12, error_kind="http_500", retries=1),
        RequestRecord(sent_s=0.2, chunk_times_s=(0.3,), done_s=0.9, error_kind="timeout"),
        RequestRecord(sent_s=0.4, done_s=0.5),  # ended with no content: counted, never dropped
        RequestRecord(sent_s=0.45, done_s=0.6, error_kind="http_500"),
    ]


def test_summary_counts_failures_by_kind_and_excludes_warmup() -> None:
    m = summarize(LEVEL, _records())
    assert m.completed == 3
    assert m.failed == 4
    assert m.failed_by_kind == {"http_500": 2, "no_output": 1, "timeout": 1}
    assert m.warmup == 1
    assert m.retried == 1
    assert m.error_rate == pytest.approx(4 / 7)
    # measured window: first measured send (0.0) → last measured end (timeout done at 0.9)
    assert m.duration_s == pytest.approx(0.9)


def test_summary_keeps_the_first_error_message_of_each_kind() -> None:
    records = [
        RequestRecord(
            sent_s=0.0, done_s=0.1, error_kind="http_400", error="context too long", warmup=True
        ),
        _ok(0.1, [0.2, 0.3]),
        RequestRecord(sent_s=0.2, done_s=0.3, error_kind="http_500", error="first 500"),
        RequestRecord(sent_s=0.3, done_s=0.4, error_kind="http_500", error="second 500"),
        RequestRecord(sent_s=0.4, done_s=0.5, error_kind="timeout"),  # no message: no example
        RequestRecord(sent_s=0.5, done_s=0.6, error_kind="timeout", error="read timed out"),
        RequestRecord(sent_s=0.6, done_s=0.7),  # no content, no message
    ]
    m = summarize(LEVEL, records)
    # warm-up errors are not measured; the first message per kind, in issue order
    assert m.error_examples == {"http_500": "first 500", "timeout": "read timed out"}
    assert m.failed_by_kind == {"http_500": 2, "no_output": 1, "timeout": 2}
    assert summarize(LEVEL, [_ok(0.0, [0.1, 0.2])]).error_examples == {}


def test_summary_distributions_use_successful_requests_and_every_itl_gap() -> None:
    m = summarize(LEVEL, _records())
    assert m.ttft_ms is not None and m.ttft_ms.count == 3
    assert m.ttft_ms.max == pytest.approx(200.0)  # the warm-up's 2000 ms is not there
    assert m.ttft_ms.mean == pytest.approx((100.0 + 200.0 + 50.0) / 3)
    assert m.e2e_latency_ms is not None and m.e2e_latency_ms.max == pytest.approx(400.0)
    assert m.tpot_ms is not None and m.tpot_ms.count == 2  # the 1-token request has no TPOT
    assert m.tpot_ms.mean == pytest.approx(((300 - 100) / 3 + (400 - 200) / 1) / 2)
    assert m.itl_ms is not None and m.itl_ms.count == 4  # 3 gaps + 1 gap
    assert m.itl_ms.max == pytest.approx(200.0)
    assert m.itl_ms.p50 == pytest.approx(float(np.percentile([50, 100, 50, 200], 50)))


def test_throughput_is_over_the_measured_window() -> None:
    m = summarize(LEVEL, _records())
    assert m.output_tokens_per_s == pytest.approx((4 + 2 + 1) / 0.9)
    assert m.requests_per_s == pytest.approx(3 / 0.9)
    assert m.mean_output_tokens == pytest.approx(7 / 3)
    assert m.mean_prompt_tokens == pytest.approx((128 + 140 + 129) / 3)


def test_goodput_counts_only_requests_meeting_every_bound() -> None:
    records = _records()
    # no bounds: every completed request is good
    assert summarize(LEVEL, records).goodput_requests_per_s == pytest.approx(3 / 0.9)
    # TTFT ≤ 150 ms: the 100 ms and 50 ms requests; failed ones never count
    ttft = summarize(LEVEL, records, RequestSloBounds(ttft_ms=150.0))
    assert ttft.goodput_requests_per_s == pytest.approx(2 / 0.9)
    # and TPOT ≤ 100 ms: the 2-token request (TPOT 200) was already out; 1-token has no TPOT
    both = summarize(LEVEL, records, RequestSloBounds(ttft_ms=150.0, tpot_ms=100.0))
    assert both.goodput_requests_per_s == pytest.approx(2 / 0.9)
    e2e = summarize(LEVEL, records, RequestSloBounds(e2e_latency_ms=100.0))
    assert e2e.goodput_requests_per_s == pytest.approx(1 / 0.9)  # only the 50 ms one


def test_prompt_token_mismatches_are_counted_beyond_the_tolerance() -> None:
    assert summarize(LEVEL, _records()).prompt_token_mismatches == 1  # 140 vs 128; 129 is within 2
    assert summarize(LEVEL, _records(), prompt_token_tolerance=0).prompt_token_mismatches == 2
    assert summarize(LEVEL, _records(), prompt_token_tolerance=20).prompt_token_mismatches == 0


def test_a_level_where_everything_failed_has_no_distributions_and_zero_throughput() -> None:
    records = [RequestRecord(sent_s=0.0, done_s=0.1, error_kind="connect")] * 3
    m = summarize(LoadLevel(request_rate_per_s=2.5), records)
    assert (m.completed, m.failed, m.error_rate) == (0, 3, 1.0)
    assert m.ttft_ms is None and m.itl_ms is None
    assert m.output_tokens_per_s == 0.0 and m.requests_per_s == 0.0
    assert m.value("ttft_ms.p99") is None
    assert m.level.label == "rate=2.5/s" and m.level.value == 2.5
    empty = summarize(LEVEL, [])
    assert (empty.completed, empty.failed, empty.duration_s, empty.error_rate) == (0, 0, 0.0, 0.0)


def test_value_reads_every_metric_name_and_rejects_others() -> None:
    m = summarize(LEVEL, _records())
    names = metric_names()
    assert "output_tokens_per_s" in names and "ttft_ms.p99" in names and "itl_ms.mean" in names
    for name in names:
        v = m.value(name)
        assert v is not None and v >= 0.0
    assert m.value("ttft_ms.max") == pytest.approx(200.0)
    assert m.value("requests_per_s") == pytest.approx(m.requests_per_s)
    assert m.value("error_rate") == pytest.approx(4 / 7)
    for bad in ("ttft_ms.p42", "tokens_per_s", "duration_s", "completed.p50", "ttft_ms"):
        with pytest.raises(KeyError):
            m.value(bad)


def test_serving_metrics_round_trip_through_json() -> None:
    m = summarize(LEVEL, _records(), RequestSloBounds(ttft_ms=150.0))
    again = ServingMetrics.model_validate_json(m.model_dump_json())
    assert again == m


def test_input_and_total_token_throughput_use_usage_else_the_built_prompt_length() -> None:
    records = [
        _ok(0.0, [0.1, 0.2], tokens=2, prompt_tokens=100, expected_prompt_tokens=90),
        _ok(0.0, [0.1, 0.2], tokens=2, expected_prompt_tokens=50),  # no usage: the built length
        _ok(0.0, [0.1, 0.2], tokens=2),  # neither: counts 0 prompt tokens
        RequestRecord(sent_s=0.0, done_s=0.99, error_kind="timeout", expected_prompt_tokens=70),
    ]
    m = summarize(LEVEL, records)
    assert m.duration_s == pytest.approx(0.99)
    assert m.input_tokens_per_s == pytest.approx(150 / 0.99)  # failed requests are not counted
    assert m.output_tokens_per_s == pytest.approx(6 / 0.99)
    assert m.total_tokens_per_s == pytest.approx(156 / 0.99)
    assert m.client_loop_lag_p99_ms is None and m.client_cpu_fraction is None  # set by the client
