"""The built-in benchmark client against the in-repo fake streaming server (real sockets, HTTP)."""

from __future__ import annotations

import asyncio
import math
import random
import socket
import subprocess
import sys
from typing import Any

import httpx
import pytest

from servetune.bench.builtin import BenchProgress, BuiltinClient, bench_endpoint
from servetune.bench.prompts import Prompt, PromptBuilder
from servetune.core.metrics import LoadLevel, RequestRecord, ServingMetrics, summarize
from servetune.core.slo import Slo
from servetune.core.spec import Workload
from servetune.engines.base import Endpoint
from servetune.errors import BenchmarkError
from servetune.testing.fake_server import (
    CHAT_TEMPLATE_TOKENS_PER_MESSAGE,
    FakeServer,
    FakeServerOptions,
    FakeServerStats,
    count_tokens,
)

pytestmark = pytest.mark.integration

# Token counts as the fake server counts them (one per word or punctuation mark, plus BOS).
PROMPTS = [Prompt(f"{i}. words of prompt number {i}", 8) for i in range(200)]


def workload(**kw: Any) -> Workload:
    base: dict[str, Any] = {"input_tokens": 8, "output_tokens": 8, "warmup_requests": 0}
    if "concurrency" not in kw and "request_rates_per_s" not in kw:
        base["concurrency"] = [1]
    if "num_requests" not in kw and "duration_s" not in kw:
        base["num_requests"] = 4
    return Workload(**(base | kw))


def bench(
    wl: Workload,
    options: FakeServerOptions | None = None,
    prompts: list[Prompt] | None = None,
    **run_kw: Any,
) -> tuple[list[tuple[LoadLevel, list[RequestRecord]]], FakeServerStats]:
    """Run the client against a fresh fake server; return its results and the server's stats."""

    async def go() -> tuple[list[tuple[LoadLevel, list[RequestRecord]]], FakeServerStats]:
        server = FakeServer(options)
        async with server as url:
            results = await BuiltinClient().run(
                Endpoint(url, "fake-model"), wl, prompts or PROMPTS, **run_kw
            )
        return results, server.stats

    return asyncio.run(go())


def metrics(records: list[RequestRecord], level: LoadLevel | None = None) -> ServingMetrics:
    return summarize(level or LoadLevel(concurrency=1), records)


def test_concurrency_mode_sends_warmups_then_measured_requests_with_n_in_flight() -> None:
    wl = workload(concurrency=[1, 3], num_requests=7, warmup_requests=2)
    results, stats = bench(wl, FakeServerOptions(first_token_delay_ms=20, inter_token_delay_ms=1))
    assert [lv for lv, _ in results] == [LoadLevel(concurrency=1), LoadLevel(concurrency=3)]
    for _, records in results:
        assert [r.warmup for r in records] == [True] * 2 + [False] * 7
        assert all(r.ok and r.output_tokens == 8 and len(r.chunk_times_s) == 8 for r in records)
        assert all(r.prompt_tokens == r.expected_prompt_tokens == 8 for r in records)
    assert stats.generation_requests == 18
    assert len(stats.prompt_starts) == 18, (
        "every request, warm-ups and levels included, has its own prompt"
    )
    assert stats.max_in_flight == 3
    # Keep-alive: one connection per request in flight, opened before the measured phase of
    # each level (an unmeasured GET /v1/models on each) and reused by every later request.
    assert stats.connections == 3
    assert stats.by_path["/v1/models"] == 1 + 3


def test_concurrency_mode_with_duration_stops_issuing_at_the_deadline_then_lets_all_finish() -> (
    None
):
    wl = workload(concurrency=[2], duration_s=0.6)
    results, _ = bench(wl, FakeServerOptions(first_token_delay_ms=40, inter_token_delay_ms=5))
    records = results[0][1]
    m = metrics(records)
    # Each request takes ~75 ms with 2 in flight: about 16 in 0.6 s.
    assert 8 <= m.completed <= 20 and m.failed == 0
    first = min(r.sent_s for r in records)
    assert max(r.sent_s for r in records) - first < 0.6
    assert max(r.done_s or 0 for r in records) - first > 0.6, (
        "in-flight requests were not waited for"
    )


