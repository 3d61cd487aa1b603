"""End-to-end studies against the real llama.cpp server on the tiny model, through the CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.study_helpers import cli_env, servetune, small_spec, write_spec

pytestmark = pytest.mark.integration


def _show(tmp_path: Path, study: str) -> dict:
    out = servetune(tmp_path, "show", study, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_real_study_persists_trials_with_consistent_metrics(tiny_model, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "spec.yaml", small_spec(tiny_model, trials=4, name="e2e"))
    run = servetune(tmp_path, "run", str(spec))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "launch command" in run.stdout

    shown = _show(tmp_path, "e2e")
    trials = shown["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert trials[0]["role"] == "baseline" and trials[0]["params"] == {}
    assert all(t["state"] == "COMPLETE" for t in trials), trials
    for t in trials[1:]:
        assert set(t["params"]) == {"threads", "parallel", "batch-size"}
    for t in trials:
        (level,) = t["metrics"]
        assert level["completed"] == 6 and level["failed"] == 0 and level["warmup"] == 1
        # the server's own usage counts agree with what was asked for
        assert level["mean_output_tokens"] == 12
        assert abs(level["mean_prompt_tokens"] - 32) <= 2
        assert level["prompt_token_mismatches"] == 0
        # throughput is consistent with the counted tokens and the measured window
        expected = level["completed"] * level["mean_output_tokens"] / level["duration_s"]
        assert level["output_tokens_per_s"] == pytest.approx(expected, rel=1e-6)
        # the client's own load is recorded with each level (0 ≤ CPU share, lag in ms)
        assert level["client_cpu_fraction"] >= 0 and level["client_loop_lag_p99_ms"] >= 0
        assert (
            0 < level["ttft_ms"]["p50"] <= level["ttft_ms"]["p99"] <= level["e2e_latency_ms"]["max"]
        )
        assert t["feasible"] is True
    assert shown["best_trial"]["number"] in {0, 1, 2, 3}
    assert shown["study"]["status"] == "finished"

    exported = servetune(tmp_path, "export", "e2e", "--format", "json")
    assert exported.returncode == 0, exported.stderr
    data = json.loads(exported.stdout)
    assert data["trial"] == shown["best_trial"]["number"] and "--model" in data["argv"]

    html_path = tmp_path / "r.html"
    rep = servetune(tmp_path, "report", "e2e", "-o", str(html_path))
    assert rep.returncode == 0, rep.stderr
    page = html_path.read_text()
    assert "servetune study e2e" in page and "plotly" in page.lower() and "<table>" in page


def test_failing_candidate_is_recorded_and_study_continues(tiny_model, tmp_path: Path) -> None:
    doc = small_spec(tiny_model, trials=4, name="fails")
    # parallel=64 cannot hold 64 × (32 + 12) tokens in a 2048-token context: rejected before launch.
    # ctx-size=30M with an f32 KV cache (~234 GiB) cannot be allocated: the engine fails to start.
    doc["space"] = {
        "params": {
            "parallel": {"kind": "choice", "values": [1, 64]},
            "ctx-size": {"kind": "choice", "values": [2048, 30_000_000]},
        }
    }
    doc["engine"]["flags"] = {"cache-type-k": "f32", "cache-type-v": "f32"}
    doc["strategy"] = {"kind": "grid"}
    doc["budget"] = {"max_trials": 5, "confirm_repeats": 0}
    spec = write_spec(tmp_path / "spec.yaml", doc)
    before = _engine_pids()
    run = servetune(tmp_path, "run", str(spec))
    assert run.returncode == 0, run.stdout + run.stderr
    shown = _show(tmp_path, "fails")["trials"]
    assert len(shown) == 5  # baseline + the 4 grid points: the failures did not stop the study
    trials = {tuple(sorted(t["params"].items())): t for t in shown}
    assert shown[0]["state"] == "COMPLETE"
    ok = trials[(("ctx-size", 2048), ("parallel", 1))]
    assert ok["state"] == "COMPLETE"
    too_many_slots = trials[(("ctx-size", 2048), ("parallel", 64))]
    assert too_many_slots["state"] == "FAIL"
    assert too_many_slots["failure_kind"] == "preflight_rejected"
    assert "ctx-size" in too_many_slots["failure_reason"]
    assert "parallel" in too_many_slots["failure_reason"]
    huge = trials[(("ctx-size", 30_000_000), ("parallel", 1))]
    assert huge["state"] == "FAIL"
    assert huge["failure_kind"] == "kv_cache_too_small", huge
    assert huge["failure_reason"]
    assert not (_engine_pids() - before), "an engine outlived its trial"


def test_invalid_spec_exits_2_with_one_message_per_problem(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path / "bad.yaml",
        {
            "engine": {"kind": "llamacpp", "model": "missing.gguf"},
            "space": {"params": {"threads": {"kind": "int", "low": 4, "high": 1}}},
            "workload": {"concurrency": [1], "num_requests": 0},
            "objective": {"metric": "tokens_per_s", "direction": "maximize"},
            "budgett": {},
        },
    )
    for command in ("validate", "run"):
        out = servetune(tmp_path, command, str(spec))
        assert out.returncode == 2, out.stdout + out.stderr
        text = out.stderr
        for field in (
            "space.params.threads",
            "workload.num_requests",
            "objective.terms.0.metric",
            "budgett",
        ):
            assert field in text, text
        assert "5 problem(s)" in text
    # nothing was written for the invalid spec
    db = tmp_path / "studies.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from studies").fetchone()[0] == 0


def _engine_pids() -> set[int]:
    out = subprocess.run(
        ["pgrep", "-f", "servetune.engines.xllamacpp_server"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {int(p) for p in out.stdout.split()}


def test_sigkill_then_resume_finishes_every_trial_once(tiny_model, tmp_path: Path) -> None:
    doc = small_spec(tiny_model, trials=6, name="killed")
    doc["workload"] = {**doc["workload"], "num_requests": 16}
    spec = write_spec(tmp_path / "spec.yaml", doc)
    before = _engine_pids()
    proc = subprocess.Popen(  # noqa: S603 - argv list of our own CLI
        [sys.executable, "-m", "servetune", "run", str(spec)],
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = tmp_path / "studies.db"
    deadline = time.monotonic() + 120
    running_after_done = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    with sqlite3.connect(db) as conn:
                        states = [
                            r[0] for r in conn.execute("select state from trials order by number")
                        ]
                except sqlite3.OperationalError:
                    states = []
                if "COMPLETE" in states and states[-1] == "RUNNING":
                    running_after_done = True
                    break
            time.sleep(0.05)
        assert running_after_done, "never saw a finished trial followed by a running one"
        time.sleep(0.3)  # let the running trial get its engine up
        os.kill(proc.pid, signal.SIGSTOP)  # frozen mid-trial: alive, holding its lock
        # a second process cannot take over the live study
        rival = servetune(tmp_path, "resume", "killed")
        assert rival.returncode == 1, rival.stdout + rival.stderr
        assert "being run by another process" in rival.stderr
        assert _show(tmp_path, "killed")["study"]["status"] == "running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with sqlite3.connect(db) as conn:
        finished_before = {
            n: s
            for n, s in conn.execute(
                "select number, finished_at from trials where state != 'RUNNING'"
            )
        }
    # the engine of the killed study does not outlive it
    deadline = time.monotonic() + 10
    while _engine_pids() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (_engine_pids() - before), "an engine outlived the SIGKILLed study"
    assert _show(tmp_path, "killed")["study"]["status"].startswith("interrupted")

    out = servetune(tmp_path, "resume", "killed")
    assert out.returncode == 0, out.stdout + out.stderr
    trials = _show(tmp_path, "killed")["trials"]
    assert not [t for t in trials if t["state"] == "RUNNING"]
    interrupted = [t for t in trials if t["failure_kind"] == "interrupted"]
    assert len(interrupted) == 1
    # the interrupted trial does not use up the budget: 6 measured baseline/search trials
    searched = [
        t
        for t in trials
        if t["role"] in ("baseline", "search") and t["failure_kind"] != "interrupted"
    ]
    assert len(searched) == 6
    assert all(t["state"] == "COMPLETE" for t in searched)
    numbers = [t["number"] for t in trials]
    assert numbers == sorted(set(numbers))
    with sqlite3.connect(db) as conn:
        after = {n: s for n, s in conn.execute("select number, finished_at from trials")}
    for number, finished_at in finished_before.items():
        assert after[number] == finished_at, f"trial {number} was re-run"
    assert not (_engine_pids() - before)


def test_study_on_postgresql_then_resume_is_a_no_op(
    tiny_model, tmp_path: Path, fresh_postgres_url: str
) -> None:
    spec = write_spec(tmp_path / "spec.yaml", small_spec(tiny_model, trials=3, name="on-pg"))
    run = servetune(tmp_path, "run", str(spec), "--db", fresh_postgres_url)
    assert run.returncode == 0, run.stdout + run.stderr
    out = servetune(tmp_path, "show", "on-pg", "--json", "--db", fresh_postgres_url)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert [t["state"] for t in shown["trials"]] == ["COMPLETE"] * 3
    assert shown["trials"][0]["role"] == "baseline"
    assert shown["study"]["status"] == "finished"
    # resuming a finished study runs nothing again
    again = servetune(tmp_path, "resume", "on-pg", "--db", fresh_postgres_url)
    assert again.returncode == 0, again.stdout + again.stderr
    out = servetune(tmp_path, "show", "on-pg", "--json", "--db", fresh_postgres_url)
    assert len(json.loads(out.stdout)["trials"]) == 3


def test_sigint_during_the_baseline_then_resume_reruns_the_baseline(
    tiny_model, tmp_path: Path
) -> None:
    doc = small_spec(tiny_model, trials=3, name="ctrl-c")
    doc["workload"] = {**doc["workload"], "num_requests": 120}  # trial 0 outlasts the signal
    spec = write_spec(tmp_path / "spec.yaml", doc)
    before = _engine_pids()
    proc = subprocess.Popen(  # noqa: S603 - argv list of our own CLI
        [sys.executable, "-m", "servetune", "run", str(spec)],
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    db = tmp_path / "studies.db"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # wait until trial 0's engine is up (a new engine process exists)
            if db.exists() and _engine_pids() - before:
                break
            time.sleep(0.05)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "servetune resume" in err
    first = _show(tmp_path, "ctrl-c")
    assert [(t["number"], t["state"], t["failure_kind"]) for t in first["trials"]] == [
        (0, "FAIL", "cancelled")
    ]
    assert first["study"]["status"] == "cancelled"
    assert not (_engine_pids() - before)

    out = servetune(tmp_path, "resume", "ctrl-c")
    assert out.returncode == 0, out.stdout + out.stderr
    trials = _show(tmp_path, "ctrl-c")["trials"]
    baselines = [t for t in trials if t["role"] == "baseline"]
    assert [t["state"] for t in baselines] == ["FAIL", "COMPLETE"]  # the lost baseline was re-run
    measured = [t for t in trials if t["failure_kind"] != "cancelled"]
    assert len(measured) == 3 and all(t["state"] == "COMPLETE" for t in measured)
