"""The worker's own bookkeeping without Redis: its name and stable id, the check of job payloads,
and the killing of engines a killed previous incarnation left behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from servetune.cluster.models import TrialJob
from servetune.core.spec import StudySpec
from servetune.deploy.local import group_alive, kill_process_group
from servetune.errors import PathOutside
from servetune.settings import Settings
from servetune.worker.jobs import WorkerRuntime, validate_job
from servetune.worker.main import (
    NameTaken,
    check_name,
    claim_name,
    kill_leftover_engines,
    worker_id_for,
)


def test_a_worker_keeps_its_id_per_host_and_name(tmp_path: Path) -> None:
    first = worker_id_for(tmp_path, "gpu0", "node-1")
    assert first == worker_id_for(tmp_path, "gpu0", "node-1")
    assert first.startswith("node-1-gpu0-")
    assert worker_id_for(tmp_path, "gpu1", "node-1") != first
    # a data directory copied to another host gets a new id there
    assert worker_id_for(tmp_path, "gpu0", "node-2") != first
    assert json.loads((tmp_path / "worker-gpu0.json").read_text())["host"] == "node-2"


def test_a_worker_name_must_be_a_plain_file_name(tmp_path: Path) -> None:
    assert check_name(None) == "default"
    assert check_name("a100.box_2-x") == "a100.box_2-x"
    for bad in ("../x", "a/b", "", ".hidden", "x" * 65, "sp ace"):
        with pytest.raises(ValueError, match="--name"):
            check_name(bad)
    with pytest.raises(PathOutside):
        worker_id_for(tmp_path, "../x", "h")


def _sleeper(marker: str) -> subprocess.Popen[bytes]:
    """A process group leader whose command line holds ``marker`` (a stand-in engine)."""
    return subprocess.Popen(  # noqa: S603 - fixed argv
        ["sh", "-c", f"sleep 60 # {marker}"], start_new_session=True
    )


def test_engines_a_killed_worker_recorded_are_killed_at_its_next_start(tmp_path: Path) -> None:
    ours = _sleeper("/models/tiny.gguf")
    stranger = _sleeper("/models/other.gguf")  # a reused pgid running something else
    record = tmp_path / "worker-w-engines.json"
    record.write_text(
        json.dumps(
            [
                {"pgid": ours.pid, "marker": "/models/tiny.gguf", "job_id": "trial-1-1"},
                {"pgid": stranger.pid, "marker": "/models/tiny.gguf", "job_id": "trial-2-1"},
            ]
        )
    )
    try:
        assert kill_leftover_engines(record) == [ours.pid]
        ours.wait(5)
        assert group_alive(stranger.pid)
        assert json.loads(record.read_text()) == []
        assert kill_leftover_engines(record) == []
        assert kill_leftover_engines(tmp_path / "none.json") == []
    finally:
        for p in (ours, stranger):
            if group_alive(p.pid):
                kill_process_group(p.pid, timeout_s=1)
            p.wait(5)


def test_an_unreadable_engine_record_is_ignored(tmp_path: Path) -> None:
    record = tmp_path / "worker-w-engines.json"
    record.write_text("{not json")
    assert kill_leftover_engines(record) == []
    record.write_text(json.dumps([{"pgid": "x"}, {"pgid": 1, "marker": "m"}, 5]))
    t0 = time.monotonic()
    assert kill_leftover_engines(record) == []  # pgid 1 refused, junk skipped
    assert time.monotonic() - t0 < 1


def _job(worker_id: str) -> TrialJob:
    spec = StudySpec.model_validate(
        {
            "engine": {"kind": "llamacpp", "model": "/m/tiny.gguf"},
            "space": {"params": {"threads": {"kind": "int", "low": 1, "high": 2}}},
            "workload": {
                "input_tokens": 8,
                "output_tokens": 4,
                "concurrency": [1],
                "num_requests": 2,
            },
            "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
        }
    )
    return TrialJob(
        job_id="trial-3-1",
        study_id=1,
        study_name="s",
        trial_id=3,
        number=2,
        params={"threads": 1},
        spec=spec,
        timeout_s=60,
        worker_id=worker_id,
    )


def test_job_payloads_are_checked_field_by_field(tmp_path: Path) -> None:
    rt = WorkerRuntime(Settings(data_dir=tmp_path), "w1", None, tmp_path / "e.json")
    payload = _job("w1").model_dump(mode="json")
    assert validate_job(rt, payload) == _job("w1")
    assert "expected a JSON object" in str(validate_job(rt, "gASV..."))
    reason = str(validate_job(rt, {**payload, "timeout_s": -1, "extra": "x"}))
    assert "timeout_s:" in reason and "extra:" in reason and "-1" not in reason
    missing = {k: v for k, v in payload.items() if k != "params"}
    assert str(validate_job(rt, missing)).startswith("params: Field required")
    assert "for worker 'w2'" in str(validate_job(rt, {**payload, "worker_id": "w2"}))


def test_two_live_workers_cannot_share_a_name(tmp_path: Path) -> None:
    fd = claim_name(tmp_path, "w")
    try:
        with pytest.raises(NameTaken, match=r"already runs .* another --name"):
            claim_name(tmp_path, "w")
        os.close(claim_name(tmp_path, "other"))
    finally:
        os.close(fd)
    os.close(claim_name(tmp_path, "w"))  # free again once its holder is gone
