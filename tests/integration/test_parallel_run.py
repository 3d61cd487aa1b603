"""``servetune run`` with ``budget.parallel: 2``: two trials are in flight at once on this host,
each a real llama.cpp server (xllamacpp) on the tiny model with one thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from servetune.core.study import TrialRole, TrialState
from servetune.modelgen import ModelFiles
from servetune.store.repo import StudyStore
from tests.integration.study_helpers import servetune, small_spec, write_spec

pytestmark = pytest.mark.integration


def test_run_with_parallel_2_keeps_two_trials_in_flight(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    doc = small_spec(tiny_model, trials=3, name="par")
    doc["engine"]["flags"] = {"threads": 1}  # two 1-thread engines fit a 2-core host
    doc["space"] = {"params": {"batch-size": {"kind": "choice", "values": [512, 1024]}}}
    doc["strategy"] = {"kind": "grid"}
    doc["budget"] = {"max_trials": 3, "confirm_repeats": 0, "baseline_repeats": 1, "parallel": 2}
    spec = write_spec(tmp_path / "spec.yaml", doc)

    checked = servetune(tmp_path, "validate", str(spec))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "budget.parallel 2: up to 2 trials run at once" in " ".join(checked.stdout.split())

    run = servetune(tmp_path, "run", str(spec), timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    with StudyStore(f"sqlite:///{tmp_path / 'studies.db'}") as store:
        trials = store.trials(store.get_study("par").id)
    assert [t.role for t in trials] == [TrialRole.BASELINE, TrialRole.SEARCH, TrialRole.SEARCH]
    assert all(t.state is TrialState.COMPLETE for t in trials), [t.result for t in trials]
    spans = []
    for t in trials:
        assert t.result is not None and t.result.started_at and t.result.finished_at
        spans.append((t.result.started_at, t.result.finished_at))
    (_, b1), (s0, s1), (t0, t1) = spans
    assert b1 <= min(s0, t0), "the baseline runs alone, first"
    assert s0 < t1 and t0 < s1, f"the two search trials did not overlap: {spans}"
    assert "up to 2 trials at once on this host" in run.stdout, run.stdout
    for line in ("trial  1 search", "trial  2 search"):
        assert line in run.stdout, run.stdout
