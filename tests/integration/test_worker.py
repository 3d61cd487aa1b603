"""The worker process against a private Redis and the tiny llama.cpp model: results, rejected
payloads, aborts, timeouts, SIGTERM hand-back and SIGKILL leaving no engine behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from servetune.cluster import keys
from servetune.cluster.logs import read_logs
from servetune.cluster.models import (
    Heartbeat,
    LogSource,
    RunningTrial,
    TrialEvent,
    TrialEventKind,
    TrialJob,
)
from servetune.cluster.queue import abort_trial, arq_pool, enqueue_trial
from servetune.cluster.redis import connect
from servetune.core.spec import StudySpec
from servetune.core.study import FailureKind, TrialState
from servetune.modelgen import ModelFiles
from servetune.settings import Settings
from servetune.worker.jobs import CTX_KEY, WorkerRuntime, run_trial_job
from tests.integration.study_helpers import cli_env, small_spec
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

LONG_WORKLOAD = {
    "input_tokens": 32,
    "output_tokens": 12,
    "concurrency": [1],
    "duration_s": 60,
    "warmup_requests": 0,
}
"""A benchmark that runs a minute: long enough to interrupt mid-trial."""


def wait_until(predicate: Callable[[], Any], timeout_s: float, step_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    return predicate()


def events(server: RedisServer) -> list[TrialEvent]:
    """Every event on the stream so far, in order."""
    with server.client() as r:
        return [TrialEvent.model_validate_json(f["event"]) for _, f in r.xrange(keys.EVENTS)]


def event_of(server: RedisServer, kind: TrialEventKind, job_id: str) -> TrialEvent | None:
    return next((e for e in events(server) if e.kind is kind and e.job_id == job_id), None)


def running_on(server: RedisServer, worker_id: str) -> list[RunningTrial]:
    """The trials the worker's last heartbeat lists ([] while none is stored)."""
    with server.client() as r:
        raw = r.get(keys.heartbeat(worker_id))
    return Heartbeat.model_validate_json(raw).running if raw else []


def phases_of(server: RedisServer, trial_id: int) -> list[str | None]:
    return [
        e.phase for e in events(server) if e.kind is TrialEventKind.PHASE and e.trial_id == trial_id
    ]


def trial_job(
    model: ModelFiles,
    worker_id: str,
    trial_id: int,
    *,
    workload: dict[str, Any] | None = None,
    timeout_s: float = 60,
    params: dict[str, Any] | None = None,
) -> TrialJob:
    doc = small_spec(model, name="fleet")
    if workload is not None:
        doc["workload"] = workload
    return TrialJob(
        job_id=f"trial-{trial_id}-1",
        study_id=1,
        study_name="fleet",
        trial_id=trial_id,
        number=trial_id,
        params=params or {"threads": 1},
        spec=StudySpec.model_validate(doc),
        timeout_s=timeout_s,
        worker_id=worker_id,
    )


