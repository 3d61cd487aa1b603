"""Unit tests of what crosses Redis, without a socket: masked URLs, the JSON-only job serializer,
and every fleet model round-tripping through JSON as its own type with no warning.

Run with ``-W error``: a pydantic serialization warning fails the test.
"""

from __future__ import annotations

import asyncio
import pickle
import warnings
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import arq.constants
import pytest
from arq.jobs import deserialize_job, deserialize_result, serialize_job, serialize_result
from pydantic import BaseModel
from redis.exceptions import AuthenticationError, ConnectionError

from servetune.cluster import keys
from servetune.cluster.models import (
    GPUInfo,
    GpuSample,
    Heartbeat,
    LogRecord,
    LogSource,
    RunningTrial,
    TrialEvent,
    TrialEventKind,
    TrialJob,
    WorkerInfo,
)
from servetune.cluster.queue import (
    JOB_FUNCTION,
    JSON_DESERIALIZER,
    JSON_SERIALIZER,
    RemoteJobError,
)
from servetune.cluster.redis import (
    client_url,
    connect,
    connect_sync,
    retries_for,
    safe_url,
    translate,
)
from servetune.cluster.registry import WorkerStatus
from servetune.core.metrics import LoadLevel, RequestRecord, summarize
from servetune.core.spec import parse_spec
from servetune.core.study import FailureKind, TrialNeeds, TrialResult, TrialState
from servetune.errors import PayloadRefused, RedisUnavailable

NOW = datetime(2026, 11, 30, 1, 2, 3, 456789, tzinfo=UTC)
SPEC = parse_spec(
    {
        "name": "wire",
        "engine": {"kind": "llamacpp", "model": "model.gguf"},
        "space": {"params": {"threads": {"kind": "int", "low": 1, "high": 4}}},
        "workload": {"concurrency": [2], "num_requests": 4},
        "slos": [{"metric": "ttft_ms", "percentile": "p99", "max_ms": 500}],
        "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
    }
)
H100 = GPUInfo(
    index=0,
    name="NVIDIA H100 80GB HBM3",
    uuid="GPU-5e0b4c4e-2f7a-6c1d-9e8f-0a1b2c3d4e5f",
    memory_total_gib=79.65,
    memory_used_gib=0.52,
    memory_free_gib=79.13,
    utilization_pct=0.0,
    temperature_c=31.0,
    power_w=71.4,
)


def _result() -> TrialResult:
    records = [
        RequestRecord(
            sent_s=0.0 + i, chunk_times_s=(0.1 + i, 0.15 + i, 0.2 + i), done_s=0.2 + i,
            output_tokens=3, max_tokens=3,
        )
        for i in range(4)
    ]  # fmt: skip
    metrics = summarize(LoadLevel(concurrency=2), records)
    return TrialResult(
        state=TrialState.COMPLETE,
        metrics=[metrics],
        feasible=True,
        objective_values=[metrics.output_tokens_per_s],
        launch_argv=["llama-server", "--threads", "2"],
        started_at=NOW,
        finished_at=NOW + timedelta(seconds=3),
        engine_start_s=1.25,
        benchmark_s=1.5,
    )


def _job(**changes: Any) -> TrialJob:
    doc: dict[str, Any] = {
        "job_id": "trial-7-1",
        "study_id": 3,
        "study_name": "wire",
        "trial_id": 7,
        "number": 2,
        "params": {"threads": 2, "flash-attn": True, "cache-type-k": "q8_0", "rope-scale": 0.5},
        "spec": SPEC,
        "needs": TrialNeeds(cpu_threads=2),
        "timeout_s": 95.5,
        "worker_id": "w-abc",
    }
    doc.update(changes)
    return TrialJob(**doc)


