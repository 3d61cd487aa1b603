"""Issue #7 end to end: one study's trials on two workers through Redis, live logs, faults, cancel.

A private Redis, a manager and two workers run as real processes (``Fleet``) on the tiny model.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from servetune.cluster.models import TrialEventKind
from servetune.modelgen import ModelFiles
from tests.e2e.fleet_harness import (
    FINISHED_TRIAL_STATES,
    ONLINE_WORKER_STATES,
    SERVETUNE,
    Fleet,
    parse_utc,
    record_at,
    record_identity,
    trial_field,
    utc_now,
    wait_for,
    wait_gone,
)
from tests.integration.study_helpers import small_spec, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOG_DELAY_S = 2.0
"""A worker's log line must reach REST and the WebSocket within this long of being written."""

CANCEL_S = 10.0
"""Cancelling a study stops its engines on every worker within this long."""

FAULT_TRIALS = 5
"""Trials of a fault test's study: the baseline, then two rounds of two in parallel; each
fault strikes a search trial (while another may run on the other worker)."""

NOT_MEASURED = ("interrupted", "cancelled")
"""Failure kinds of trials that do not use up the budget (run again by the loop)."""


def fleet_spec(
    model: ModelFiles, name: str, *, trials: int = 7, duration_s: float = 1.5
) -> dict[str, Any]:
    """A grid study on the tiny model with ``budget.parallel`` 2: the baseline, then up to six
    distinct points (threads 1..2 × ctx-size 512/1024/1536), each benchmarked for
    ``duration_s`` at concurrency 2 (a trial lasts about ``duration_s`` + 1 s)."""
    doc = small_spec(model, trials=trials, name=name)
    doc["space"] = {
        "params": {
            "threads": {"kind": "int", "low": 1, "high": 2},
            "ctx-size": {"kind": "choice", "values": [512, 1024, 1536]},
        }
    }
    doc["strategy"] = {"kind": "grid"}
    doc["budget"] = {
        "max_trials": trials,
        "confirm_repeats": 0,
        "baseline_repeats": 1,
        "parallel": 2,
    }
    workload = {k: v for k, v in doc["workload"].items() if k != "num_requests"}
    doc["workload"] = {**workload, "duration_s": duration_s}
    return doc