def engine_processes(model: ModelFiles) -> list[psutil.Process]:
    """Live processes whose command line holds the tiny model's path (the engines)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if str(model.gguf_path) in " ".join(p.info["cmdline"] or []):
                found.append(p)
    return found


class WorkerProcess:
    """``servetune worker`` as a subprocess with its own data directory (stderr to a file)."""

    def __init__(self, tmp_path: Path, url: str, name: str = "w1", max_parallel: int = 1) -> None:
        self.data_dir = tmp_path / "data"
        self.stderr_path = tmp_path / f"worker-{name}.stderr"
        argv = [sys.executable, "-m", "servetune", "worker", "--redis", url, "--name", name]
        argv += ["--heartbeat-s", "1", "--data-dir", str(self.data_dir)]
        argv += ["--max-parallel", str(max_parallel)]
        # a pydantic serialization warning in the worker is an error there too
        env = {**cli_env(tmp_path), "PYTHONWARNINGS": "error::UserWarning"}
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(  # noqa: S603 - argv list of our own CLI
                argv, stdout=subprocess.DEVNULL, stderr=err, env=env
            )
        ready = wait_until(lambda: "ready" in self.stderr() or self.proc.poll() is not None, 30)
        assert ready and self.proc.poll() is None, self.stderr()
        self.id = json.loads((self.data_dir / f"worker-{name}.json").read_text())["id"]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def worker_process(
    tmp_path: Path, url: str, name: str = "w1", max_parallel: int = 1
) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(tmp_path, url, name, max_parallel)
    try:
        yield worker
    finally:
        worker.stop()


async def _enqueue(url: str, *jobs: TrialJob) -> None:
    pool = await arq_pool(url)
    try:
        for job in jobs:
            await enqueue_trial(pool, job)
    finally:
        await pool.aclose()


class _Evil:
    """Unpickling it would create a file: proof that a pickled payload never runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_a_worker_runs_trials_rejects_bad_payloads_and_aborts_on_request(
    private_redis: RedisServer, tiny_model: ModelFiles, tmp_path: Path
) -> None:
    with worker_process(tmp_path, private_redis.url) as worker:
        with private_redis.client() as r:
            beat = Heartbeat.model_validate_json(
                wait_until(lambda: r.get(keys.heartbeat(worker.id)), 5)
            )
        assert beat.worker_id == worker.id and beat.running == []

        async def enqueue_bad_then_good() -> None:
            pool = await arq_pool(private_redis.url)
            try:
                bad = trial_job(tiny_model, worker.id, 1).model_dump(mode="json")
                bad["timeout_s"] = "soon"  # a wrong type
                await pool.enqueue_job(
                    "run_trial_job",
                    payload=bad,
                    _job_id="trial-1-1",
                    _queue_name=keys.queue(worker.id),
                )
                await enqueue_trial(pool, trial_job(tiny_model, worker.id, 2))
            finally:
                await pool.aclose()

        # a pickled job body (what ARQ's default serializer would write): refused unread
        marker = tmp_path / "pickle-ran"
        with private_redis.client() as r:
            r.set(keys.arq_job("trial-4-1"), pickle.dumps(_Evil(str(marker))))
            r.zadd(keys.queue(worker.id), {"trial-4-1": int(time.time() * 1000)})
        asyncio.run(enqueue_bad_then_good())
        rejected = wait_until(
            lambda: event_of(private_redis, TrialEventKind.REJECTED, "trial-1-1"), 10
        )
        assert rejected is not None and "timeout_s" in (rejected.reason or "")
        result = wait_until(lambda: event_of(private_redis, TrialEventKind.RESULT, "trial-2-1"), 25)
        assert result is not None, worker.stderr()
        assert result.result is not None and result.result.state is TrialState.COMPLETE
        assert result.worker_id == worker.id
        started = event_of(private_redis, TrialEventKind.STARTED, "trial-2-1")
        assert started is not None and started.pid is not None
        phases = phases_of(private_redis, 2)
        assert phases[:2] == ["starting", "benchmarking"]
        assert not any(
            e.trial_id == 1 and e.kind is not TrialEventKind.REJECTED for e in events(private_redis)
        )
        assert not marker.exists() and worker.proc.poll() is None
        assert not any(e.job_id == "trial-4-1" for e in events(private_redis))

        async def shipped() -> set[LogSource]:
            r = connect(private_redis.url)
            try:
                return {rec.source for rec in await read_logs(r, worker.id, limit=500, trial_id=2)}
            finally:
                await r.aclose()

        # the trial's own lines and its engine's output reach Redis, tagged with the trial
        wanted = {LogSource.TRIAL, LogSource.ENGINE}
        assert wait_until(lambda: asyncio.run(shipped()) >= wanted, 5), asyncio.run(shipped())

        # abort: the engine is gone within seconds and the trial ends FAIL cancelled
        long = trial_job(tiny_model, worker.id, 3, workload=LONG_WORKLOAD)
        asyncio.run(_enqueue(private_redis.url, long))
        started = wait_until(
            lambda: event_of(private_redis, TrialEventKind.STARTED, long.job_id), 15
        )
        assert started is not None and started.pid is not None
        assert wait_until(lambda: event_of(private_redis, TrialEventKind.PHASE, long.job_id), 5)

        async def abort() -> None:
            pool = await arq_pool(private_redis.url)
            try:
                await abort_trial(pool, long, worker.id, timeout_s=10)
            finally:
                await pool.aclose()

        t0 = time.monotonic()
        asyncio.run(abort())
        cancelled = wait_until(
            lambda: event_of(private_redis, TrialEventKind.RESULT, long.job_id), 10
        )
        assert cancelled is not None and cancelled.result is not None
        assert cancelled.result.failure_kind is FailureKind.CANCELLED
        assert (
            not psutil.pid_exists(started.pid)
            or psutil.Process(started.pid).status() == psutil.STATUS_ZOMBIE
        )
        assert time.monotonic() - t0 < 10
        assert engine_processes(tiny_model) == []


