"""Placement of trials on workers (``manager.dispatch.place``) and the job timeout formula.

Pure functions over hand-made WorkerStatus records: no Redis, no sockets.
"""

from __future__ import annotations

from typing import Any, Literal

from servetune.cluster.models import GPUInfo, Heartbeat, WorkerInfo, utc_now
from servetune.cluster.registry import WorkerStatus
from servetune.core.spec import StudySpec
from servetune.core.study import TrialNeeds
from servetune.manager.dispatch import job_timeout_s, place, worst_case_benchmark_s


def _gpu(i: int) -> GPUInfo:
    return GPUInfo(
        index=i,
        name="NVIDIA H100",
        uuid=f"GPU-{i}",
        memory_total_gib=80.0,
        memory_used_gib=1.0,
        memory_free_gib=79.0,
    )


def worker(
    wid: str,
    *,
    cpus: int = 8,
    gpus: int = 0,
    max_parallel: int = 2,
    state: Literal["online", "busy", "offline"] = "online",
    engines: tuple[str, ...] = ("llamacpp",),
    draining: bool = False,
) -> WorkerStatus:
    info = WorkerInfo(
        id=wid,
        hostname=f"host-{wid}",
        pid=100,
        version="0",
        engines=list(engines),
        deployments=["local"],
        gpus=[_gpu(i) for i in range(gpus)],
        cpu_count=cpus,
        memory_total_gib=64.0,
        max_parallel=max_parallel,
        started_at=utc_now(),
    )
    beat = Heartbeat(worker_id=wid, sent_at=utc_now(), draining=draining)
    return WorkerStatus(info=info, state=state, last_heartbeat=beat, last_seen_at=utc_now())


def needs(cpu: int = 1, gpus: int = 0) -> TrialNeeds:
    return TrialNeeds(cpu_threads=cpu, gpus=gpus)


def test_spreads_trials_over_the_least_loaded_worker() -> None:
    workers = [worker("a"), worker("b")]
    assert place(needs(2), workers, {}) == "a"
    assert place(needs(2), workers, {"a": [needs(2)]}) == "b"
    assert place(needs(2), workers, {"a": [needs(2)], "b": [needs(2)]}) == "a"


def test_a_full_worker_is_skipped_and_none_when_nothing_has_room() -> None:
    workers = [worker("a", cpus=4, max_parallel=1), worker("b", cpus=4, max_parallel=3)]
    assert place(needs(1), workers, {"a": [needs(1)]}) == "b"
    # threads: b has 4, 3 taken → a 2-thread trial does not fit anywhere
    full = {"a": [needs(1)], "b": [needs(2), needs(1)]}
    assert place(needs(2), workers, full) is None
    assert place(needs(1), workers, full) == "b"


def test_gpus_are_counted_per_worker() -> None:
    workers = [worker("cpu-only", cpus=64), worker("gpu", gpus=2, engines=("vllm",))]
    assert place(needs(1, gpus=2), workers, {}, engine="vllm") == "gpu"
    assert place(needs(1, gpus=1), workers, {"gpu": [needs(1, 2)]}, engine="vllm") is None
    assert place(needs(1, gpus=4), workers, {}, engine="vllm") is None  # never fits: waits


def test_offline_draining_and_incapable_workers_get_nothing() -> None:
    workers = [
        worker("off", state="offline"),
        worker("drain", draining=True),
        worker("vllm-only", engines=("vllm",)),
    ]
    assert place(needs(1), workers, {}, engine="llamacpp", deployment="local") is None
    assert place(needs(1), [*workers, worker("ok")], {}, engine="llamacpp") == "ok"
    assert place(needs(1), [worker("k8s")], {}, deployment="kubernetes") is None


def test_more_threads_than_a_worker_has_runs_there_alone() -> None:
    workers = [worker("a", cpus=2)]
    assert place(needs(8), workers, {}) == "a"
    assert place(needs(8), workers, {"a": [needs(1)]}) is None


def test_a_retried_trial_avoids_the_lost_worker_when_another_fits() -> None:
    workers = [worker("a"), worker("b")]
    assert place(needs(1), workers, {}, avoid={"a"}) == "b"
    assert place(needs(1), [worker("a")], {}, avoid={"a"}) == "a"  # the only one: back on it


def _spec(**workload: Any) -> StudySpec:
    doc: dict[str, Any] = {
        "engine": {"kind": "llamacpp", "model": "/m.gguf"},
        "deployment": {"kind": "local", "startup_timeout_s": 30, "stop_timeout_s": 5},
        "space": {"params": {"threads": {"kind": "int", "low": 1, "high": 2}}},
        "workload": {"input_tokens": 8, "output_tokens": 4, "request_timeout_s": 10, **workload},
        "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
    }
    return StudySpec.model_validate(doc)


def test_job_timeout_covers_three_runs_at_their_limits() -> None:
    # concurrency 2, 6 requests, 1 warm-up: warm-up 1 wave + 3 waves + drain = 5 × 10 s
    spec = _spec(concurrency=[2], num_requests=6, warmup_requests=1)
    assert worst_case_benchmark_s(spec.workload) == 50.0
    assert job_timeout_s(spec) == 3 * (30 + 50 + 5) + 60
    # two levels of 30 s each: (1 warm-up wave + 30 s + drain) per level
    timed = _spec(concurrency=[1, 4], duration_s=30, warmup_requests=2)
    assert worst_case_benchmark_s(timed.workload) == (20 + 30 + 10) + (10 + 30 + 10)
    rate = _spec(request_rates_per_s=[2.0], num_requests=20, warmup_requests=0)
    assert worst_case_benchmark_s(rate.workload) == 20 / 2.0 + 10