def assert_settled(fleet: Fleet, study_id: int, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """How every fault test ends (issue #7, item 2): the study finished, every finished trial
    stored exactly once, nothing RUNNING, no orphan engine process. Returns the trials."""
    fleet.wait_study_finished(study_id, timeout_s=150)
    trials = fleet.trials(study_id)
    numbers = [t["number"] for t in trials]
    assert numbers == list(range(len(trials))), f"trial numbers {numbers}: a gap or a duplicate"
    unfinished = [
        (t["number"], t["state"]) for t in trials if t["state"] not in FINISHED_TRIAL_STATES
    ]
    assert not unfinished, f"trials left unfinished: {unfinished}"

    rows = fleet.db_trials(study_id)
    stored = [(r["number"], r["state"]) for r in rows]
    assert stored == [(t["number"], t["state"]) for t in trials], "the database and the API differ"
    assert all(r["has_result"] for r in rows), f"a finished trial without its result: {rows}"

    counted = [
        t
        for t in trials
        if t["role"] in ("baseline", "search")
        and trial_field(t, "failure_kind") not in NOT_MEASURED
    ]
    assert len(counted) == spec["budget"]["max_trials"], [(t["number"], t["state"]) for t in trials]
    configurations = [json.dumps(t["params"], sort_keys=True) for t in counted]
    assert len(set(configurations)) == len(configurations), f"measured twice: {configurations}"

    fleet.wait_no_engines(timeout_s=10)
    return trials


def _interval(trial: dict[str, Any]) -> tuple[Any, Any]:
    started = parse_utc(trial_field(trial, "started_at"))
    finished = parse_utc(trial_field(trial, "finished_at"))
    assert started is not None and finished is not None, f"trial without its times: {trial}"
    return started, finished


def test_two_workers_run_a_parallel_study_at_once_and_their_logs_arrive_within_2_s(
    fleet: Fleet, tiny_model: ModelFiles
) -> None:
    spec = fleet_spec(tiny_model, "on-two-workers")
    with fleet.log_readers() as readers:
        submitted_at = utc_now()
        study_id = fleet.submit(spec)
        fleet.wait_study_finished(study_id, timeout_s=120)
        time.sleep(LOG_DELAY_S + 0.5)  # the last lines of the study get their 2 s to arrive
        stopped_at = utc_now()

    # the study completed with trials on both workers at the same time
    trials = fleet.trials(study_id)
    assert len(trials) >= 6
    assert all(t["state"] == "COMPLETE" for t in trials), [
        (t["number"], t["state"]) for t in trials
    ]
    on = {
        name: [t for t in trials if fleet.worker_name(t.get("worker_id")) == name]
        for name in fleet.workers
    }
    assert all(on.values()), {name: [t["number"] for t in ts] for name, ts in on.items()}
    w1, w2 = on.values()
    overlapping = [
        (a["number"], b["number"])
        for a in w1
        for b in w2
        if max(_interval(a)[0], _interval(b)[0]) < min(_interval(a)[1], _interval(b)[1])
    ]
    assert overlapping, "no two trials ran on the two workers at the same time"

    # results in the manager's database, with the worker that ran each trial
    rows = fleet.db_trials(study_id)
    assert [(r["number"], r["state"], r["has_result"]) for r in rows] == [
        (t["number"], "COMPLETE", 1) for t in trials
    ]
    assert [r["worker_id"] for r in rows] == [t["worker_id"] for t in trials]

    # each worker's log lines, over REST and over the WebSocket, within 2 s of being written
    for name, (rest, ws) in readers.items():
        written = [
            r
            for r in fleet.latest_logs(name)
            if r.get("study_id") == study_id
            and submitted_at <= record_at(r) <= stopped_at - timedelta(seconds=LOG_DELAY_S)
        ]
        assert written, f"worker {name} shipped no log line of study {study_id}"
        sources = {r["source"] for r in written}
        assert {"trial", "engine"} <= sources, f"worker {name} shipped lines from {sources} only"
        one = on[name][-1]  # a trial's own lines, as a trial's log view asks for them
        of_trial = fleet.worker_logs(name, trial=one["id"])
        assert of_trial and {r["trial_id"] for r in of_trial} == {one["id"]}, of_trial[:3]
        for reader in (rest, ws):
            seen = {
                record_identity(s.record): s for s in reader.records(written_after=submitted_at)
            }
            missing = [r["message"] for r in written if record_identity(r) not in seen]
            assert not missing, f"{reader.kind} of {name} never got {missing[:5]}: {reader.errors}"
            late = [
                (s.delay_s, s.record["message"]) for s in seen.values() if s.delay_s > LOG_DELAY_S
            ]
            assert not late, f"{reader.kind} of {name}: lines later than 2 s: {late[:5]}"


def test_submit_creates_a_study_on_the_manager_and_follows_it_to_the_end(
    fleet: Fleet, tiny_model: ModelFiles, tmp_path: Path
) -> None:
    spec_path = write_spec(tmp_path / "spec.yaml", fleet_spec(tiny_model, "submitted", trials=3))
    out = subprocess.run(  # noqa: S603 - argv list of our own CLI
        [*SERVETUNE, "submit", str(spec_path), "--manager", fleet.base_url],
        capture_output=True,
        text=True,
        env=fleet.env(tmp_path / "cli"),
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    study = fleet.study_named("submitted")
    assert study["status"] == "finished"
    trials = fleet.trials(study["id"])
    assert len(trials) == 3
    for t in trials:  # the same trial lines as `servetune run`
        assert f"trial {t['number']:>2} {t['role']}" in out.stdout, out.stdout
    # and the same end: the verdict, the best params and the launch command, then the report
    assert "verdict: " in out.stdout and "launch command" in out.stdout, out.stdout
    assert "llama-server" in out.stdout, out.stdout
    assert out.stdout.rstrip().endswith(f"/api/studies/{study['id']}/report"), out.stdout


def test_a_worker_killed_mid_trial_leaves_no_engine_and_its_trial_is_retried_or_lost(
    fleet: Fleet, tiny_model: ModelFiles
) -> None:
    spec = fleet_spec(tiny_model, "worker-killed", trials=FAULT_TRIALS)
    study_id = fleet.submit(spec)
    caught = fleet.running_trial(study_id, min_number=1)
    fleet.workers[caught.worker].kill9()
    assert not wait_gone(caught.engines, timeout_s=5), "the killed worker's engine outlived it"

    trials = assert_settled(fleet, study_id, spec)
    victim = trials[caught.trial["number"]]
    retried = (
        victim["state"] == "COMPLETE" and fleet.worker_name(victim["worker_id"]) != caught.worker
    )
    lost = victim["state"] == "FAIL" and trial_field(victim, "failure_kind") == "worker_lost"
    assert retried or lost, victim


def test_a_manager_killed_mid_study_ingests_the_results_produced_meanwhile_when_it_returns(
    fleet: Fleet, tiny_model: ModelFiles
) -> None:
    spec = fleet_spec(tiny_model, "manager-killed", trials=FAULT_TRIALS)
    study_id = fleet.submit(spec)
    caught = fleet.running_trial(study_id, min_number=1)
    fleet.manager.kill9()

    # the worker finishes the trial while no manager runs: its result waits in the stream
    def result_sent() -> Any:
        return next(
            (
                e
                for e in fleet.events()
                if e.kind is TrialEventKind.RESULT and e.trial_id == caught.trial["id"]
            ),
            None,
        )

    sent = wait_for(result_sent, 60, what=f"trial {caught.trial['number']}'s result is sent")
    assert sent.result is not None
    fleet.start_manager()

    trials = assert_settled(fleet, study_id, spec)
    victim = trials[caught.trial["number"]]
    assert victim["state"] == sent.result.state.value == "COMPLETE", victim
    assert fleet.worker_name(victim["worker_id"]) == caught.worker
    stored_finished_at = parse_utc(trial_field(victim, "finished_at"))
    assert stored_finished_at is not None and sent.result.finished_at is not None
    assert abs(stored_finished_at - sent.result.finished_at) < timedelta(milliseconds=1)


def test_redis_restarted_mid_study_the_workers_re_register_and_the_study_finishes(
    fleet: Fleet, tiny_model: ModelFiles
) -> None:
    spec = fleet_spec(tiny_model, "redis-restarted", trials=FAULT_TRIALS)
    study_id = fleet.submit(spec)
    fleet.running_trial(study_id, min_number=1)
    fleet.restart_redis()  # its data is lost: queue, stream, registry

    slack_s = 1.5  # redis-py's reconnection backoff on top of the heartbeat period
    wait_for(
        lambda: all(fleet.registered(name) for name in fleet.workers),
        fleet.heartbeat_s + slack_s,
        what="every worker re-registers within one heartbeat",
    )
    states = fleet.wait_workers_online(timeout_s=10)
    assert all(states[n] in ONLINE_WORKER_STATES for n in fleet.workers)
    assert_settled(fleet, study_id, spec)


def test_a_worker_stopped_with_sigterm_mid_trial_hands_its_trial_back(
    fleet: Fleet, tiny_model: ModelFiles
) -> None:
    spec = fleet_spec(tiny_model, "worker-sigterm", trials=FAULT_TRIALS)
    study_id = fleet.submit(spec)
    caught = fleet.running_trial(study_id, min_number=1)
    worker = fleet.workers[caught.worker]
    worker.sigterm()
    assert worker.wait(timeout_s=20) == 0, worker.tail()
    assert not wait_gone(caught.engines, timeout_s=5), "the stopped worker's engine outlived it"

    trials = assert_settled(fleet, study_id, spec)
    victim = trials[caught.trial["number"]]
    # finished or handed back and run again: never silently dropped, never a failure
    assert victim["state"] == "COMPLETE", victim


def test_cancelling_a_running_study_stops_its_engines_on_every_worker_within_10_s(
    fleet: Fleet, tiny_model: ModelFiles
) -> None:
    spec = fleet_spec(tiny_model, "cancelled", duration_s=5.0)
    study_id = fleet.submit(spec)
    wait_for(
        lambda: all(fleet.engines_of(name) for name in fleet.workers),
        90,
        what="both workers run an engine of the study",
    )
    running = [t["number"] for t in fleet.trials(study_id) if t["state"] == "RUNNING"]
    asked_at = time.monotonic()
    answer = fleet.cancel(study_id)
    assert answer.status_code < 300, answer.text
    fleet.wait_no_engines(timeout_s=CANCEL_S - (time.monotonic() - asked_at))

    assert fleet.wait_study_ended(study_id, timeout_s=30)["status"] == "cancelled"
    trials = fleet.trials(study_id)
    assert not [t["number"] for t in trials if t["state"] not in FINISHED_TRIAL_STATES]
    assert len(running) == 2, running
    for number in running:
        t = trials[number]
        assert (t["state"], trial_field(t, "failure_kind")) == ("FAIL", "cancelled"), t
