"""Unit tests of ``servetune bench``'s option parsers and files (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from servetune.bench.builtin import BenchRun, ClientLoad, LevelResult
from servetune.bench.http_errors import describe
from servetune.bench.results import (
    RECORD_FIELDS,
    parse_header,
    parse_slo,
    record_rows,
    records_format,
    write_atomically,
)
from servetune.core.metrics import LoadLevel, RequestRecord, summarize
from servetune.core.slo import Slo


def test_slo_options_parse_to_slos() -> None:
    assert parse_slo("ttft_ms:p99:500") == Slo(metric="ttft_ms", percentile="p99", max_ms=500)
    assert parse_slo(" tpot_ms : mean : 12.5 ") == Slo(
        metric="tpot_ms", percentile="mean", max_ms=12.5
    )
    for bad, needle in [
        ("ttft_ms:p99", "METRIC:PERCENTILE:MAX_MS"),
        ("ttft_ms:p99:500:1", "METRIC:PERCENTILE:MAX_MS"),
        ("latency:p99:5", "metric 'latency'"),
        ("ttft_ms:p100:5", "percentile 'p100'"),
        ("ttft_ms:p99:0", "positive"),
        ("ttft_ms:p99:inf", "positive"),
        ("ttft_ms:p99:nan", "positive"),
        ("ttft_ms:p99:fast", "positive"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_slo(bad)


def test_header_options_and_record_file_suffixes() -> None:
    assert parse_header("X-Team: infra") == ("X-Team", "infra")
    assert parse_header("Authorization:Bearer a:b") == ("Authorization", "Bearer a:b")
    for bad in ("NoColon", ": value", "Bad Name: v"):
        with pytest.raises(ValueError, match="NAME:VALUE"):
            parse_header(bad)
    assert records_format(Path("r.jsonl")) == "jsonl"
    assert records_format(Path("r.CSV")) == "csv"
    with pytest.raises(ValueError, match=r"\.jsonl .* or \.csv"):
        records_format(Path("r.json"))


def test_record_rows_carry_every_request_with_offsets_from_the_level_start() -> None:
    level = LoadLevel(concurrency=2)
    records = [
        RequestRecord(sent_s=10.0, chunk_times_s=(10.1, 10.2), done_s=10.2, output_tokens=2),
        RequestRecord(sent_s=10.5, done_s=11.5, error_kind="timeout", error="no answer"),
    ]
    load = ClientLoad(loop_lag_p99_ms=0.1, loop_lag_max_ms=0.2, cpu_fraction=0.3)
    run = BenchRun("m", "server", 1, [LevelResult(level, records, summarize(level, records), load)])
    rows = list(record_rows(run))
    assert [list(r) for r in rows] == [list(RECORD_FIELDS)] * 2
    assert rows[0]["sent_offset_s"] == 0.0 and rows[1]["sent_offset_s"] == 0.5
    assert rows[0]["ttft_ms"] == pytest.approx(100.0) and rows[0]["itl_ms"] == pytest.approx(
        [100.0]
    )
    assert (rows[1]["ok"], rows[1]["error_kind"], rows[1]["ttft_ms"]) == (False, "timeout", None)


def test_client_load_says_when_the_client_was_the_bottleneck() -> None:
    calm = ClientLoad(loop_lag_p99_ms=0.5, loop_lag_max_ms=3.0, cpu_fraction=0.4)
    assert not calm.saturated
    assert ClientLoad(loop_lag_p99_ms=0.5, loop_lag_max_ms=1, cpu_fraction=0.95).saturated
    assert ClientLoad(loop_lag_p99_ms=25.0, loop_lag_max_ms=40, cpu_fraction=0.2).saturated
    other = ClientLoad(2.0, 9.0, 0.7, stopped_early="why", cpu_s=1.5)
    merged = ClientLoad.merge([calm, other])
    assert merged == ClientLoad(2.0, 9.0, 0.7, processes=2, stopped_early="why", cpu_s=1.5)
    assert merged.metrics_fields() == {"client_loop_lag_p99_ms": 2.0, "client_cpu_fraction": 0.7}


def test_http_errors_without_a_message_get_a_named_reason() -> None:
    import httpx

    assert (
        describe(httpx.ReadTimeout(""))
        == "ReadTimeout: connected, but no answer within the timeout"
    )
    assert (
        describe(httpx.ReadTimeout(""), 10) == "ReadTimeout: connected, but no answer within 10 s"
    )
    assert describe(httpx.ConnectError("refused\n twice")) == "ConnectError: refused twice"
    assert describe(RuntimeError()) == "RuntimeError: no detail given"


def test_files_are_written_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    write_atomically(path, "{}\n")
    assert path.read_text() == "{}\n"
    with pytest.raises(OSError):
        write_atomically(tmp_path / "missing" / "out.json", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_client_processes_are_chosen_by_the_load_up_to_the_cores() -> None:
    import os

    from servetune.bench.builtin import BuiltinClient
    from servetune.core.spec import Workload

    cores = len(os.sched_getaffinity(0))

    def wl(**kw: object) -> Workload:
        return Workload.model_validate({"num_requests": 10, **kw})

    auto = BuiltinClient()
    assert auto.processes_for(wl(concurrency=[1, 16, 128])) == 1
    assert auto.processes_for(wl(concurrency=[1, 256])) == min(2, cores)
    assert auto.processes_for(wl(concurrency=[10_000])) == cores
    assert auto.processes_for(wl(request_rates_per_s=[100.0])) == 1
    assert auto.processes_for(wl(request_rates_per_s=[1000.0])) == min(3, cores)
    assert BuiltinClient(processes=4).processes_for(wl(concurrency=[1])) == 4
    with pytest.raises(ValueError, match="processes must be ≥ 1"):
        BuiltinClient(processes=0)