def test_sigterm_mid_trial_hands_the_trial_back_and_stops_its_engine(
    private_redis: RedisServer, tiny_model: ModelFiles, tmp_path: Path
) -> None:
    with worker_process(tmp_path, private_redis.url) as worker:
        job = trial_job(tiny_model, worker.id, 7, workload=LONG_WORKLOAD)
        asyncio.run(_enqueue(private_redis.url, job))
        started = wait_until(
            lambda: event_of(private_redis, TrialEventKind.STARTED, job.job_id), 15
        )
        assert started is not None, worker.stderr()
        beat = wait_until(lambda: running_on(private_redis, worker.id), 5)
        assert [t.trial_id for t in beat] == [7]
        assert wait_until(lambda: "benchmarking" in phases_of(private_redis, 7), 10)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(20) == 0, worker.stderr()
        handed = event_of(private_redis, TrialEventKind.HANDED_BACK, job.job_id)
        assert handed is not None and "SIGTERM" in (handed.reason or "")
        assert "while the trial was benchmarking" in (handed.reason or "")
        assert event_of(private_redis, TrialEventKind.RESULT, job.job_id) is None
        assert engine_processes(tiny_model) == []
        with private_redis.client() as r:
            assert r.get(keys.heartbeat(worker.id)) is None  # offline at once, not 3 beats later


def test_a_worker_killed_mid_trial_leaves_no_engine_and_keeps_its_id(
    private_redis: RedisServer, tiny_model: ModelFiles, tmp_path: Path
) -> None:
    with worker_process(tmp_path, private_redis.url) as worker:
        job = trial_job(tiny_model, worker.id, 9, workload=LONG_WORKLOAD)
        asyncio.run(_enqueue(private_redis.url, job))
        started = wait_until(
            lambda: event_of(private_redis, TrialEventKind.STARTED, job.job_id), 15
        )
        assert started is not None, worker.stderr()
        record = json.loads((worker.data_dir / "worker-w1-engines.json").read_text())
        assert [e["pgid"] for e in record] == [started.pid]
        worker.proc.kill()
        worker.proc.wait(10)
        assert wait_until(lambda: engine_processes(tiny_model) == [], 10), (
            "engine outlived its worker"
        )
    # the same worker (host, name) keeps its id
    with worker_process(tmp_path, private_redis.url) as again:
        assert again.id == worker.id


def test_run_trial_job_called_directly_rejects_bad_payloads_and_times_out(
    private_redis: RedisServer,
    tiny_model: ModelFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(data_dir=tmp_path / "data", redis_url=private_redis.url)
    good = trial_job(tiny_model, "w-direct", 11, workload=LONG_WORKLOAD, timeout_s=6)
    ok = good.model_dump(mode="json")
    hasty = trial_job(tiny_model, "w-direct", 12, timeout_s=0.3).model_dump(mode="json")
    missing = {k: v for k, v in ok.items() if k != "spec"}
    extra = {**ok, "run_this": "os.system('rm -rf /')"}
    wrong = {**ok, "params": "threads=1"}

    async def main() -> list[dict[str, Any]]:
        r = connect(private_redis.url)
        rt = WorkerRuntime(settings, "w-direct", r, tmp_path / "engines.json")
        ctx = {CTX_KEY: rt, "job_id": good.job_id}
        try:
            answers = [
                await run_trial_job(ctx, payload)
                for payload in (missing, extra, wrong, ["a", "list"], b"\x80\x04pickle")
            ]
            answers.append(await run_trial_job(ctx, ok))
            answers.append(await run_trial_job(ctx, hasty))
            return answers
        finally:
            await r.aclose()

    with caplog.at_level(logging.ERROR, logger="servetune.worker.jobs"):
        t0 = time.monotonic()
        answers = asyncio.run(main())
    assert [a["outcome"] for a in answers] == ["rejected"] * 5 + ["result"] * 2
    rejected = [e for e in events(private_redis) if e.kind is TrialEventKind.REJECTED]
    reasons = [e.reason or "" for e in rejected]
    assert len(rejected) == 3  # the list and the bytes carry no readable ids
    assert "spec" in reasons[0] and "run_this" in reasons[1] and "params" in reasons[2]
    assert "rm -rf" not in " ".join(reasons)  # input values never echoed
    assert sum("rejected job" in m for m in caplog.messages) == 5
    # the good one ran into its 6 s timeout: mid-benchmark once the engine was ready
    result = event_of(private_redis, TrialEventKind.RESULT, good.job_id)
    assert result is not None and result.result is not None
    benchmarking = "benchmarking" in phases_of(private_redis, 11)
    expected = FailureKind.BENCHMARK_FAILED if benchmarking else FailureKind.STARTUP_TIMEOUT
    assert result.result.failure_kind is expected
    assert "timeout of 6 s" in (result.result.failure_reason or "")
    # one whose timeout passes before its engine is ready (on a loaded machine the loop may
    # notice the deadline only once the engine answered: then the kind follows that phase)
    early = event_of(private_redis, TrialEventKind.RESULT, "trial-12-1")
    assert early is not None and early.result is not None
    reason = early.result.failure_reason or ""
    starting = "while it was starting" in reason
    kind = FailureKind.STARTUP_TIMEOUT if starting else FailureKind.BENCHMARK_FAILED
    assert early.result.failure_kind is kind, reason
    assert "timeout of 0.3 s" in (early.result.failure_reason or "")
    assert time.monotonic() - t0 < 20
    assert engine_processes(tiny_model) == []
    assert json.loads((tmp_path / "engines.json").read_text()) == []


def test_worker_cli_says_what_is_wrong_with_its_redis(tmp_path: Path, unused_port: int) -> None:
    env = cli_env(tmp_path)
    env.pop("SERVETUNE_REDIS_URL", None)
    base = [sys.executable, "-m", "servetune", "worker", "--data-dir", str(tmp_path)]
    url = f"redis://:hunter2@127.0.0.1:{unused_port}/0"
    # both at once: each spends most of its time importing
    missing, down = (
        subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)  # noqa: S603
        for argv in (base, [*base, "--redis", url])
    )
    _, missing_err = missing.communicate(timeout=60)
    _, down_err = down.communicate(timeout=60)
    assert missing.returncode == 2 and "--redis" in missing_err
    assert down.returncode == 1, down_err
    assert f"redis://:***@127.0.0.1:{unused_port}/0" in down_err
    assert "hunter2" not in down_err


