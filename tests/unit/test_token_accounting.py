"""Unit tests of token accounting and measurement warnings (issue 5, items 1, 2 and 7).

Hand-made request records with known timings and token counts; expected values worked out by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from servetune.bench.builtin import count_output_tokens
from servetune.core.metrics import (
    CLIENT_CPU_FRACTION_MAX,
    CLIENT_LOOP_LAG_P99_MAX_MS,
    LoadLevel,
    MeasurementWarning,
    RequestRecord,
    ServingMetrics,
    format_warning,
    metric_names,
    outside_load_warning,
    summarize,
    trial_warnings,
)
from servetune.errors import BenchmarkError
from servetune.testing.fake_server import TOKENS, count_tokens

LEVEL = LoadLevel(concurrency=2)


def _rec(
    tokens: int,
    *,
    events: int | None = None,
    max_tokens: int = 8,
    sent: float = 0.0,
    gap_s: float = 0.01,
    **kw: object,
) -> RequestRecord:
    """A successful request: first event at sent + 0.1 s, then one event every ``gap_s``."""
    n = tokens if events is None else events
    chunks = tuple(sent + 0.1 + i * gap_s for i in range(n))
    return RequestRecord.model_validate(
        {
            "sent_s": sent,
            "chunk_times_s": chunks,
            "done_s": chunks[-1],
            "output_tokens": tokens,
            "max_tokens": max_tokens,
            **kw,
        }
    )


def _codes(m: ServingMetrics) -> list[str]:
    return [w.code for w in m.warnings]


# ---- per-request formulas ---------------------------------------------------------------


def test_itl_per_token_divides_each_gap_by_the_tokens_of_the_event_ending_it() -> None:
    r = RequestRecord(
        sent_s=0.0, chunk_times_s=(0.1, 0.2, 0.4), output_tokens=7, event_tokens=(1, 2, 4)
    )
    assert r.itl_ms() == pytest.approx([100.0, 200.0])  # per event: one value per gap
    assert r.itl_per_token_ms() == pytest.approx([50.0, 50.0] + [50.0] * 4)
    # TPOT uses the 7 tokens, not the 3 events: (400 − 100) / 6
    assert r.tpot_ms() == pytest.approx(50.0)


def test_one_token_per_event_gives_the_same_itl_both_ways() -> None:
    r = _rec(5, gap_s=0.02)
    assert r.itl_per_token_ms() == pytest.approx(r.itl_ms())
    assert r.tokens_per_event() == [1] * 5


def test_unknown_event_tokens_spread_the_total_evenly() -> None:
    r = RequestRecord(sent_s=0.0, chunk_times_s=(0.1, 0.2, 0.3, 0.4), output_tokens=10)
    assert r.tokens_per_event() == [3, 3, 2, 2]
    assert r.itl_per_token_ms() == pytest.approx([100 / 3] * 3 + [50.0] * 4)


def test_credited_tokens_are_capped_at_max_tokens() -> None:
    assert _rec(9, max_tokens=8).credited_output_tokens() == 8
    assert _rec(16, max_tokens=8).credited_output_tokens() == 8
    assert _rec(7, max_tokens=8).credited_output_tokens() == 7
    assert (
        RequestRecord(sent_s=0.0, chunk_times_s=(0.1,), output_tokens=3).credited_output_tokens()
        == 3
    )


# ---- per-level accounting ---------------------------------------------------------------


@pytest.mark.parametrize("returned", [9, 16])  # over by one token and by 2×
@pytest.mark.parametrize("estimated", [False, True])  # with and without usage
def test_over_generation_is_flagged_and_not_credited(returned: int, estimated: bool) -> None:
    good = _rec(8, sent=0.0, output_tokens_estimated=estimated)
    over = _rec(returned, sent=0.0, output_tokens_estimated=estimated)
    m = summarize(LEVEL, [good, over])
    d = m.duration_s
    assert d == pytest.approx(0.1 + (returned - 1) * 0.01)
    assert m.output_tokens_per_s == pytest.approx(16 / d)  # 8 + 8 credited
    assert m.raw_output_tokens_per_s == pytest.approx((8 + returned) / d)  # raw stays visible
    assert (m.over_generated, m.under_generated) == (1, 0)
    assert (m.min_output_tokens, m.max_output_tokens, m.requested_output_tokens) == (8, returned, 8)
    assert "over_generation" in _codes(m)
    (w,) = [w for w in m.warnings if w.code == "over_generation"]
    assert f"up to {returned}" in w.message and w.level == "concurrency=2"
    assert ("estimated" in w.message) is estimated
    assert ("estimated_token_counts" in _codes(m)) is estimated


@pytest.mark.parametrize("returned", [7, 4])  # under by one token and by half
@pytest.mark.parametrize("estimated", [False, True])
def test_under_generation_is_flagged_for_failed_short_outputs_too(
    returned: int, estimated: bool
) -> None:
    short = _rec(returned, error_kind="short_output", output_tokens_estimated=estimated)
    ok = _rec(8, output_tokens_estimated=estimated)
    m = summarize(LEVEL, [ok, short])
    assert (m.completed, m.failed, m.under_generated, m.over_generated) == (1, 1, 1, 0)
    assert m.min_output_tokens == returned
    assert _codes(m)[0] == "under_generation"
    # a request cut by a dropped connection is a failure, not under-generation
    dropped = _rec(1, error_kind="read")
    assert summarize(LEVEL, [ok, dropped]).under_generated == 0


def test_exact_outputs_raise_no_warning() -> None:
    m = summarize(LEVEL, [_rec(8), _rec(8, sent=0.05)])
    assert m.warnings == []
    assert m.output_tokens_per_s == pytest.approx(m.raw_output_tokens_per_s)


def test_four_tokens_per_event_without_usage_counts_32_tokens_not_8() -> None:
    # issue 5 item 2: 4 tokens per event, 32 tokens, finish "length", no usage, counted by the
    # tokenizer (output_tokens 32, estimated) with its per-event counts
    r = _rec(
        32,
        events=8,
        max_tokens=32,
        output_tokens_estimated=True,
        event_tokens=(4,) * 8,
        gap_s=0.04,
    )
    m = summarize(LEVEL, [r])
    assert m.mean_output_tokens == 32
    assert m.output_tokens_per_s == pytest.approx(32 / (0.1 + 7 * 0.04))
    assert m.tpot_ms is not None and m.tpot_ms.mean == pytest.approx(7 * 40 / 31)
    assert m.itl_ms is not None and m.itl_ms.count == 7 and m.itl_ms.mean == pytest.approx(40.0)
    assert m.itl_per_token_ms is not None
    assert m.itl_per_token_ms.count == 28 and m.itl_per_token_ms.mean == pytest.approx(10.0)
    assert (m.multi_token_event_requests, m.max_tokens_per_event) == (1, 4)
    assert _codes(m) == ["estimated_token_counts", "multi_token_events"]
    assert m.value("itl_per_token_ms.p50") == pytest.approx(10.0)
    assert "itl_per_token_ms.p99" in metric_names()


def test_prompt_mismatches_become_a_warning_naming_the_tolerance() -> None:
    r = _rec(8, prompt_tokens=140, expected_prompt_tokens=128)
    m = summarize(LEVEL, [r], prompt_token_tolerance=3)
    (w,) = m.warnings
    assert w.code == "prompt_token_mismatch" and "more than 3 tokens" in w.message


def test_client_saturation_thresholds() -> None:
    base = summarize(LEVEL, [_rec(8)])
    at = base.model_copy(
        update={
            "client_loop_lag_p99_ms": CLIENT_LOOP_LAG_P99_MAX_MS,
            "client_cpu_fraction": CLIENT_CPU_FRACTION_MAX,
        }
    )
    assert at.warnings == []  # at the limits: not saturated
    lagging = base.model_copy(update={"client_loop_lag_p99_ms": 25.0})
    assert _codes(lagging) == ["client_saturated"] and "25.0 ms" in lagging.warnings[0].message
    busy = base.model_copy(update={"client_cpu_fraction": 0.97})
    assert _codes(busy) == ["client_saturated"] and "97%" in busy.warnings[0].message


def test_warnings_serialize_with_the_metrics_and_are_recomputed_on_load() -> None:
    m = summarize(LEVEL, [_rec(16), _rec(8)])
    doc = m.model_dump(mode="json")
    assert [w["code"] for w in doc["warnings"]] == ["over_generation"]
    again = ServingMetrics.model_validate(doc)
    assert again == m and again.warnings == m.warnings
    # metrics stored before warnings existed load with none (new counts default to 0)
    old = {k: v for k, v in doc.items() if k not in ("warnings", "over_generated")}
    assert ServingMetrics.model_validate(old).warnings == []


def test_outside_load_and_trial_warnings() -> None:
    assert outside_load_warning(None, 0.5) is None
    assert outside_load_warning(0.5, 0.5) is None
    w = outside_load_warning(0.62, 0.5)
    assert w is not None and w.code == "outside_load" and "62%" in w.message and "50%" in w.message
    levels = [
        summarize(LoadLevel(concurrency=1), [_rec(16)]),
        summarize(LoadLevel(concurrency=4), [_rec(8, prompt_tokens=20, expected_prompt_tokens=8)]),
    ]
    ws = trial_warnings(levels, 0.8, 0.5)
    assert [(w.level, w.code) for w in ws] == [
        ("concurrency=1", "over_generation"),
        ("concurrency=4", "prompt_token_mismatch"),
        (None, "outside_load"),
    ]
    assert format_warning(ws[0]).startswith("concurrency=1: over_generation: 1 of 1 requests")
    assert format_warning(MeasurementWarning(code="outside_load", message="m")) == "outside_load: m"


# ---- counting output tokens with a tokenizer --------------------------------------------


class _FakeCounter:
    """The fake server's tokenizer (one token per word or mark) plus one BOS, like /tokenize."""

    def __init__(self) -> None:
        self.calls = 0

    async def count(self, texts: Sequence[str]) -> list[int]:
        self.calls += 1
        return [count_tokens(t) + 1 for t in texts]

    async def aclose(self) -> None:
        pass


