"""Helpers of the manager tests: a small study supervisor, settings, a live uvicorn server.

``ScriptedSupervisor`` stands in for manager/supervisor.py where a test checks the API itself:
it stores real trials in the real store and streams the same messages, on the test's cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from servetune.core.study import FailureKind, TrialResult, TrialRole, TrialState
from servetune.settings import Settings
from servetune.store.repo import StudyStore
from tests.redis_server import free_port

FINAL = ("finished", "failed", "cancelled", "interrupted")


class ScriptedSupervisor:
    """Runs each submitted study as two trials, stored and streamed, once ``go`` is set.

    Trial 0 completes without metrics (a PRUNED run), trial 1 fails with benchmark_failed;
    the study then ends ``finished`` (``final_status``). ``go`` is set at once unless
    ``hold`` is True, so a test can subscribe first. With ``recommend``, trial 0 completes
    instead (feasible, objective 42) and the stored verdict record recommends it, as
    ``StudyLoop`` stores one when the defaults win.
    """

    RECOMMENDATION = "keep the engine defaults: no candidate beat them (scripted)"

    def __init__(
        self,
        settings: Settings,
        store: StudyStore,
        r: Any,
        *,
        hold: bool = False,
        recommend: bool = False,
    ):
        self.store = store
        self.recommend = recommend
        self.go = asyncio.Event()
        if not hold:
            self.go.set()
        self.final_status = "finished"
        self.submitted: list[int] = []
        self.cancelled: list[int] = []
        self._running: set[int] = set()
        self._subs: dict[int, list[asyncio.Queue[dict[str, Any]]]] = defaultdict(list)
        self._tasks: list[asyncio.Task[None]] = []
        self.started = self.stopped = False

    async def start(self) -> None:
        """Resume the manager's running studies, as StudySupervisor does after a restart."""
        self.started = True
        for study in await asyncio.to_thread(self.store.list_studies, 100):
            if getattr(study, "executor", None) == "manager" and study.status == "running":
                await self.submit(study.id)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.stopped = True

    async def submit(self, study_id: int) -> None:
        self.submitted.append(study_id)
        self._running.add(study_id)
        self._tasks.append(asyncio.create_task(self._run(study_id)))

    async def resume(self, study_id: int) -> None:
        await self.submit(study_id)

    async def cancel(self, study_id: int) -> None:
        self.cancelled.append(study_id)
        self.final_status = "cancelled"
        self.go.set()

    def running(self) -> set[int]:
        return set(self._running)

    def subscribe(self, study_id: int) -> AsyncIterator[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subs[study_id].append(queue)
        return self._drain(study_id, queue)

    async def _drain(
        self, study_id: int, queue: asyncio.Queue[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            study = await asyncio.to_thread(self.store.get_study, study_id)
            yield {"type": "study", "status": study.status}  # as StudySupervisor does
            while True:
                message = await queue.get()
                yield message
                if message["type"] == "study" and message["status"] in FINAL:
                    return
        finally:
            self._subs[study_id].remove(queue)

    def _publish(self, study_id: int, message: dict[str, Any]) -> None:
        for queue in self._subs[study_id]:
            queue.put_nowait(message)

    async def _run(self, study_id: int) -> None:
        await self.go.wait()
        first = (
            TrialResult(state=TrialState.COMPLETE, feasible=True, objective_values=[42.0])
            if self.recommend
            else TrialResult(state=TrialState.PRUNED, failure_reason="pruned by the script")
        )
        results = [
            first,
            TrialResult(
                state=TrialState.FAIL,
                failure_kind=FailureKind.BENCHMARK_FAILED,
                failure_reason="every request failed (scripted)",
            ),
        ]
        done_before = {t.number for t in await asyncio.to_thread(self.store.trials, study_id)}
        for number, result in enumerate(results):
            if number in done_before:  # resumed: those ran before the restart
                continue
            role = TrialRole.BASELINE if number == 0 else TrialRole.SEARCH
            trial = await asyncio.to_thread(
                self.store.add_trial, study_id, number, role, {"threads": number + 1}
            )
            assert trial.id is not None
            await asyncio.to_thread(self.store.set_trial_worker, trial.id, "w-script")
            self._publish(study_id, {"type": "trial", "trial": trial.model_dump(mode="json")})
            self._publish(study_id, {"type": "phase", "trial_id": trial.id, "phase": "benchmark"})
            done = await asyncio.to_thread(self.store.finish_trial, trial.id, result)
            self._publish(study_id, {"type": "trial", "trial": done.model_dump(mode="json")})
        verdict = (
            {
                "best_trial": 0,
                "baseline_trial": 0,
                "recommended_trial": 0,
                "recommendation": self.RECOMMENDATION,
                "candidates": [],
                "noise_pct": 1.5,
                "objective_measured": True,
                "pareto_front": [],
                "verdict": None,
                "summary": None,
            }
            if self.recommend and self.final_status == "finished"
            else None
        )
        await asyncio.to_thread(
            self.store.set_study_status,
            study_id,
            self.final_status,  # type: ignore[arg-type]
            verdict,
        )
        self._running.discard(study_id)
        self._publish(study_id, {"type": "study", "status": self.final_status})


def manager_settings(tmp_path: Path, redis_url: str | None, **extra: Any) -> Settings:
    """Settings of a test manager: its own data dir and SQLite file, short heartbeats."""
    return Settings(
        data_dir=tmp_path / "data",
        db_url=f"sqlite:///{tmp_path / 'manager.db'}",
        redis_url=redis_url,
        heartbeat_s=1.0,
        **extra,
    )


@contextlib.contextmanager
def live_server(app: Any, timeout_s: float = 20.0, port: int | None = None) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (``port``, default a free one) in a thread;
    yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, access_log=False, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test manager did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
