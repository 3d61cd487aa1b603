"""The parts parallel trials rest on: what a trial needs (Engine.needs), pending proposals in
the strategies, the live line of trials in flight, and what validate/dry-run say about parallel.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from servetune.core.spec import parse_spec
from servetune.core.strategies import GridStrategy
from servetune.core.strategies.base import params_key
from servetune.core.strategies.optuna import OptunaStrategy
from servetune.core.study import TrialNeeds, TrialRole, TrialState
from servetune.dryrun import parallel_notes
from servetune.engines import get_engine
from servetune.engines.llamacpp import engine as llamacpp_engine
from servetune.study_session import InFlightLine
from tests.unit.gpu_engine_helpers import spec_doc
from tests.unit.test_strategies import SMALL


def _engine(kind: str, **engine: Any) -> Any:
    model = "m.gguf" if kind == "llamacpp" else "org/model"
    extra = {} if kind == "llamacpp" else {"gpus": {"count": 8, "memory_gib": 80}}
    space = {"max-num-seqs": {"kind": "choice", "values": [8, 16]}}  # not a parallel size
    spec = parse_spec(spec_doc(kind, model, space, **extra, **engine))
    return get_engine(spec.engine), spec.workload


def test_llamacpp_needs_its_threads_or_llama_servers_default_capped_at_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(llamacpp_engine.psutil, "cpu_count", lambda logical=True: 8)
    engine, workload = _engine("llamacpp")
    assert engine.needs({}, workload) == TrialNeeds(cpu_threads=8)  # physical cores
    assert engine.needs({"threads": -1}, workload) == TrialNeeds(cpu_threads=8)
    assert engine.needs({"threads": 3}, workload) == TrialNeeds(cpu_threads=3)
    assert engine.needs({"threads": 2, "threads-batch": 6}, workload).cpu_threads == 6
    assert engine.needs({"threads": 64}, workload).cpu_threads == 16  # capped at the host
    fixed, _ = _engine("llamacpp", flags={"threads": 4})
    assert fixed.needs({}, workload).cpu_threads == 4  # engine.flags count too


def test_gpu_engines_need_their_parallel_sizes_in_gpus() -> None:
    vllm, workload = _engine("vllm")
    assert vllm.needs({}, workload) == TrialNeeds(cpu_threads=1, gpus=1)
    assert vllm.needs({"tensor-parallel-size": 2, "pipeline-parallel-size": 2}, workload).gpus == 4
    assert vllm.needs({"tp": 2, "data-parallel-size": 3}, workload).gpus == 6  # aliases resolve
    sglang, workload = _engine("sglang")
    assert sglang.needs({"tp-size": 4, "dp-size": 2}, workload).gpus == 8
    # data-parallel attention shares the tensor-parallel GPUs
    shared = {"tp-size": 4, "dp-size": 2, "enable-dp-attention": True}
    assert sglang.needs(shared, workload).gpus == 4


def test_a_pending_adopted_point_is_not_proposed_and_is_told_by_its_token() -> None:
    point = {"parallel": 2, "cache-type-k": "q8_0", "flash-attn": True}
    for strategy in (GridStrategy(SMALL), OptunaStrategy(SMALL, ["maximize"], kind="tpe")):
        pending = strategy.add_pending(point)
        assert pending is not None and pending.params == point
        asked = [strategy.ask() for _ in range(23)]
        keys = {params_key(s.params) for s in asked if s is not None}
        assert len(keys) == 23 and params_key(point) not in keys
        assert strategy.ask() is None  # the 24th point is the adopted one, still pending
        strategy.tell(pending.token, TrialState.COMPLETE, [1.0], 0.0)
        assert strategy.add_pending({}) is None  # the baseline is not a point of the space


def test_tpe_treats_running_trials_with_the_constant_liar() -> None:
    strategy = OptunaStrategy(SMALL, ["maximize"], kind="tpe", seed=3)
    sampler = strategy._sampler(0)
    assert sampler._constant_liar is True


def test_the_live_line_shows_every_trial_in_flight() -> None:
    line = InFlightLine()
    assert line.started(3, TrialRole.SEARCH) == "trial 3 (search): starting"
    assert line.phase(3, "benchmarking") == "trial 3: benchmarking"
    assert line.started(4, TrialRole.CONFIRM) == "trials 3 (benchmarking), 4 (starting)"
    assert line.finished(3) == "trial 4 (confirm): starting"
    assert line.finished(4) == "waiting"


def _spec(parallel: int, deployment: dict[str, Any]) -> Any:
    doc = spec_doc("llamacpp", "m.gguf", {"threads": {"kind": "int", "low": 1, "high": 4}})
    doc["budget"] = {"parallel": parallel}
    doc["deployment"] = deployment
    return parse_spec(doc)


def test_validate_and_dry_run_mention_parallel_and_warn_about_a_shared_host() -> None:
    assert parallel_notes(_spec(1, {"kind": "local"})) == []
    (note, warning) = parallel_notes(_spec(3, {"kind": "local", "max_outside_cpu_fraction": 0.2}))
    assert note[0] == "note" and note[1].startswith("budget.parallel 3: up to 3 trials run at once")
    assert warning[0] == "warning" and "share this host's CPU" in warning[1]
    assert "deployment.max_outside_cpu_fraction = 0.2" in warning[1]