def test_rate_mode_issues_on_a_seeded_poisson_process_with_no_cap() -> None:
    rate = 40.0
    wl = workload(request_rates_per_s=[rate], num_requests=30, warmup_requests=1, seed=7)
    # Requests last ~300 ms, far longer than the mean gap of 25 ms: many must overlap.
    results, stats = bench(wl, FakeServerOptions(first_token_delay_ms=300))
    records = results[0][1]
    assert [r.warmup for r in records] == [True] + [False] * 30
    measured = records[1:]
    assert all(r.ok for r in measured)
    assert stats.max_in_flight >= 6
    sent = [r.sent_s - measured[0].sent_s for r in measured]
    rng = random.Random("servetune-arrivals:7:0")
    expected = [0.0]
    for _ in range(29):
        expected.append(expected[-1] + rng.expovariate(rate))
    # Same seed, same arrival schedule (within scheduling jitter on a busy machine).
    assert max(abs(a - b) for a, b in zip(sent, expected, strict=True)) < 0.08
    assert 0.3 < expected[-1] < 2.0  # the schedule itself is a plausible Poisson draw


def test_rate_mode_with_duration_issues_only_within_the_window() -> None:
    wl = workload(request_rates_per_s=[50.0], duration_s=0.5)
    results, _ = bench(wl, FakeServerOptions(first_token_delay_ms=10))
    records = results[0][1]
    assert 10 <= len(records) <= 45
    first = min(r.sent_s for r in records)
    assert max(r.sent_s for r in records) - first < 0.5
    assert all(r.ok for r in records)


