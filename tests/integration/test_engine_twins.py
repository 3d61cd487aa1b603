"""A study never measures one engine configuration twice: params that llama.cpp runs identically
(Engine.effective_params) reuse the earlier trial's result (real engine, real CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from servetune.modelgen import ModelFiles
from tests.integration.study_helpers import servetune, small_spec, write_spec

pytestmark = pytest.mark.integration


def test_params_the_engine_runs_like_the_baseline_are_not_measured_again(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    doc = small_spec(tiny_model, trials=4, name="twins")
    # parallel -1 is auto = 4 slots over a unified KV cache; with kv-unified fixed on, parallel 4
    # is the same server, and so is ctx-size 4000 (padded to the model's 4096): every grid point
    # runs exactly as the baseline (the engine's defaults) except parallel 2.
    doc["engine"]["flags"] = {"kv-unified": True}
    doc["space"] = {
        "params": {
            "parallel": {"kind": "choice", "values": [-1, 4, 2]},
            "ctx-size": {"kind": "choice", "values": [4000]},
        }
    }
    doc["strategy"] = {"kind": "grid"}
    spec = write_spec(tmp_path / "spec.yaml", doc)
    run = servetune(tmp_path, "run", str(spec))
    assert run.returncode == 0, run.stdout + run.stderr
    shown = servetune(tmp_path, "show", "twins", "--json")
    assert shown.returncode == 0, shown.stderr
    trials = json.loads(shown.stdout)["trials"]
    measured = [t["params"] for t in trials]
    assert measured == [{}, {"ctx-size": 4000, "parallel": 2}], measured
    assert run.stdout.count("its result is reused, not measured again") == 2, run.stdout