class _BrokenCounter(_FakeCounter):
    async def count(self, texts: Sequence[str]) -> list[int]:
        raise BenchmarkError("no /tokenize here")


def _streamed(events: list[str], usage: int | None) -> RequestRecord:
    return RequestRecord(
        sent_s=0.0,
        chunk_times_s=tuple(0.1 + 0.01 * i for i in range(len(events))),
        done_s=0.2,
        output_tokens=len(events) if usage is None else usage,
        output_tokens_estimated=usage is None,
        max_tokens=32,
        event_texts=tuple(events),
    )


def _events(tokens: int, per_event: int) -> list[str]:
    toks = [TOKENS[i % len(TOKENS)] for i in range(tokens)]
    return ["".join(toks[i : i + per_event]) for i in range(0, tokens, per_event)]


def test_counting_without_usage_uses_the_tokenizer_and_excludes_bos() -> None:
    counter = _FakeCounter()
    (r,) = asyncio.run(count_output_tokens([_streamed(_events(32, 4), None)], counter))
    assert r.output_tokens == 32 and r.output_tokens_estimated
    assert r.event_tokens == (4,) * 8 and r.event_texts is None
    assert "event_texts" not in r.model_dump()


def test_counting_with_usage_keeps_the_server_count_and_fills_event_tokens() -> None:
    one, four = _streamed(_events(8, 1), 8), _streamed(_events(32, 4), 32)
    counter = _FakeCounter()
    a, b = asyncio.run(count_output_tokens([one, four], counter))
    assert (a.output_tokens, a.event_tokens, a.output_tokens_estimated) == (8, None, False)
    assert (b.output_tokens, b.event_tokens, b.output_tokens_estimated) == (32, (4,) * 8, False)


def test_counting_needs_no_tokenizer_call_when_usage_matches_the_events() -> None:
    counter = _FakeCounter()
    (r,) = asyncio.run(count_output_tokens([_streamed(_events(8, 1), 8)], counter))
    assert counter.calls == 0 and r.output_tokens == 8 and r.event_texts is None


@pytest.mark.parametrize("counter", [None, _BrokenCounter()])
def test_without_a_counter_the_event_count_stays_marked_estimated(
    counter: _FakeCounter | None,
) -> None:
    (r,) = asyncio.run(count_output_tokens([_streamed(_events(32, 4), None)], counter))
    assert r.output_tokens == 8 and r.output_tokens_estimated and r.event_texts is None
    m = summarize(LEVEL, [r])
    assert "estimated_token_counts" in _codes(m)
