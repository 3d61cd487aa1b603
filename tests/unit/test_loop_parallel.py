"""Parallel trials in the one StudyLoop: scheduling, save-before-tell, cancel, crash, adoption.

A real SQLite store and the real llama.cpp adapter and strategies; only the runner is an
in-process stand-in (no engine, no socket) that records when each trial runs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from servetune.cluster.tasks import cancel_and_wait
from servetune.core.spec import StudySpec, parse_spec
from servetune.core.strategies.base import params_key
from servetune.core.study import (
    FailureKind,
    Params,
    Trial,
    TrialNeeds,
    TrialResult,
    TrialRole,
    TrialState,
)
from servetune.engines import get_engine
from servetune.loop import StudyLoop, TrialSlots
from servetune.runner import TrialContext
from servetune.store.repo import StudyRecord, StudyStore

MODEL = "m-loop-parallel-test.gguf"
"""engine.model: also the marker a resumed loop looks for before killing a process group."""


def _doc(space: dict[str, Any], **budget: Any) -> dict[str, Any]:
    return {
        "engine": {"kind": "llamacpp", "model": MODEL},
        "space": {"params": space},
        "strategy": {"kind": "grid"},
        "budget": {"baseline_repeats": 1, "confirm_repeats": 0, **budget},
        "workload": {"concurrency": [1], "num_requests": 4},
        "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
    }


THREADS = {"threads": {"kind": "int", "low": 1, "high": 12}}
"""Twelve grid points, each a different configuration."""


class FakeRunner:
    """Records every call (its own ctx copy included) and how many ran at once.

    A trial sleeps ``delay_s`` and completes with objective value = its number, unless its
    number is in ``block`` (it waits forever) or ``crash`` (it raises RuntimeError).
    """

    def __init__(self, delay_s: float = 0.02) -> None:
        self.delay_s = delay_s
        self.active: set[int] = set()
        self.max_active = 0
        self.events: list[tuple[str, int]] = []
        self.ctxs: dict[int, TrialContext] = {}
        self.params: dict[int, Params] = {}
        self.block: set[int] = set()
        self.crash: set[int] = set()

    async def __call__(self, ctx: TrialContext, params: Params, number: int) -> TrialResult:
        started = datetime.now(UTC)
        self.ctxs[number] = ctx
        self.params[number] = params
        self.active.add(number)
        self.max_active = max(self.max_active, len(self.active))
        self.events.append(("start", number))
        try:
            if ctx.on_phase is not None:
                ctx.on_phase("benchmarking")
            await asyncio.sleep(self.delay_s)
            if number in self.crash:
                raise RuntimeError(f"bug in trial {number}")
            if number in self.block:
                await asyncio.Event().wait()
        finally:
            self.active.discard(number)
            self.events.append(("end", number))
        return _complete(float(number + 1), started)


def _complete(value: float, started: datetime | None = None) -> TrialResult:
    return TrialResult(
        state=TrialState.COMPLETE,
        feasible=True,
        objective_values=[value],
        started_at=started or datetime.now(UTC),
        finished_at=datetime.now(UTC),
    )


def _study(tmp_path: Path, doc: dict[str, Any]) -> tuple[StudyStore, StudyRecord, TrialContext]:
    spec: StudySpec = parse_spec(doc)
    store = StudyStore(f"sqlite:///{tmp_path / 'studies.db'}")
    study = store.create_study("parallel", spec, doc)
    ctx = TrialContext(
        spec=spec,
        engine=get_engine(spec.engine),
        deployment=cast(Any, None),
        client=cast(Any, None),
        log_dir=tmp_path,
    )
    return store, study, ctx


def _loop(
    store: StudyStore,
    study: StudyRecord,
    ctx: TrialContext,
    runner: FakeRunner,
    slots: TrialSlots | None = None,
    **kwargs: Any,
) -> StudyLoop:
    return StudyLoop(
        store, study, ctx, runner=runner, slots=slots or TrialSlots.unlimited(), **kwargs
    )


async def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` every 5 ms; fail the test after ``timeout_s``."""
    for _ in range(int(timeout_s / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"not true within {timeout_s} s")


def test_trials_run_in_parallel_up_to_the_budget_and_the_baseline_alone(tmp_path: Path) -> None:
    store, study, ctx = _study(tmp_path, _doc(THREADS, max_trials=8, parallel=3))
    runner = FakeRunner()
    loop = _loop(store, study, ctx, runner)
    asyncio.run(loop.run())

    trials = store.trials(study.id)
    assert len(trials) == 8  # never more started than max_trials
    assert all(t.state is TrialState.COMPLETE for t in trials)
    assert runner.max_active == 3
    # the baseline ran alone: nothing started before it ended
    assert runner.events[:2] == [("start", 0), ("end", 0)]
    # each trial had its own context copy carrying its ids
    by_number = {t.number: t for t in trials}
    for number, c in runner.ctxs.items():
        assert (c.study_id, c.trial_id) == (study.id, by_number[number].id)
    assert len({id(c) for c in runner.ctxs.values()}) == 8
    assert ctx.trial_id is None and ctx.on_started is None  # the shared ctx is untouched
    assert store.get_study(study.id).status == "finished"


def test_every_trial_is_saved_before_the_strategy_is_told(tmp_path: Path) -> None:
    store, study, ctx = _study(tmp_path, _doc(THREADS, max_trials=6, parallel=3))
    loop = _loop(store, study, ctx, FakeRunner())
    asked: dict[int, Params] = {}
    told: list[int] = []
    ask, tell = loop.strategy.ask, loop.strategy.tell

    def asking() -> Any:
        s = ask()
        if s is not None:
            asked[s.token] = s.params
        return s

    def telling(token: int, *args: Any, **kwargs: Any) -> None:
        finished = [params_key(t.params) for t in store.trials(study.id) if t.state.is_finished()]
        assert params_key(asked[token]) in finished, "told before it was saved"
        told.append(token)
        tell(token, *args, **kwargs)

    loop.strategy.ask = asking  # type: ignore[method-assign]
    loop.strategy.tell = telling  # type: ignore[method-assign]
    asyncio.run(loop.run())
    assert sorted(told) == sorted(asked) and len(told) == 5


def test_cancelling_the_study_cancels_every_trial_in_flight(tmp_path: Path) -> None:
    store, study, ctx = _study(tmp_path, _doc(THREADS, max_trials=8, parallel=3))
    runner = FakeRunner()
    runner.block = set(range(1, 20))
    loop = _loop(store, study, ctx, runner)

    async def main() -> None:
        task = asyncio.create_task(loop.run())
        await _until(lambda: len(runner.active) == 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    trials = store.trials(study.id)
    assert [t.state for t in trials].count(TrialState.RUNNING) == 0
    cancelled = [t.number for t in trials if t.failure_kind is FailureKind.CANCELLED]
    assert cancelled == [1, 2, 3]
    assert trials[0].state is TrialState.COMPLETE
    assert store.get_study(study.id).status == "cancelled"


def test_a_second_cancel_during_a_slow_abort_still_marks_the_study_and_its_trials_cancelled(
    tmp_path: Path,
) -> None:
    """The manager cancels a loop again when its clean-up is slow (a worker slow to send its
    cancelled result): the study must still end ``cancelled``, never stay ``running``."""
    store, study, ctx = _study(tmp_path, _doc(THREADS, max_trials=8, parallel=2))

    class SlowToAbort(FakeRunner):
        async def __call__(self, ctx: TrialContext, params: Params, number: int) -> TrialResult:
            try:
                return await super().__call__(ctx, params, number)
            except asyncio.CancelledError:
                await asyncio.sleep(30)  # waiting for the worker's RESULT
                raise

    runner = SlowToAbort()
    runner.block = set(range(1, 20))
    loop = _loop(store, study, ctx, runner)

    async def main() -> None:
        task = asyncio.create_task(loop.run())
        await _until(lambda: len(runner.active) == 2)
        assert await cancel_and_wait({task}, 5.0, grace_s=0.1)

    asyncio.run(main())
    trials = store.trials(study.id)
    assert [t.state for t in trials].count(TrialState.RUNNING) == 0
    assert [t.number for t in trials if t.failure_kind is FailureKind.CANCELLED] == [1, 2]
    assert store.get_study(study.id).status == "cancelled"


def test_a_crashing_trial_leaves_no_other_trial_running(tmp_path: Path) -> None:
    store, study, ctx = _study(tmp_path, _doc(THREADS, max_trials=8, parallel=3))
    runner = FakeRunner()
    runner.block = {1, 3}
    runner.crash = {2}
    loop = _loop(store, study, ctx, runner)
    with pytest.raises(RuntimeError, match="bug in trial 2"):
        asyncio.run(loop.run())
    trials = {t.number: t for t in store.trials(study.id)}
    assert all(t.state is not TrialState.RUNNING for t in trials.values())
    assert trials[2].failure_kind is FailureKind.UNKNOWN
    assert trials[1].failure_kind is FailureKind.CANCELLED
    assert trials[3].failure_kind is FailureKind.CANCELLED
    assert store.get_study(study.id).status == "failed"


def test_slots_hold_back_trials_whose_threads_do_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # Engine.needs caps threads at the cores
    space = {"threads": {"kind": "choice", "values": [2, 3, 8]}}
    store, study, ctx = _study(tmp_path, _doc(space, max_trials=4, parallel=4))
    runner = FakeRunner(delay_s=0.03)
    slots = TrialSlots(cpu_threads=4, gpus=0)
    asyncio.run(_loop(store, study, ctx, runner, slots=slots).run())

    # 2 + 3 > 4: the 3-thread trial never overlapped the 2-thread one; 8 > 4 ran alone
    spans: dict[int, tuple[int, int]] = {}
    for i, (kind, number) in enumerate(runner.events):
        start, end = spans.get(number, (i, i))
        spans[number] = (i, end) if kind == "start" else (start, i)
    assert runner.events[:2] == [("start", 0), ("end", 0)]  # the baseline alone
    threads = {n: runner.params[n]["threads"] for n in spans if n}
    assert sorted(threads.values()) == [2, 3, 8]
    for a in threads:
        for b in threads:
            overlap = a < b and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
            if overlap:
                assert min(int(threads[a]), 4) + min(int(threads[b]), 4) <= 4, (a, b)
    assert (slots.cpu_threads_used, slots.gpus_used) == (0, 0)


def test_trial_slots_wait_for_room_and_give_everything_to_an_oversized_trial() -> None:
    async def main() -> None:
        slots = TrialSlots(cpu_threads=4, gpus=2)
        await slots.acquire(TrialNeeds(cpu_threads=3))
        assert not slots.fits(TrialNeeds(cpu_threads=2))
        big = TrialNeeds(cpu_threads=64, gpus=8)  # more than there is: takes it all, alone
        waiting = asyncio.create_task(slots.acquire(big))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        slots.release(TrialNeeds(cpu_threads=3))
        await asyncio.wait_for(waiting, 1)
        assert (slots.cpu_threads_used, slots.gpus_used) == (4, 2)
        assert not slots.fits(TrialNeeds(cpu_threads=1))
        slots.release(big)
        assert slots.fits(TrialNeeds(cpu_threads=4, gpus=2))
        unlimited = TrialSlots.unlimited()
        for _ in range(100):
            await unlimited.acquire(big)

    asyncio.run(main())
    with pytest.raises(ValueError, match="cpu_threads"):
        TrialSlots(cpu_threads=0, gpus=0)


def test_a_twin_of_a_trial_in_flight_is_not_launched_again(tmp_path: Path) -> None:
    # flash-attn true and "on" are one configuration (the engine runs true as on)
    space = {"flash-attn": {"kind": "choice", "values": [True, "on", "off"]}}
    store, study, ctx = _study(tmp_path, _doc(space, max_trials=4, parallel=3))
    runner = FakeRunner(delay_s=0.05)
    messages: list[str] = []
    loop = _loop(store, study, ctx, runner)
    loop.events.message = messages.append
    told: list[int] = []
    tell = loop.strategy.tell
    loop.strategy.tell = lambda token, *a, **k: (told.append(token), tell(token, *a, **k))  # type: ignore[method-assign]
    asyncio.run(loop.run())

    launched = [p.get("flash-attn") for p in runner.params.values()]
    assert sorted(map(str, launched)) == sorted(["None", "True", "off"]), launched
    assert any("still running: its result will be reused" in m for m in messages), messages
    assert sorted(told) == [0, 1, 2]  # the twin's token was told too, once its twin finished


def test_confirm_rounds_run_their_trials_together(tmp_path: Path) -> None:
    doc = _doc(THREADS, max_trials=4, parallel=3, confirm_repeats=1, confirm_top_k=2)
    store, study, ctx = _study(tmp_path, doc)
    runner = FakeRunner(delay_s=0.05)
    asyncio.run(_loop(store, study, ctx, runner).run())
    trials = store.trials(study.id)
    confirm = [t.number for t in trials if t.role is TrialRole.CONFIRM]
    assert len(confirm) == 3  # the baseline and two candidates
    starts = [runner.events.index(("start", n)) for n in confirm]
    ends = [runner.events.index(("end", n)) for n in confirm]
    assert max(starts) < min(ends), runner.events  # all three were in flight at once


def test_adopted_trials_are_awaited_saved_and_told_and_their_processes_left_alone(
    tmp_path: Path,
) -> None:
    store, study, ctx = _study(tmp_path, _doc(THREADS, max_trials=4, parallel=2))
    base = store.add_trial(study.id, 0, TrialRole.BASELINE, {})
    assert base.id is not None
    store.finish_trial(base.id, _complete(1.0))
    on_worker = store.add_trial(study.id, 1, TrialRole.SEARCH, {"threads": 1})
    lost = store.add_trial(study.id, 2, TrialRole.SEARCH, {"threads": 2})
    assert on_worker.id is not None and lost.id is not None
    # a process whose command line names the model, as an engine's would: a loop without
    # adopt kills it on resume; with adopt, pids belong to other hosts and nothing is killed
    proc = subprocess.Popen(  # noqa: S603 - fixed argv
        [sys.executable, "-c", "import time; time.sleep(60)", MODEL], start_new_session=True
    )
    try:
        store.set_trial_process(on_worker.id, proc.pid, proc.pid)
        seen: list[list[int]] = []

        async def main() -> None:
            result: asyncio.Future[TrialResult] = asyncio.get_running_loop().create_future()

            async def adopt(running: list[Trial]) -> dict[int, Awaitable[TrialResult]]:
                seen.append([t.number for t in running])
                assert on_worker.id is not None
                return {on_worker.id: result}

            runner = FakeRunner()
            loop = _loop(store, study, ctx, runner, adopt=adopt)
            task = asyncio.create_task(loop.run())
            await _until(lambda: len(runner.params) >= 1)
            # the adopted point is pending: the grid never proposes threads=1 again
            assert all(p != {"threads": 1} for p in runner.params.values())
            result.set_result(_complete(99.0))
            await task
            assert {"threads": 1} not in runner.params.values()

        asyncio.run(main())
        assert seen == [[1, 2]]
        assert proc.poll() is None, "the loop killed a process of an adopted trial"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    trials = {t.number: t for t in store.trials(study.id)}
    assert trials[1].state is TrialState.COMPLETE
    assert trials[1].result is not None and trials[1].result.objective_values == [99.0]
    assert trials[2].failure_kind is FailureKind.INTERRUPTED
    assert all(t.state is not TrialState.RUNNING for t in trials.values())
    counted = [t for t in trials.values() if t.role is not TrialRole.CONFIRM and t.number != 2]
    assert len(counted) == 4  # the adopted trial used the budget like any other


def test_finishing_a_finished_trial_keeps_its_first_outcome(tmp_path: Path) -> None:
    store, study, _ = _study(tmp_path, _doc(THREADS, max_trials=2))
    t = store.add_trial(study.id, 0, TrialRole.BASELINE, {})
    assert t.id is not None
    first = store.finish_trial(t.id, _complete(5.0))
    again = store.finish_trial(
        t.id,
        TrialResult(state=TrialState.FAIL, failure_kind=FailureKind.WORKER_LOST),
    )
    assert again == first
    (stored,) = store.trials(study.id)
    assert stored.state is TrialState.COMPLETE and stored.result == first.result
