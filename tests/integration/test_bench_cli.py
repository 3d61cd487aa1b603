"""``servetune bench`` as a tool: its files, SLOs, bad options and hung endpoints (fake server)."""

from __future__ import annotations

import contextlib
import csv
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from servetune.bench.results import RECORD_FIELDS
from servetune.modelgen import ModelFiles
from tests.integration.study_helpers import fake_server_process
from tests.integration.test_cli import assert_clean_error, cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    """The fake streaming server as its own process (2 ms to the first token, then 1 ms apart)."""
    with fake_server_process("--first-token-delay-ms", "2", "--inter-token-delay-ms", "1") as url:
        yield url


def _args(url: str, *extra: str) -> list[str]:
    return ["bench", url, "--input-tokens", "12", "--output-tokens", "4", *extra]


def test_output_and_records_files_hold_the_settings_and_every_request(
    tmp_path: Path, fake_url: str
) -> None:
    out_json, rec_jsonl, rec_csv = tmp_path / "run.json", tmp_path / "r.jsonl", tmp_path / "r.csv"
    args = _args(fake_url, "--concurrency", "1,2", "--num-requests", "5", "--warmup", "1")
    args += ["--slo", "ttft_ms:p99:60000", "--slo", "e2e_latency_ms:p50:60000"]
    args += ["--api-key", "sk-secret", "--header", "X-Team: infra", "--seed", "7"]
    before = datetime.now(UTC)
    out = cli(tmp_path, *args, "--output", str(out_json), "--records", str(rec_jsonl))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out_json.read_text())
    assert doc["servetune_version"] and doc["servetune_version"] != "unknown"
    created = datetime.fromisoformat(doc["created_at"])
    assert created.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= created <= datetime.now(UTC)
    settings = doc["settings"]
    assert settings["url"] == fake_url and settings["model"] == "fake-model"
    wl = settings["workload"]
    assert (wl["concurrency"], wl["num_requests"], wl["warmup_requests"]) == ([1, 2], 5, 1)
    assert (wl["input_tokens"], wl["output_tokens"], wl["seed"]) == (12, 4, 7)
    assert wl["request_timeout_s"] == 120.0
    assert [s["metric"] for s in settings["slos"]] == ["ttft_ms", "e2e_latency_ms"]
    assert settings["header_names"] == ["X-Team"] and settings["api_key_given"] is True
    assert settings["prompt_counting"] == "server"
    assert "sk-secret" not in out_json.read_text() and "infra" not in out_json.read_text()
    assert doc["feasible"] is True
    assert [lv["level"]["concurrency"] for lv in doc["levels"]] == [1, 2]
    for lv in doc["levels"]:
        assert (lv["completed"], lv["failed"], lv["warmup"]) == (5, 0, 1)
        assert lv["goodput_requests_per_s"] == lv["requests_per_s"] > 0
        assert lv["input_tokens_per_s"] == pytest.approx(12 * lv["requests_per_s"])
        assert lv["total_tokens_per_s"] == pytest.approx(16 * lv["requests_per_s"])
        assert lv["ttft_ms"]["mean"] > 0 and lv["client"]["processes"] == 1
        assert len(lv["slo_checks"]) == 3  # the error rate and the two SLOs
    rows = [json.loads(line) for line in rec_jsonl.read_text().splitlines()]
    assert len(rows) == 2 * (1 + 5)
    assert list(rows[0]) == list(RECORD_FIELDS)
    assert [(r["level"], r["warmup"]) for r in rows[:6]] == [(1.0, True)] + [(1.0, False)] * 5
    assert all(r["ok"] and r["output_tokens"] == 4 and len(r["itl_ms"]) == 3 for r in rows)
    assert all(r["prompt_tokens"] == r["expected_prompt_tokens"] == 12 for r in rows)

    out = cli(tmp_path, *_args(fake_url, "--num-requests", "3"), "--records", str(rec_csv))
    assert out.returncode == 0, out.stderr
    with rec_csv.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 + 3 and list(table[0]) == list(RECORD_FIELDS)
    assert all(r["ok"] == "True" and len(r["itl_ms"].split(";")) == 3 for r in table)