def test_failures_are_counted_by_kind_and_drops_before_the_first_byte_are_retried() -> None:
    # Concurrency 1 makes server ordinals predictable: request k (1-based) is ordinal k until the
    # retry of ordinal 4 (dropped before the first byte) shifts later ones by one.
    options = FakeServerOptions(
        fail_requests=frozenset({2}),
        drop_requests=frozenset({4}),
        drop_mid_requests=frozenset({6}),
        short_requests=frozenset({8}),
    )
    results, stats = bench(workload(num_requests=9), options)
    records = results[0][1]
    assert stats.generation_requests == 10
    kinds = [r.error_kind for r in records]
    assert kinds == [None, "http_500", None, None, "read", None, "short_output", None, None]
    assert [r.retries for r in records] == [0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert records[4].chunk_times_s and records[4].done_s is not None  # dropped mid-stream
    assert records[6].output_tokens == 4  # half of max_tokens, from usage
    m = metrics(records)
    assert (m.completed, m.failed, m.retried) == (6, 3, 1)
    assert m.failed_by_kind == {"http_500": 1, "read": 1, "short_output": 1}


def test_a_request_dropped_twice_before_the_first_byte_fails_as_read_after_one_retry() -> None:
    results, stats = bench(
        workload(num_requests=1), FakeServerOptions(drop_requests=frozenset({1, 2}))
    )
    (record,) = results[0][1]
    assert (record.error_kind, record.retries, record.ok) == ("read", 1, False)
    assert stats.generation_requests == 2


def test_nothing_listening_is_a_connect_error_after_one_retry() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wl = workload(num_requests=2)
    results = asyncio.run(
        BuiltinClient().run(Endpoint(f"http://127.0.0.1:{port}", "m"), wl, PROMPTS)
    )
    records = results[0][1]
    assert [(r.error_kind, r.retries) for r in records] == [("connect", 1), ("connect", 1)]
    assert metrics(records).failed_by_kind == {"connect": 2}


def test_a_slow_server_is_a_timeout() -> None:
    wl = workload(num_requests=1, request_timeout_s=0.2)
    results, _ = bench(wl, FakeServerOptions(first_token_delay_ms=2000))
    (record,) = results[0][1]
    assert record.error_kind == "timeout"
    assert record.retries == 0
    assert record.done_s is not None and 0.18 < record.done_s - record.sent_s < 1.0


@pytest.mark.parametrize("line_ending", ["lf", "crlf", "cr"])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_sse_events_split_across_writes_are_parsed_right(line_ending: str, api: str) -> None:
    options = FakeServerOptions(split_events=True, line_ending=line_ending)  # type: ignore[arg-type]
    results, _ = bench(workload(api=api, num_requests=3, output_tokens=12), options)
    for r in results[0][1]:
        assert r.ok, r.error
        assert len(r.chunk_times_s) == 12 and r.output_tokens == 12
        assert r.prompt_tokens is not None


def test_without_usage_output_tokens_are_the_content_chunks() -> None:
    results, _ = bench(workload(num_requests=2), FakeServerOptions(send_usage=False))
    for r in results[0][1]:
        assert r.ok and r.output_tokens == 8 and r.prompt_tokens is None


def test_short_output_without_usage_is_seen_from_finish_reason() -> None:
    results, _ = bench(
        workload(num_requests=1), FakeServerOptions(send_usage=False, short_requests=frozenset({1}))
    )
    (record,) = results[0][1]
    assert record.error_kind == "short_output" and record.output_tokens == 4


def test_ttft_and_tpot_match_the_server_delays() -> None:
    wl = workload(concurrency=[1, 4], num_requests=8, output_tokens=10)
    results, _ = bench(wl, FakeServerOptions(first_token_delay_ms=100, inter_token_delay_ms=10))
    for level, records in results:
        m = summarize(level, records)
        assert m.completed == 8
        assert m.ttft_ms is not None and m.tpot_ms is not None and m.itl_ms is not None
        assert 100 <= m.ttft_ms.p50 < 140, m.ttft_ms
        assert 100 <= m.ttft_ms.max < 250, m.ttft_ms
        assert 9 <= m.tpot_ms.mean < 12.5, m.tpot_ms
        assert m.itl_ms.count == 8 * 9
        assert m.e2e_latency_ms is not None and 190 <= m.e2e_latency_ms.p50 < 230


def test_chat_and_completions_apis_both_stream_and_report_prompt_tokens() -> None:
    async def go() -> dict[str, list[RequestRecord]]:
        out = {}
        async with FakeServer() as url:
            for api in ("completions", "chat"):
                wl = workload(api=api, input_tokens=24, num_requests=3)
                builder = PromptBuilder.from_server(url, 24)
                try:
                    results = await BuiltinClient().run(Endpoint(url, "fake-model"), wl, builder)
                finally:
                    await builder.aclose()
                out[api] = results[0][1]
        return out

    out = asyncio.run(go())
    for r in out["completions"]:
        assert r.ok and r.prompt_tokens == 24 and r.expected_prompt_tokens == 24
    for r in out["chat"]:
        # The chat template's tokens come on top; the client records no expectation for chat.
        assert r.ok and r.expected_prompt_tokens is None
        assert r.prompt_tokens == 24 + CHAT_TEMPLATE_TOKENS_PER_MESSAGE
    assert metrics(out["completions"]).prompt_token_mismatches == 0


def test_prompts_counted_through_the_server_tokenize_endpoint_are_exact_and_distinct() -> None:
    async def go() -> list[Prompt]:
        async with FakeServer() as url:
            builder = PromptBuilder.from_server(url, 40, seed=3)
            try:
                return await builder.build(12)
            finally:
                await builder.aclose()

    prompts = asyncio.run(go())
    assert all(count_tokens(p.text) + 1 == 40 == p.token_count for p in prompts)
    assert len({p.text.split()[0] for p in prompts}) == 12


def test_progress_is_reported_per_finished_request() -> None:
    seen: list[BenchProgress] = []
    wl = workload(concurrency=[2], num_requests=5, warmup_requests=2)
    bench(wl, FakeServerOptions(fail_requests=frozenset({4})), on_progress=seen.append)
    assert [(p.phase, p.done, p.total) for p in seen] == (
        [("warmup", 1, 2), ("warmup", 2, 2)] + [("measure", i, 5) for i in range(1, 6)]
    )
    assert seen[-1].failed == 1


def test_bench_endpoint_reads_the_model_and_counts_tokens_through_the_server() -> None:
    async def go() -> list[ServingMetrics]:
        async with FakeServer(FakeServerOptions(model="served-name")) as url:
            wl = workload(concurrency=[1, 2], num_requests=4, input_tokens=16, warmup_requests=1)
            run = await bench_endpoint(url, None, wl, None)
            assert (run.model, run.prompt_counting) == ("served-name", "server")
            return [lv.metrics for lv in run.levels]

    ms = asyncio.run(go())
    assert [m.level.value for m in ms] == [1.0, 2.0]
    for m in ms:
        assert (m.completed, m.failed, m.warmup) == (4, 0, 1)
        assert m.mean_prompt_tokens == 16 and m.prompt_token_mismatches == 0
        assert m.requests_per_s > 0 and m.output_tokens_per_s > 0


def test_fake_server_runs_as_a_separate_process_with_timings_on_the_clients_clock() -> None:
    argv = [sys.executable, "-m", "servetune.testing.fake_server", "--port", "0"]
    argv += ["--first-token-delay-ms", "30", "--record-timings"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)  # noqa: S603 - fixed argv
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        wl = workload(num_requests=3)
        results = asyncio.run(BuiltinClient().run(Endpoint(url, "fake-model"), wl, PROMPTS))
        records = results[0][1]
        m = metrics(records)
        assert m.completed == 3
        assert m.ttft_ms is not None and 30 <= m.ttft_ms.p50 < 80
        timings = httpx.get(url + "/stats").json()["timings"]
        assert [t["prompt_start"] for t in timings] == [p.text for p in PROMPTS[:3]]
        for r, t in zip(records, timings, strict=True):
            # The server process stamps the same monotonic clock as the client.
            assert r.sent_s < t["received_s"] < t["first_token_s"] < r.chunk_times_s[0]
            assert 0.029 < t["first_token_s"] - t["received_s"] < 0.06
        assert httpx.get(url + "/stats").json()["timings"] == []  # read once, then forgotten
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def test_a_prompt_builder_for_another_length_is_refused() -> None:
    from servetune.errors import BenchmarkError

    async def go() -> None:
        async with FakeServer() as url:
            builder = PromptBuilder.from_server(url, 99)
            try:
                await BuiltinClient().run(Endpoint(url, "m"), workload(), builder)
            finally:
                await builder.aclose()

    with pytest.raises(BenchmarkError, match="99-token prompts"):
        asyncio.run(go())


def test_the_issuing_loop_keeps_up_with_a_high_rate() -> None:
    # 300 requests at 200/s against an instant server: the last one goes out on schedule.
    wl = workload(request_rates_per_s=[200.0], num_requests=300)
    results, _ = bench(wl)
    records = results[0][1]
    span = max(r.sent_s for r in records) - min(r.sent_s for r in records)
    rng = random.Random("servetune-arrivals:0:0")
    expected = sum(rng.expovariate(200.0) for _ in range(299))
    assert all(r.ok for r in records)
    assert math.isclose(span, expected, rel_tol=0.15), (span, expected)


def test_a_base_url_path_prefix_is_kept_and_http_errors_are_counted_by_status() -> None:
    async def go() -> list[RequestRecord]:
        async with FakeServer() as url:
            wl = workload(num_requests=2)
            results = await BuiltinClient().run(Endpoint(url + "/prefix/", "m"), wl, PROMPTS)
        return results[0][1]

    records = asyncio.run(go())
    # The fake server only serves /v1/..., so /prefix/v1/completions is a 404, not retried.
    assert [(r.error_kind, r.retries) for r in records] == [("http_404", 0)] * 2
    assert records[0].error is not None and "/prefix/v1/completions" in records[0].error


# ---- connections, client processes, hung endpoints, bench_endpoint's options -----------------


def test_keep_alive_connections_are_opened_before_the_clock_and_reused() -> None:
    # 4 in flight, 40 requests: the server sees 4 connections, each opened by an unmeasured
    # GET /v1/models before the measured phase, so no measured request pays a connect.
    wl = workload(concurrency=[4], num_requests=40, warmup_requests=0)
    results, stats = bench(wl)
    records = results[0][1]
    assert len(records) == 40 and all(r.ok and r.retries == 0 for r in records)
    assert stats.connections == 4
    assert stats.by_path == {"/v1/models": 4, "/v1/completions": 40}


def test_a_server_closing_reused_connections_is_retried_on_a_new_one_and_counted_once() -> None:
    # The server closes every connection on its second request without a byte (it announced
    # keep-alive): every measured request goes to a pooled connection first, fails before the
    # first byte, and is re-sent once on a new connection, which then serves it.
    options = FakeServerOptions(max_requests_per_connection=1)
    wl = workload(concurrency=[2], num_requests=10, warmup_requests=0)
    results, stats = bench(wl, options)
    records = results[0][1]
    assert len(records) == 10
    assert all(r.ok and r.retries == 1 for r in records)
    m = metrics(records, LoadLevel(concurrency=2))
    assert (m.completed, m.failed, m.retried) == (10, 0, 10)
    assert stats.generation_requests == 10  # each request served once: never counted twice
    assert stats.dropped_on_reuse == 10
    assert len(stats.prompt_starts) == 10


def _hung_endpoint() -> socket.socket:
    """A socket that listens (the kernel completes every connect) and never reads or answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def test_a_hung_endpoint_times_out_with_a_named_reason_and_the_level_stops_early() -> None:
    wl = workload(concurrency=[1], num_requests=16, warmup_requests=2, request_timeout_s=0.3)
    with _hung_endpoint() as s:
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        client = BuiltinClient()
        results = asyncio.run(client.run(Endpoint(url, "m"), wl, PROMPTS))
    records = results[0][1]
    # Two warm-ups and one measured request time out the same way; then no more are issued.
    assert [(r.warmup, r.error_kind) for r in records] == [
        (True, "timeout"),
        (True, "timeout"),
        (False, "timeout"),
    ]
    assert all(r.error == "no complete response within 0.3 s" for r in records)
    (load,) = client.client_load
    assert load.stopped_early is not None
    assert "first 3 requests all failed with timeout" in load.stopped_early
    m = metrics(records)
    assert (m.completed, m.failed, m.error_rate) == (0, 1, 1.0)


def test_a_level_with_successes_or_mixed_failures_is_not_stopped_early() -> None:
    client = BuiltinClient()

    async def go(options: FakeServerOptions) -> list[RequestRecord]:
        async with FakeServer(options) as url:
            wl = workload(num_requests=6)
            return (await client.run(Endpoint(url, "fake-model"), wl, PROMPTS))[0][1]

    # http_500 twice, then a drop (read): two kinds, so every request is still sent.
    mixed = asyncio.run(go(FakeServerOptions(fail_requests=frozenset({1, 2, 5, 6}))))
    assert len(mixed) == 6 and client.client_load[0].stopped_early is None
    assert [r.error_kind for r in mixed] == ["http_500", "http_500", None, None] + ["http_500"] * 2
    every = asyncio.run(go(FakeServerOptions(fail_requests=frozenset(range(1, 20)))))
    assert [r.error_kind for r in every] == ["http_500"] * 3
    assert client.client_load[0].stopped_early is not None


def test_bench_endpoint_names_why_a_hung_server_cannot_list_its_models() -> None:
    wl = workload(request_timeout_s=0.3)
    with _hung_endpoint() as s:
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(BenchmarkError) as e:
            asyncio.run(bench_endpoint(url, None, wl, None))
        assert str(e.value) == (
            f"cannot list models at {url}/v1/models: ReadTimeout: connected, but no answer "
            "within 0.3 s; the server accepts connections but does not answer (is it still "
            "loading?)"
        )
        with pytest.raises(BenchmarkError, match=r"/tokenize: ReadTimeout: connected, but no"):
            asyncio.run(bench_endpoint(url, "m", wl, None))


def test_bench_endpoint_says_nothing_answers_at_a_closed_port() -> None:
    """No server: the fix is to start it or correct the URL (--model would not help)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
        with pytest.raises(BenchmarkError) as e:
            asyncio.run(bench_endpoint(url, None, workload(request_timeout_s=2), None))
    message = str(e.value)
    assert message.startswith(f"cannot list models at {url}/v1/models: ConnectError")
    assert "is the server running, and is the URL right?" in message
    assert "--model" not in message


def test_requests_shared_by_client_processes_are_merged_in_send_order() -> None:
    async def go() -> tuple[list[RequestRecord], FakeServerStats, BuiltinClient]:
        server = FakeServer(FakeServerOptions(first_token_delay_ms=5, inter_token_delay_ms=1))
        client = BuiltinClient(processes=2)
        async with server as url:
            wl = workload(concurrency=[5], num_requests=21, warmup_requests=2)
            results = await client.run(Endpoint(url, "fake-model"), wl, PROMPTS)
        return results[0][1], server.stats, client

    records, stats, client = asyncio.run(go())
    assert [r.warmup for r in records] == [True] * 2 + [False] * 21
    measured = [r.sent_s for r in records if not r.warmup]
    assert measured == sorted(measured)
    assert all(r.ok for r in records)
    assert stats.generation_requests == 23 and len(stats.prompt_starts) == 23
    assert stats.max_in_flight <= 5 and stats.connections == 5  # 3 + 2: a pool per process
    assert client.client_load[0].processes == 2


def test_bench_endpoint_sends_the_api_key_and_headers_and_applies_slos_to_goodput() -> None:
    async def go(slos: list[Slo]) -> tuple[ServingMetrics, FakeServerStats]:
        server = FakeServer(FakeServerOptions(first_token_delay_ms=2))
        async with server as url:
            run = await bench_endpoint(
                url,
                None,
                workload(num_requests=5),
                None,
                slos=slos,
                api_key="sk-test",
                headers={"X-Team": "infra", "user-agent": "mine/1"},
            )
        return run.levels[0].metrics, server.stats

    loose, stats = asyncio.run(go([Slo(metric="ttft_ms", percentile="p99", max_ms=60_000)]))
    assert stats.last_generation_headers["authorization"] == "Bearer sk-test"
    assert stats.last_generation_headers["x-team"] == "infra"
    assert stats.last_generation_headers["user-agent"] == "mine/1"
    assert loose.completed == 5 and loose.goodput_requests_per_s == loose.requests_per_s > 0
    tight, _ = asyncio.run(go([Slo(metric="e2e_latency_ms", percentile="p50", max_ms=0.001)]))
    assert tight.completed == 5 and tight.goodput_requests_per_s == 0.0
    assert loose.client_cpu_fraction is not None and loose.client_loop_lag_p99_ms is not None
    assert loose.input_tokens_per_s == pytest.approx(8 * loose.requests_per_s)


def test_without_a_tokenizer_or_tokenize_endpoint_prompts_are_estimated_and_usage_counts() -> None:
    async def go() -> Any:
        async with FakeServer(FakeServerOptions(tokenize=False)) as url:
            return await bench_endpoint(url, None, workload(num_requests=3, input_tokens=20), None)

    run = asyncio.run(go())
    assert run.prompt_counting == "estimated"
    m = run.levels[0].metrics
    assert m.completed == 3
    # The fake server counts words and marks like the estimate: the usage says 20 exactly.
    assert m.mean_prompt_tokens == 20


def test_a_connection_closed_after_done_without_the_body_end_still_completes_the_request() -> None:
    results, stats = bench(workload(num_requests=4), FakeServerOptions(close_after_done=True))
    records = results[0][1]
    assert [r.error_kind for r in records] == [None] * 4
    assert all(r.ok and r.output_tokens == 8 for r in records)
    assert stats.generation_requests == 4 + sum(r.retries for r in records)
