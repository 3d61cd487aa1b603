"""The study loop stops launching a flag's values once neighbours failed in opposite directions
(SGLang's mem-fraction-static, sgl-project/sglang issue #4330), with a real SQLite store and a
runner that replays the engine's real log lines instead of starting SGLang (no GPU here)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from servetune.core.spec import parse_spec
from servetune.core.study import FailureKind, Params, TrialResult, TrialState
from servetune.engines import get_engine
from servetune.loop import StudyLoop
from servetune.runner import TrialContext
from servetune.store.repo import StudyStore
from tests.unit.gpu_engine_helpers import log, spec_doc

VALUES = [0.78, 0.80, 0.82, 0.84, 0.85, 0.88, 0.90]


def test_opposite_failures_on_neighbours_end_the_probing(tmp_path: Path) -> None:
    doc = spec_doc(
        "sglang",
        "org/model",
        {"mem-fraction-static": {"kind": "choice", "values": VALUES}},
        gpus={"count": 1, "memory_gib": 48},
    )
    doc["strategy"] = {"kind": "grid"}
    doc["budget"] = {"max_trials": 20, "confirm_repeats": 0}
    spec = parse_spec(doc)
    engine = get_engine(spec.engine)
    launched: list[float] = []

    async def runner(ctx: TrialContext, params: Params, number: int) -> TrialResult:
        """0.85 and above run out of memory capturing CUDA graphs; below, the KV pool is too small
        (the two errors of issue #4330), classified by the engine from its real log lines."""
        mfs = params.get("mem-fraction-static")
        if mfs is None:
            text = log("sglang_not_enough_memory.log")
        else:
            launched.append(float(mfs))
            name = "sglang_graph_oom.log" if float(mfs) >= 0.85 else "sglang_not_enough_memory.log"
            text = log(name)
        kind, reason = engine.classify_failure(text, 1)
        return TrialResult(state=TrialState.FAIL, failure_kind=kind, failure_reason=reason)

    store = StudyStore(f"sqlite:///{tmp_path / 'studies.db'}")
    study = store.create_study("feasibility", spec, doc)
    ctx = TrialContext(
        spec=spec,
        engine=engine,
        deployment=cast(Any, None),
        client=cast(Any, None),
        log_dir=tmp_path,
    )
    messages: list[str] = []
    loop = StudyLoop(store, study, ctx, runner=runner)
    loop.events.message = messages.append
    asyncio.run(loop.run())

    trials = {t.params.get("mem-fraction-static"): t for t in store.trials(study.id)}
    assert set(VALUES) <= set(trials)
    # The grid walks upwards: 0.78..0.84 need more, 0.85 needs less → 0.88 and 0.90 not launched.
    assert launched == [0.78, 0.80, 0.82, 0.84, 0.85]
    for v in (0.88, 0.90):
        t = trials[v]
        assert t.state is TrialState.FAIL
        assert t.failure_kind is FailureKind.PREFLIGHT_REJECTED
        assert t.result is not None and t.result.failure_reason is not None
        assert "no value of mem-fraction-static works" in t.result.failure_reason
        assert "0.84 needed more (kv_cache_too_small" in t.result.failure_reason
    assert trials[0.84].failure_kind is FailureKind.KV_CACHE_TOO_SMALL
    assert trials[0.85].failure_kind is FailureKind.CUDA_OOM
    assert any("infeasible region" in m for m in messages)
