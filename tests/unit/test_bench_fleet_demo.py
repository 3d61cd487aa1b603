"""bench/bench_fleet_demo.py's pure parts: the specs it submits and how it counts a study's trials.

The fleet run itself is run by hand (`make bench-fleet`); these pin what its table reports.
"""

from __future__ import annotations

import importlib.util
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from servetune.core.spec import parse_spec
from servetune.core.study import Trial, TrialResult, TrialRole, TrialState
from servetune.demo import demo_spec

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_fleet_demo.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_fleet_demo", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_fleet_demo"] = module
    spec.loader.exec_module(module)
    return module


T0 = datetime(2026, 11, 30, 1, 0, tzinfo=UTC)


def _trial(
    number: int, start_s: float, end_s: float, *, notes: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    result = TrialResult(
        state=TrialState.COMPLETE,
        started_at=T0 + timedelta(seconds=start_s),
        finished_at=T0 + timedelta(seconds=end_s),
        notes=notes or [],
    )
    trial = Trial(
        id=number + 1, study_id=1, number=number, role=TrialRole.SEARCH, params={},
        state=TrialState.COMPLETE, result=result,
    )  # fmt: skip
    return {**trial.model_dump(mode="json"), **extra}


def test_the_submitted_specs_are_the_demo_spec_with_only_the_parallelism_changed(
    bench: ModuleType, tmp_path: Path
) -> None:
    base = demo_spec(tmp_path / "model.gguf", tmp_path / "tokenizer", 6)
    two = bench.spec_for(base, 2, None)
    assert two["budget"]["parallel"] == 2
    assert "parallel" not in base["budget"]  # the demo's own document is left alone
    assert {k: v for k, v in two.items() if k != "budget"} == {
        k: v for k, v in base.items() if k != "budget"
    }
    assert parse_spec(two).budget.parallel == 2  # a spec the manager and `run` accept
    quiet = bench.spec_for(base, 1, 1.0)
    assert parse_spec(quiet).deployment.max_outside_cpu_fraction == 1.0


def test_peak_overlap_counts_trials_running_at_one_instant(bench: ModuleType) -> None:
    assert bench.peak_overlap([]) == 0
    assert bench.peak_overlap([(0, 5), (5, 9), (9, 12)]) == 1  # back to back: never two at once
    assert bench.peak_overlap([(0, 5), (1, 3), (2, 8), (6, 7)]) == 3
    assert bench.peak_overlap([(0, 4), (2, 6), (4, 8)]) == 2


def test_a_studys_trials_are_counted_by_state_worker_overlap_and_rerun(bench: ModuleType) -> None:
    rerun = "re-run once: other processes used 76% of all CPU cores during the first measurement"
    trials = [
        _trial(0, 0, 10, worker_id="w-a"),
        _trial(1, 10, 20, worker_id="w-a", notes=[rerun, "retried once"]),
        _trial(2, 12, 25, worker_id="w-b"),
        {**_trial(3, 0, 0), "state": "FAIL", "result": None},
    ]
    summary = bench.summarize_trials(trials)
    assert summary == {
        "trials": 4,
        "states": {"COMPLETE": 3, "FAIL": 1},
        "outside_load_reruns": 1,
        "trials_per_worker": {"w-a": 2, "w-b": 1},
        "peak_parallel_trials": 2,
        "trial_p50_s": 10.0,
        "trial_max_s": 13.0,
    }
    local = bench.summarize_trials([_trial(0, 0, 3), _trial(1, 3, 4)])
    assert local["trials_per_worker"] == {}
    assert local["peak_parallel_trials"] == 1
    assert local["trial_p50_s"] == 2.0
    assert bench.summarize_trials([])["trial_p50_s"] is None
