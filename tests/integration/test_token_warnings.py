"""Token accounting and measurement warnings through real sockets: the fake server, the built-in
client and ``servetune bench`` (table and JSON)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from servetune.bench.builtin import bench_endpoint
from servetune.core.metrics import ServingMetrics
from servetune.core.spec import Workload
from servetune.testing.fake_server import FakeServer, FakeServerOptions
from tests.integration.study_helpers import fake_server_process, servetune

pytestmark = pytest.mark.integration


def _bench(options: FakeServerOptions, output_tokens: int = 8, **kw: Any) -> ServingMetrics:
    """One level (concurrency 2, 4 requests) against a fresh fake server; tokens via /tokenize."""
    wl = Workload(
        input_tokens=8,
        output_tokens=output_tokens,
        concurrency=[2],
        num_requests=4,
        warmup_requests=0,
        **kw,
    )

    async def go() -> ServingMetrics:
        async with FakeServer(options) as url:
            run = await bench_endpoint(url, None, wl, None)
        (level,) = run.levels
        return level.metrics

    return asyncio.run(go())


def _codes(m: ServingMetrics) -> list[str]:
    """The token-accounting warnings; ``client_saturated`` is left out because the fake server
    runs in the client's own process and event loop here, so the client's CPU share and loop lag
    include the server's work (tests/integration/test_bench_client.py covers that warning)."""
    return [w.code for w in m.warnings if w.code != "client_saturated"]


@pytest.mark.parametrize("usage", [True, False])
def test_four_tokens_per_event_are_counted_as_32_tokens(usage: bool) -> None:
    # issue 5 item 2: 4 tokens per event, 32 tokens, finish_reason "length"
    opts = FakeServerOptions(tokens_per_event=4, send_usage=usage, inter_token_delay_ms=2)
    m = _bench(opts, output_tokens=32)
    assert (m.completed, m.failed) == (4, 0)
    assert m.mean_output_tokens == 32  # not 8
    assert m.estimated_output_tokens == (0 if usage else 4)
    assert m.output_tokens_per_s == pytest.approx(4 * 32 / m.duration_s)
    assert m.itl_ms is not None and m.itl_ms.count == 4 * 7  # per event
    assert m.itl_per_token_ms is not None and m.itl_per_token_ms.count == 4 * 28  # per token
    # events every 8 ms (4 tokens × 2 ms): per-token ITL ≈ 2 ms, per-event ≈ 8 ms, TPOT ≈ 2 ms
    assert m.itl_per_token_ms.p50 == pytest.approx(m.itl_ms.p50 / 4)
    assert m.tpot_ms is not None and m.tpot_ms.mean < m.itl_ms.mean / 2
    assert m.max_tokens_per_event == 4
    expected = ["multi_token_events"] if usage else ["estimated_token_counts", "multi_token_events"]
    assert _codes(m) == expected


@pytest.mark.parametrize(
    ("scale", "offset", "returned"), [(1.0, 1, 9), (2.0, 0, 16)], ids=["by-one", "2x"]
)
@pytest.mark.parametrize("usage", [True, False])
def test_over_generation_is_flagged_and_not_credited(
    scale: float, offset: int, returned: int, usage: bool
) -> None:
    opts = FakeServerOptions(
        output_tokens_scale=scale, output_tokens_offset=offset, send_usage=usage
    )
    m = _bench(opts)
    assert (m.completed, m.over_generated, m.max_output_tokens) == (4, 4, returned)
    assert m.output_tokens_per_s == pytest.approx(4 * 8 / m.duration_s)  # at most 8 each
    assert m.raw_output_tokens_per_s == pytest.approx(4 * returned / m.duration_s)
    assert _codes(m)[0] == "over_generation"
    assert ("estimated_token_counts" in _codes(m)) is not usage


@pytest.mark.parametrize(("scale", "offset"), [(1.0, -1), (0.5, 0)], ids=["by-one", "half"])
@pytest.mark.parametrize("usage", [True, False])
def test_under_generation_fails_the_requests_and_is_flagged(
    scale: float, offset: int, usage: bool
) -> None:
    opts = FakeServerOptions(
        output_tokens_scale=scale, output_tokens_offset=offset, send_usage=usage
    )
    m = _bench(opts, max_error_rate=1.0)
    returned = round(8 * scale) + offset
    assert (m.completed, m.failed_by_kind) == (0, {"short_output": 4})
    assert (m.under_generated, m.min_output_tokens) == (4, returned)
    assert _codes(m) == ["under_generation"]


def test_an_exact_server_raises_no_warning() -> None:
    m = _bench(FakeServerOptions())
    assert _codes(m) == [] and m.output_tokens_per_s == pytest.approx(m.raw_output_tokens_per_s)


@pytest.fixture
def fake_url() -> Iterator[str]:
    """A fake server process sending 4 tokens per event, no usage, and 2× the tokens asked."""
    with fake_server_process(
        "--tokens-per-event", "4", "--no-usage", "--output-tokens-scale", "2"
    ) as url:
        yield url


def test_bench_table_and_json_carry_the_same_warnings(fake_url: str, tmp_path: Path) -> None:
    args = ["bench", fake_url, "--input-tokens", "8", "--output-tokens", "16"]
    args += ["--concurrency", "2", "--num-requests", "4", "--warmup", "0"]
    table = servetune(tmp_path, *args)
    assert table.returncode == 0, table.stdout + table.stderr
    data = servetune(tmp_path, *args, "--json")
    assert data.returncode == 0, data.stderr
    (level,) = json.loads(data.stdout)
    # two separate runs: the client's own load (client_saturated) may differ between them
    token_warnings = [w for w in level["warnings"] if w["code"] != "client_saturated"]
    codes = [w["code"] for w in token_warnings]
    assert codes == ["over_generation", "estimated_token_counts", "multi_token_events"]
    assert level["mean_output_tokens"] == 32 and level["requested_output_tokens"] == 16
    assert level["output_tokens_per_s"] * 2 == pytest.approx(level["raw_output_tokens_per_s"])
    text = " ".join(table.stdout.split())
    for w in token_warnings:
        line = f"warning {w['level']}: {w['code']}: "
        assert line in text, table.stdout
    assert "returned more than the 16 output tokens asked for (up to 32)" in text
