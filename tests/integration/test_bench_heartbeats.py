"""bench/bench_heartbeats.py as `make bench` runs it: a small simulated fleet on its own Redis.

The figures a reader compares (beats/s, latencies, memory, wrong offlines) come out in the JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_heartbeats.py"


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - argv list of our own script
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_small_fleet_beats_on_time_and_is_never_seen_offline(tmp_path: Path) -> None:
    out = tmp_path / "heartbeats.json"
    done = _bench(
        *("--workers", "12", "--heartbeat-s", "1", "--seconds", "3"),
        *("--burst-s", "0.3", "--poll-s", "0.1", "--processes", "1", "--output", str(out)),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    # 12 workers × 3 beats each in 3 s (staggered phases: each beat is due inside the window)
    assert result["beats"] == 36
    assert result["beats_per_s"] == pytest.approx(12.0)
    assert result["wrongly_offline_workers"] == 0
    assert result["wrongly_offline_sightings"] == 0
    assert result["workers_list_calls"] >= 5
    assert 0 < result["workers_list_p50_ms"] <= result["workers_list_p99_ms"]
    assert 0 < result["beat_p50_ms"] <= result["beat_p99_ms"]
    assert result["max_heartbeat_age_s"] < result["heartbeat_ttl_s"]
    assert result["burst_beats_per_s"] > 0
    # every worker holds info + heartbeat + GPU samples of 8 GPUs; the projection caps the history
    per_worker = result["per_worker_kib"]
    assert per_worker["info"] > 1 and per_worker["heartbeat"] > 1 and per_worker["gpu_history"] > 1
    assert result["redis_fleet_memory_mib"] > 0
    assert result["projected_full_history_mib"] > 12 * (per_worker["info"] / 1024)
    # the table names the verdict
    assert "workers wrongly seen offline" in done.stdout
    assert str(out) in done.stdout


def test_a_bad_option_is_refused_with_the_option_named() -> None:
    done = _bench("--workers", "0")
    assert done.returncode == 2
    assert "--workers must be at least 1" in done.stderr