def _every_model() -> list[BaseModel]:
    info = WorkerInfo(
        id="w-abc", hostname="gpu-1", alias="left rack", address="10.0.0.7", pid=4242,
        version="0.1.0", engines=["llamacpp", "vllm"], deployments=["local", "docker"],
        gpus=[H100], cpu_count=64, memory_total_gib=503.2, max_parallel=2, started_at=NOW,
    )  # fmt: skip
    running = RunningTrial(job_id="trial-7-1", study_id=3, trial_id=7, number=2, started_at=NOW)
    heartbeat = Heartbeat(
        worker_id="w-abc", sent_at=NOW, running=[running], gpus=[H100],
        memory_available_gib=480.0, cpu_load_fraction=0.25, draining=False,
    )  # fmt: skip
    failed = TrialResult(
        state=TrialState.FAIL, failure_kind=FailureKind.CANCELLED, failure_reason="aborted"
    )
    return [
        H100,
        info,
        running,
        heartbeat,
        GpuSample(at=NOW, gpus=[H100, H100.model_copy(update={"index": 1})]),
        _job(),
        TrialEvent(kind=TrialEventKind.STARTED, job_id="trial-7-1", study_id=3, trial_id=7,
                   number=2, worker_id="w-abc", at=NOW, pid=31337),
        TrialEvent(kind=TrialEventKind.RESULT, job_id="trial-7-1", study_id=3, trial_id=7,
                   number=2, worker_id="w-abc", at=NOW, result=_result()),
        TrialEvent(kind=TrialEventKind.RESULT, job_id="trial-7-2", study_id=3, trial_id=7,
                   number=2, attempt=2, worker_id="w-abc", at=NOW, result=failed),
        LogRecord(at=NOW, level="INFO", levelno=20, message="ready", logger="engine",
                  worker_id="w-abc", source=LogSource.ENGINE, study_id=3, trial_id=7,
                  trial_number=2),
        WorkerStatus(info=info, state="busy", last_heartbeat=heartbeat, last_seen_at=NOW),
        WorkerStatus(info=info, state="offline", last_heartbeat=None, last_seen_at=None),
    ]  # fmt: skip


@pytest.mark.parametrize("model", _every_model(), ids=lambda m: type(m).__name__)
def test_every_model_crossing_redis_round_trips_as_its_own_type_without_warnings(
    model: BaseModel,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = model.model_dump_json()
        back = type(model).model_validate_json(text)
        via_python = type(model).model_validate(model.model_dump(mode="json"))
    assert back == model and via_python == model
    assert type(back) is type(model)


def test_datetimes_in_messages_come_back_as_aware_utc() -> None:
    paris = timezone(timedelta(hours=1))
    sample = GpuSample(at=datetime(2026, 11, 30, 2, 0, tzinfo=paris), gpus=[])
    back = GpuSample.model_validate_json(sample.model_dump_json())
    assert back.at.utcoffset() == timedelta(0) and back.at == sample.at
    with pytest.raises(ValueError, match="timezone"):
        GpuSample(at=datetime(2026, 11, 30, 2, 0), gpus=[])


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:secret@h:1/0", "redis://:***@h:1/0"),
        ("redis://alice:s3cr%40t@db.example:6380/2", "redis://alice:***@db.example:6380/2"),
        ("rediss://:p@ss@h:6379", "rediss://:***@h:6379"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://alice@h:1/0", "redis://alice@h:1/0"),
        (
            "unix:///run/redis.sock?db=1&password=hunter2",
            "unix:///run/redis.sock?db=1&password=***",
        ),
    ],
)
def test_safe_url_masks_the_password_and_nothing_else(url: str, masked: str) -> None:
    assert safe_url(url) == masked