@pytest.fixture
def unused_port() -> int:
    from tests.redis_server import free_port

    return free_port()


PARENT = """
import asyncio, sys
from pathlib import Path
from servetune.deploy.local import LocalDeployment
from servetune.engines.base import LaunchCommand

async def main():
    d = LocalDeployment(die_with_parent=sys.argv[1] == "1")
    e = await d.start(LaunchCommand(argv=["sleep", "300"]), Path(sys.argv[2]))
    print(e.pgid, flush=True)
    await asyncio.sleep(300)

asyncio.run(main())
"""


@pytest.mark.parametrize("die_with_parent", [True, False])
def test_die_with_parent_decides_whether_an_engine_outlives_a_sigkilled_parent(
    tmp_path: Path, die_with_parent: bool
) -> None:
    from servetune.deploy.local import group_alive, kill_process_group

    repo = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", PARENT, "1" if die_with_parent else "0", str(tmp_path / "e.log")],
        stdout=subprocess.PIPE, text=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert parent.stdout is not None
    pgid = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait(10)
        gone = wait_until(lambda: not group_alive(pgid), 3)
        assert gone is die_with_parent
    finally:
        if group_alive(pgid):
            kill_process_group(pgid, must_contain="sleep", timeout_s=2)
        parent.stdout.close()


def test_a_worker_outlives_a_redis_restart_and_registers_again(
    private_redis: RedisServer, tiny_model: ModelFiles, tmp_path: Path
) -> None:
    with worker_process(tmp_path, private_redis.url) as worker:
        private_redis.kill()
        time.sleep(1.0)
        private_redis.start()  # same port, no data: the worker's registration is gone
        with private_redis.client() as r:
            assert wait_until(lambda: r.get(keys.worker_info(worker.id)), 5), worker.stderr()
            assert wait_until(lambda: r.get(keys.heartbeat(worker.id)), 3)
        job = trial_job(tiny_model, worker.id, 21)
        asyncio.run(_enqueue(private_redis.url, job))
        result = wait_until(lambda: event_of(private_redis, TrialEventKind.RESULT, job.job_id), 20)
        assert result is not None, worker.stderr()
        assert worker.proc.poll() is None


def test_a_worker_with_max_parallel_2_runs_two_trials_at_once(
    private_redis: RedisServer, tiny_model: ModelFiles, tmp_path: Path
) -> None:
    short = {**LONG_WORKLOAD, "duration_s": 3}
    with worker_process(tmp_path, private_redis.url, max_parallel=2) as worker:
        jobs = [trial_job(tiny_model, worker.id, n, workload=short) for n in (31, 32)]
        asyncio.run(_enqueue(private_redis.url, *jobs))
        both = wait_until(lambda: len(running_on(private_redis, worker.id)) == 2, 15)
        assert both, worker.stderr()
        results = wait_until(
            lambda: all(event_of(private_redis, TrialEventKind.RESULT, j.job_id) for j in jobs), 20
        )
        assert results, worker.stderr()
        for j in jobs:
            event = event_of(private_redis, TrialEventKind.RESULT, j.job_id)
            assert event is not None and event.result is not None
            assert event.result.state is TrialState.COMPLETE, event.result.failure_reason
        started = [event_of(private_redis, TrialEventKind.STARTED, j.job_id) for j in jobs]
        assert len({e.pid for e in started if e is not None}) == 2