def test_slos_make_goodput_differ_from_throughput_and_misses_are_shown(
    tmp_path: Path, fake_url: str
) -> None:
    args = _args(fake_url, "--num-requests", "4", "--slo", "e2e_latency_ms:p50:0.001", "--json")
    out = cli(tmp_path, *args)
    assert out.returncode == 0, out.stderr
    (level,) = json.loads(out.stdout)
    assert level["completed"] == 4 and level["requests_per_s"] > 0
    assert level["goodput_requests_per_s"] == 0.0
    table = cli(tmp_path, *args[:-1], env={"COLUMNS": "80"})
    assert table.returncode == 0, table.stderr
    assert "good/s" in table.stdout.splitlines()[0]
    assert "SLO missed: e2e_latency_ms p50 ≤ 0.001 ms at concurrency=1" in table.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--slo", "ttft_ms:p99"], "--slo: expected METRIC:PERCENTILE:MAX_MS"),
        (["--slo", "ttft:p99:500"], "--slo: metric 'ttft' is not one of ttft_ms"),
        (["--slo", "ttft_ms:p42:500"], "--slo: percentile 'p42' is not one of mean"),
        (["--slo", "ttft_ms:p99:-1"], "--slo: the bound must be a positive number"),
        (["--header", "NoColon"], "--header: expected NAME:VALUE"),
        (["--records", "out.txt"], "--records: out.txt: the suffix picks the format"),
        (["--output", "/no/such/dir/x.json"], "--output: directory /no/such/dir does not exist"),
        (["--request-timeout-s", "0"], "--request-timeout-s"),
        (["--processes", "0"], "--processes must be ≥ 1"),
    ],
)
def test_bad_bench_options_are_refused_before_anything_runs(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    out = cli(tmp_path, "bench", "http://127.0.0.1:9", *args, timeout=60)
    assert_clean_error(out, 2, needle)
    assert not list(tmp_path.glob("out.txt"))


def test_help_shows_defaults_and_what_ttft_includes(tmp_path: Path) -> None:
    out = cli(tmp_path, "bench", "--help", env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for default in ("[default: 128]", "[default: 64]", "[default: 120.0]", "[default: 2]"):
        assert default in text, default
    assert "(default: the first of /v1/models)" in text
    assert "(default: 1)" in text and "(default: 16)" in text  # --concurrency, --num-requests
    assert "TTFT is measured from just before the request is written" in text


@contextlib.contextmanager
def _hung_endpoint() -> Iterator[str]:
    """A URL whose socket listens (the kernel completes connects) and never reads or answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_hung_endpoint_names_the_reason_and_stops_early(
    tmp_path: Path, tiny_model: ModelFiles
) -> None:
    with _hung_endpoint() as url:
        listing = cli(tmp_path, "bench", url, "--request-timeout-s", "0.5", timeout=60)
    assert_clean_error(
        listing, 1, f"cannot list models at {url}/v1/models: ReadTimeout: connected, but no "
    )
    args = ["--model", "m", "--request-timeout-s", "0.5", "--num-requests", "16"]
    args += ["--tokenizer", str(tiny_model.tokenizer_dir)]
    with _hung_endpoint() as url:
        out = cli(tmp_path, "bench", url, *args, "--json", timeout=60)
    assert out.returncode == 1, out.stderr
    (level,) = json.loads(out.stdout)
    # 2 warm-ups and 1 measured request timed out the same way; the other 15 were never sent.
    assert (level["completed"], level["failed"]) == (0, 1)
    assert level["error_examples"] == {"timeout": "no complete response within 0.5 s"}
    assert "no request succeeded" in out.stderr
    with _hung_endpoint() as url:
        table = cli(tmp_path, "bench", url, *args, timeout=60)
    assert table.returncode == 1, table.stderr
    text = " ".join(table.stdout.split())
    assert "concurrency=1: stopped early, the first 3 requests all failed with timeout" in text


@pytest.mark.parametrize("url", ["notaurl", "ftp://x", "http://", "127.0.0.1:8080"])
def test_a_url_that_is_no_http_address_is_invalid_input(tmp_path: Path, url: str) -> None:
    out = cli(tmp_path, "bench", url)
    assert_clean_error(out, 2, "is not an http(s) address", "e.g. http://127.0.0.1:8080")