def test_a_url_that_is_not_redis_names_the_field_and_hides_the_password() -> None:
    with pytest.raises(RedisUnavailable) as info:
        connect("http://:topsecret@h:1/0")
    text = str(info.value)
    assert "redis_url" in text and "redis://" in text and "SERVETUNE_REDIS_URL" in text
    assert "topsecret" not in text and ":***@" in text
    with pytest.raises(RedisUnavailable, match="redis_url"):
        connect_sync("localhost:6379")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:1/2", "redis://:***@h:1/2"),
        ("rediss://alice:pw@h:6380/0", "rediss://alice:***@h:6380/0"),
        ("redis://h", "redis://h:6379/0"),
        ("unix:///run/redis.sock?db=3", "unix:///run/redis.sock?db=3"),
    ],
)
def test_a_clients_url_is_shown_with_its_password_masked(url: str, shown: str) -> None:
    r = connect_sync(url)
    assert client_url(r) == shown
    r.close()


def test_clients_retry_lost_connections_for_about_the_time_asked() -> None:
    r = connect("redis://:pw@127.0.0.1:1/0", retry_for_s=30)
    retry = r.connection_pool.connection_kwargs["retry"]
    assert retry._retries == retries_for(30) >= 10
    assert r.connection_pool.connection_kwargs["decode_responses"] is False
    asyncio.run(r.aclose())
    assert retries_for(0.1) == 1


def test_redis_errors_become_redis_unavailable_saying_what_to_check() -> None:
    down = translate(ConnectionError("Connection refused"), "redis://:***@h:1/0", "listing workers")
    assert "redis-server running" in str(down) and "redis://:***@h:1/0" in str(down)
    assert "listing workers" in str(down)
    auth = translate(AuthenticationError("invalid password"), "redis://:***@h:1/0", "reading")
    assert "password" in str(auth) and "requirepass" in str(auth)


def test_the_json_serializer_carries_a_trial_job_through_arq_unchanged() -> None:
    job = _job()
    data = serialize_job(JOB_FUNCTION, (), {"payload": job.model_dump(mode="json")}, None, 1,
                         serializer=JSON_SERIALIZER)  # fmt: skip
    assert data.startswith(b"{")
    back = deserialize_job(data, deserializer=JSON_DESERIALIZER)
    assert back.function == JOB_FUNCTION
    assert TrialJob.model_validate(back.kwargs["payload"]) == job


def test_a_failed_jobs_exception_travels_as_json_and_comes_back_as_remote_job_error() -> None:
    data = serialize_result(JOB_FUNCTION, (), {}, 1, 1, False, asyncio.CancelledError(), 2, 3,
                            "ref", "q", "trial-7-1", serializer=JSON_SERIALIZER)  # fmt: skip
    assert data is not None
    result = deserialize_result(data, deserializer=JSON_DESERIALIZER)
    assert isinstance(result.result, RemoteJobError)
    assert result.result.type_name == "CancelledError" and not result.success


class _Touch:
    """What an attacker would enqueue: unpickling it runs code (here: creates a file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_the_deserializer_refuses_pickles_and_everything_but_a_json_object(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"t": 1, "f": JOB_FUNCTION, "a": [], "k": {"p": _Touch(marker)}, "et": 1})
    with pytest.raises(PayloadRefused, match="pickle"):
        JSON_DESERIALIZER(evil)
    assert not marker.exists()
    for bad in (pickle.dumps({"a": 1}, protocol=0), b"[1, 2]", b'{"x": NaN}', b"\xff\xfe{}"):
        with pytest.raises(PayloadRefused):
            JSON_DESERIALIZER(bad)


def test_the_serializer_refuses_what_is_not_plain_json() -> None:
    with pytest.raises(TypeError, match="model_dump"):
        JSON_SERIALIZER({"k": {"payload": _job()}})
    with pytest.raises(ValueError):
        JSON_SERIALIZER({"x": float("nan")})


def test_arq_key_names_listed_in_keys_match_arq() -> None:
    assert keys.arq_job("j") == arq.constants.job_key_prefix + "j"
    assert keys.arq_in_progress("j") == arq.constants.in_progress_key_prefix + "j"
    assert keys.arq_result("j") == arq.constants.result_key_prefix + "j"
    assert arq.constants.abort_jobs_ss == keys.ARQ_ABORT
