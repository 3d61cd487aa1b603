"""End-to-end studies against the real llama.cpp server on the tiny model, through the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from servetune.core.study import FailureKind, TrialState
from servetune.errors import ServetuneError
from servetune.store.repo import StudyStore
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
    # parallel=64 splits a 2048-token context into 64 slots of 256 (llama.cpp pads each share up
    # to 256), too small for one 300 + 12 token request: rejected before launch.
    # ctx-size=30M with an f32 KV cache (~234 GiB) cannot be allocated: the engine fails to start.
    doc["space"] = {
        "params": {
            "parallel": {"kind": "choice", "values": [1, 64]},
            "ctx-size": {"kind": "choice", "values": [2048, 30_000_000]},
        }
    }
    doc["engine"]["flags"] = {"cache-type-k": "f32", "cache-type-v": "f32"}
    doc["workload"]["input_tokens"] = 300
    doc["strategy"] = {"kind": "grid"}
    doc["budget"] = {"max_trials": 5, "confirm_repeats": 0, "baseline_repeats": 1}
    spec = write_spec(tmp_path / "spec.yaml", doc)
    before = _engine_pids(tiny_model.gguf_path)
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
    assert not (_engine_pids(tiny_model.gguf_path) - before), "an engine outlived its trial"


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


def _engine_pids(model: Path) -> set[int]:
    """Pids of engines serving ``model`` (this test session's tiny model): other test sessions
    on a shared machine run engines of their own, which are none of these tests' business."""
    out = subprocess.run(  # noqa: S603 - fixed argv
        ["pgrep", "-f", f"servetune.engines.xllamacpp_server.*{model}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {int(p) for p in out.stdout.split()}


def test_sigkill_then_resume_finishes_every_trial_once(tiny_model, tmp_path: Path) -> None:
    doc = small_spec(tiny_model, trials=6, name="killed")
    doc["workload"] = {**doc["workload"], "num_requests": 16}
    spec = write_spec(tmp_path / "spec.yaml", doc)
    before = _engine_pids(tiny_model.gguf_path)
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
    while _engine_pids(tiny_model.gguf_path) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (_engine_pids(tiny_model.gguf_path) - before), (
        "an engine outlived the SIGKILLed study"
    )
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
    assert not (_engine_pids(tiny_model.gguf_path) - before)


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
    before = _engine_pids(tiny_model.gguf_path)
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
            if db.exists() and _engine_pids(tiny_model.gguf_path) - before:
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
    assert not (_engine_pids(tiny_model.gguf_path) - before)

    out = servetune(tmp_path, "resume", "ctrl-c")
    assert out.returncode == 0, out.stdout + out.stderr
    trials = _show(tmp_path, "ctrl-c")["trials"]
    baselines = [t for t in trials if t["role"] == "baseline"]
    assert [t["state"] for t in baselines] == ["FAIL", "COMPLETE"]  # the lost baseline was re-run
    measured = [t for t in trials if t["failure_kind"] != "cancelled"]
    assert len(measured) == 3 and all(t["state"] == "COMPLETE" for t in measured)


def test_noise_aware_study_repeats_the_baseline_confirms_the_top_k_and_recommends_from_repeats(
    tiny_model, tmp_path: Path
) -> None:
    doc = small_spec(tiny_model, trials=4, name="noise")
    doc["strategy"] = {"kind": "grid"}
    doc["budget"] = {
        "max_trials": 4,
        "baseline_repeats": 2,
        "confirm_top_k": 2,
        "confirm_repeats": 1,
    }
    spec = write_spec(tmp_path / "spec.yaml", doc)
    run = servetune(tmp_path, "run", str(spec))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "run-to-run spread of the engine defaults over 2 runs" in run.stdout, run.stdout

    shown = _show(tmp_path, "noise")
    trials = shown["trials"]
    roles = [(t["number"], t["role"]) for t in trials]
    # the baseline, its early repeat before any search trial, 3 search trials (4 = baseline +
    # 3: repeats use no budget), then one round: the baseline and the 2 best candidates again
    assert roles[:5] == [
        (0, "baseline"),
        (1, "confirm"),
        (2, "search"),
        (3, "search"),
        (4, "search"),
    ]
    assert len(trials) == 8 and all(t["state"] == "COMPLETE" for t in trials), trials
    verdict = shown["study"]["verdict"]
    candidates = verdict["candidates"]
    assert len(candidates) == 2 and len({json.dumps(trials[c]["params"]) for c in candidates}) == 2
    repeats: dict[int, int] = {}
    confirm_numbers = [t["number"] for t in trials if t["role"] == "confirm"]
    for number in confirm_numbers:
        repeat_of = next(r for r in _repeat_of(tmp_path, "noise") if r[0] == number)[1]
        repeats[repeat_of] = repeats.get(repeat_of, 0) + 1
    assert repeats == {0: 2, candidates[0]: 1, candidates[1]: 1}
    # the verdict compares the chosen candidate's fresh repeat with every run of the defaults
    v = verdict["verdict"]
    assert len(v["baseline_values"]) == 3 and v["repeats"] == 1 and v["statistic"] == "median"
    assert verdict["noise_pct"] is not None and verdict["objective_measured"] is True
    recommended = verdict["recommended_trial"]
    if v["is_win"]:
        assert recommended in candidates and "confirmed gain" in verdict["recommendation"]
    else:
        assert recommended == 0 and "keep the engine defaults" in verdict["recommendation"]
    assert "misses" not in run.stdout and "verdict" in run.stdout


def _repeat_of(tmp_path: Path, study: str) -> list[tuple[int, int | None]]:
    """(number, repeat_of) of every trial of ``study``, read from the database itself."""
    db = tmp_path / "studies.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT t.number, t.repeat_of FROM trials t JOIN studies s ON s.id = t.study_id "
            "WHERE s.name = ? ORDER BY t.number",
            (study,),
        ).fetchall()
    return [(int(n), r) for n, r in rows]


def test_validate_refuses_unmeasurable_and_unbounded_specs_naming_field_and_bound(
    tiny_model, tmp_path: Path
) -> None:
    doc = small_spec(tiny_model, name="bad")
    doc["workload"] = {**doc["workload"], "output_tokens": 1}
    doc["slos"] = [{"metric": "tpot_ms", "percentile": "p99", "max_ms": 50}]
    out = servetune(tmp_path, "validate", str(write_spec(tmp_path / "a.yaml", doc)))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "slos.0.metric" in out.stdout + out.stderr and "output_tokens" in out.stdout + out.stderr

    doc = small_spec(tiny_model, name="huge")
    doc["strategy"] = {"kind": "grid"}
    doc["space"] = {
        "params": {
            "threads": {"kind": "int", "low": 1, "high": 100_000},
            "batch-size": {"kind": "int", "low": 1, "high": 100_000},
        }
    }
    t0 = time.monotonic()
    out = servetune(tmp_path, "validate", str(write_spec(tmp_path / "b.yaml", doc)))
    assert time.monotonic() - t0 < 30
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2 and "10,000,000,000 points" in text and "100,000" in text, text


# ---- the loop's noise-aware phases with scripted measurements (real SQLite store) ----------


def _scripted_loop(tmp_path: Path, values: dict[str, list[float]], cancel_at: int | None = None):
    """A StudyLoop over a real SQLite store whose runner returns scripted throughputs per
    configuration (in order of its runs) and is cancelled at trial ``cancel_at``."""
    import asyncio

    from servetune.core.metrics import LoadLevel, ServingMetrics, distribution
    from servetune.core.slo import check_slos
    from servetune.core.spec import parse_spec
    from servetune.core.study import TrialResult, TrialState
    from servetune.loop import StudyLoop
    from servetune.runner import TrialContext
    from servetune.store.repo import StudyStore

    doc = {
        "name": "scripted",
        "engine": {"kind": "llamacpp", "model": str(tmp_path / "m.gguf")},
        "space": {"params": {"threads": {"kind": "int", "low": 1, "high": 3}}},
        "strategy": {"kind": "grid"},
        "budget": {
            "max_trials": 4,
            "baseline_repeats": 2,
            "confirm_top_k": 2,
            "confirm_repeats": 1,
        },
        "workload": {"concurrency": [1], "num_requests": 4},
        "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
    }
    spec = parse_spec(doc)
    store = StudyStore(f"sqlite:///{tmp_path / 'loop.db'}")
    try:
        study = store.get_study("scripted")
    except Exception:
        study = store.create_study("scripted", spec, doc)
    seen: dict[str, int] = {}
    for t in store.trials(study.id):
        if t.state is TrialState.COMPLETE:
            name = str(t.params.get("threads", "defaults"))
            seen[name] = seen.get(name, 0) + 1

    async def runner(ctx: TrialContext, params: dict, number: int) -> TrialResult:
        if number == cancel_at:
            raise asyncio.CancelledError
        name = str(params.get("threads", "defaults"))
        value = values[name][seen.get(name, 0)]
        seen[name] = seen.get(name, 0) + 1
        dist = distribution([10.0])
        metrics = [
            ServingMetrics(
                level=LoadLevel(concurrency=1),
                completed=4,
                failed=0,
                duration_s=1.0,
                ttft_ms=dist,
                output_tokens_per_s=value,
                requests_per_s=4.0,
                goodput_requests_per_s=4.0,
                error_rate=0.0,
            )
        ]
        report = check_slos([], metrics, 0.0)
        return TrialResult(
            state=TrialState.COMPLETE,
            metrics=metrics,
            slo_report=report,
            feasible=True,
            objective_values=[value],
        )

    from servetune.engines import get_engine

    # the real engine adapter: the loop asks it which params run the same configuration
    engine = get_engine(spec.engine)
    ctx = TrialContext(spec=spec, engine=engine, deployment=None, client=None, log_dir=tmp_path)  # type: ignore[arg-type]
    return StudyLoop(store, study, ctx, runner=runner), store, study


def test_loop_confirms_distinct_top_candidates_and_resumes_an_interrupted_confirm(
    tmp_path: Path,
) -> None:
    import asyncio

    # defaults ~30 tok/s; threads=3 is a lucky 116.7 in the search and ~31 on fresh servers;
    # threads=2 is a real gain (50 → 49)
    values = {
        "defaults": [30.1, 29.3, 29.9],
        "1": [25.0],
        "2": [50.0, 49.0],
        "3": [116.7, 31.0],
    }
    # trials: 0 baseline, 1 early repeat, 2-4 search (threads 1, 2, 3), then round 1: 5 repeats
    # the defaults, 6 repeats threads=3 (the search's best), 7 threads=2; cancelled at 6
    loop, store, study = _scripted_loop(tmp_path, values, cancel_at=6)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(loop.run())
    assert store.get_study(study.id).status == "cancelled"

    loop, store, study = _scripted_loop(tmp_path, values)
    outcome = asyncio.run(loop.run())
    trials = store.trials(study.id)
    roles = [(t.number, t.role.value, t.repeat_of) for t in trials]
    assert roles[:5] == [
        (0, "baseline", None),
        (1, "confirm", 0),
        (2, "search", None),
        (3, "search", None),
        (4, "search", None),
    ]
    # the cancelled repeat of trial 4 is recorded and run again; nothing else is re-run
    assert roles[5:] == [(5, "confirm", 0), (6, "confirm", 4), (7, "confirm", 4), (8, "confirm", 3)]
    assert trials[6].failure_kind is not None and trials[6].failure_kind.value == "cancelled"
    assert [t.number for t in trials if t.role.value == "search"] == [2, 3, 4]  # budget: 4 in all
    assert outcome.candidates == (4, 3)
    # the lucky 116.7 loses on its repeat; threads=2 wins on its repeat beyond the spread
    assert outcome.recommended is not None and outcome.recommended.number == 3
    assert outcome.verdict is not None and outcome.verdict.is_win
    assert outcome.verdict.best_values == [49.0]
    assert outcome.verdict.baseline_values == [30.1, 29.3, 29.9]
    verdict = store.get_study(study.id).verdict or {}
    assert verdict["candidates"] == [4, 3] and verdict["recommended_trial"] == 3
    assert "confirmed gain" in verdict["recommendation"]


# ---- one owner per study across data directories and hosts ---------------------------------


def _cli(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - argv list of our own CLI
        [sys.executable, "-m", "servetune", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def _running_study(url: str, name: str, proc: subprocess.Popen[Any]) -> tuple[StudyStore, int]:
    """Wait (≤ 120 s) until study ``name``, run by ``proc``, has a RUNNING trial; its store, id."""
    deadline = time.monotonic() + 120
    store = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            store = store or StudyStore(url)
            study = store.get_study(name)
            if any(t.state is TrialState.RUNNING for t in store.trials(study.id)):
                return store, study.id
        except ServetuneError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the study never got a running trial (exit status {proc.poll()})")


def test_resume_from_another_data_directory_waits_for_the_lease(
    tiny_model, tmp_path: Path, fresh_postgres_url: str
) -> None:
    """A study runs; `resume` from a second data directory (posing as another host) on the same
    PostgreSQL database (what hosts share) is refused while it runs, still refused right after
    the owner is SIGKILLed (its lease is live), and takes the study over and finishes it once
    the lease expired. The lease itself is tested on both backends in test_store.py."""
    url = fresh_postgres_url
    ttl_s = 6.0  # renewed every 2 s
    common = {"SERVETUNE_DB_URL": url, "SERVETUNE_LEASE_TTL_S": str(ttl_s)}
    owner_env = cli_env(tmp_path / "a") | common
    rival_env = cli_env(tmp_path / "b") | common | {"SERVETUNE_HOST_NAME": "other-host"}
    doc = small_spec(tiny_model, trials=4, name="shared")
    doc["workload"] = {**doc["workload"], "num_requests": 40}
    spec = write_spec(tmp_path / "spec.yaml", doc)
    proc = subprocess.Popen(  # noqa: S603 - argv list of our own CLI
        [sys.executable, "-m", "servetune", "run", str(spec)],
        env=owner_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        store, study_id = _running_study(url, "shared", proc)
        held = store.lease_holder(study_id)
        assert held is not None and held.pid == proc.pid and held.host == socket.gethostname()

        rival = _cli(rival_env, "resume", "shared")
        assert rival.returncode == 1, rival.stdout + rival.stderr
        for needle in ("being run by another process", f"pid {proc.pid}", held.host, "expires"):
            assert needle in rival.stderr, (needle, rival.stderr)
        shown = json.loads(_cli(rival_env, "show", "shared", "--json").stdout)
        assert shown["study"]["status"] == "running"
        assert shown["study"]["lease"]["pid"] == proc.pid
        assert shown["study"]["lease"]["host"] == held.host

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        lease = store.lease_holder(study_id)
        assert lease is not None and lease.is_live()
        still = _cli(rival_env, "resume", "shared")
        if lease.expires_at > datetime.now(UTC):  # else a slow machine reached the expiry
            assert still.returncode == 1 and "being run by another process" in still.stderr, (
                still.stdout + still.stderr
            )
        if still.returncode == 1:
            while (lease := store.lease_holder(study_id)) is not None and lease.is_live():
                time.sleep(0.2)
            shown = json.loads(_cli(rival_env, "show", "shared", "--json").stdout)
            assert shown["study"]["status"].startswith("interrupted")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    taken = _cli(rival_env, "resume", "shared") if still.returncode == 1 else still
    assert taken.returncode == 0, taken.stdout + taken.stderr
    assert "killed the engine" not in taken.stdout  # the owner's engine died with it
    trials = store.trials(study_id)
    store.close()
    assert not [t for t in trials if t.state is TrialState.RUNNING]
    measured = [t for t in trials if t.failure_kind is not FailureKind.INTERRUPTED]
    assert len(measured) == 4 and all(t.state is TrialState.COMPLETE for t in measured)
    assert len(trials) - len(measured) <= 1  # at most the one trial the kill interrupted
    shown = json.loads(_cli(rival_env, "show", "shared", "--json").stdout)
    assert shown["study"]["status"] == "finished"
    with StudyStore(url) as s:
        assert s.lease_holder(study_id) is None  # released on the clean end
    deadline = time.monotonic() + 10  # no engine of this test outlives it (others may run)
    while _engine_pids(tiny_model.gguf_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _engine_pids(tiny_model.gguf_path)


# ---- output and disk trouble ---------------------------------------------------------------


def test_a_closed_stdout_does_not_stop_the_study(tiny_model, tmp_path: Path) -> None:
    """`servetune run spec.yaml | head -1`: the reader goes away; the study runs to its end."""
    spec = write_spec(tmp_path / "spec.yaml", small_spec(tiny_model, trials=3, name="piped"))
    reader, writer = os.pipe()
    proc = subprocess.Popen(  # noqa: S603 - argv list of our own CLI
        [sys.executable, "-m", "servetune", "run", str(spec)],
        env=cli_env(tmp_path),
        stdout=writer,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        first = pipe.readline()  # `head -1`, then the pipe closes
    assert first.startswith(b"study piped"), first
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    shown = _show(tmp_path, "piped")
    assert shown["study"]["status"] == "finished"
    assert [t["state"] for t in shown["trials"]] == ["COMPLETE"] * 3
    assert (tmp_path / "data" / "reports" / "piped.html").is_file()
    log_text = (tmp_path / "data" / "logs" / "servetune.log").read_text(encoding="utf-8")
    assert "standard output was closed" in log_text
    assert "study piped: " in log_text  # it kept logging after the pipe closed


def test_a_full_data_directory_is_said_once_and_nothing_is_lost(tiny_model, tmp_path: Path) -> None:
    """The data directory (logs, reports) on a 2 MiB tmpfs that is full; the database elsewhere."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(  # noqa: S603 - fixed argv
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(data)],
        check=True,
    )
    try:
        with (data / "filler").open("wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        spec = write_spec(tmp_path / "spec.yaml", small_spec(tiny_model, trials=2, name="full"))
        out = servetune(tmp_path, "run", str(spec))
        assert out.returncode == 1, out.stdout + out.stderr
        assert "Traceback" not in out.stderr and "Logging error" not in out.stderr, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) <= 3, out.stderr  # not a traceback per log record
        assert any("disk is full" in line and str(data) in line for line in lines), out.stderr
        assert sum("cannot write the log" in line for line in lines) <= 1
        # every measurement was recorded (the database is on another disk)
        shown = _show(tmp_path, "full")
        assert [t["state"] for t in shown["trials"]] == ["COMPLETE", "COMPLETE"]
        assert shown["study"]["status"] == "finished"
        # with space again, the report can be written
        (data / "filler").unlink()
        report = servetune(tmp_path, "report", "full", "-o", str(tmp_path / "full.html"))
        assert report.returncode == 0, report.stderr
    finally:
        subprocess.run(["umount", str(data)], check=True)  # noqa: S603 - fixed argv


def test_a_frozen_owner_that_lost_its_lease_stops_without_writing(
    tiny_model, tmp_path: Path
) -> None:
    """The owner freezes (SIGSTOP) past its lease; another host takes the study over; the owner
    wakes up, finds out, and stops with a clear error: no interleaved trials, one verdict."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    common = {"SERVETUNE_DB_URL": url, "SERVETUNE_LEASE_TTL_S": "4"}
    owner_env = cli_env(tmp_path / "a") | common
    rival_env = cli_env(tmp_path / "b") | common | {"SERVETUNE_HOST_NAME": "other-host"}
    doc = small_spec(tiny_model, trials=4, name="frozen")
    doc["workload"] = {**doc["workload"], "num_requests": 40}
    spec = write_spec(tmp_path / "spec.yaml", doc)
    owner = subprocess.Popen(  # noqa: S603 - argv list of our own CLI
        [sys.executable, "-m", "servetune", "run", str(spec)],
        env=owner_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    rival = None
    store = None
    try:
        store, study_id = _running_study(url, "frozen", owner)
        os.kill(owner.pid, signal.SIGSTOP)
        while (lease := store.lease_holder(study_id)) is not None and lease.is_live():
            time.sleep(0.2)
        rival = subprocess.Popen(
            [sys.executable, "-m", "servetune", "resume", "frozen"],
            env=rival_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while (lease := store.lease_holder(study_id)) is None or lease.host != "other-host":
            assert time.monotonic() < deadline and rival.poll() is None, "no takeover"
            time.sleep(0.1)
        os.kill(owner.pid, signal.SIGCONT)
        _, owner_err = owner.communicate(timeout=60)
        assert owner.returncode == 1, owner_err
        assert "lost its lease" in owner_err and "other-host" in owner_err, owner_err
        assert "Traceback" not in owner_err, owner_err
        rival_out, rival_err = rival.communicate(timeout=240)
        assert rival.returncode == 0, rival_out + rival_err
    finally:
        for proc in (owner, rival):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(timeout=10)
    trials = store.trials(study_id)
    record = store.get_study(study_id)
    store.close()
    assert record.status == "finished" and record.lease is None
    assert not [t for t in trials if t.state is TrialState.RUNNING]
    measured = [
        t for t in trials if t.failure_kind not in (FailureKind.INTERRUPTED, FailureKind.CANCELLED)
    ]
    assert len(measured) == 4 and all(t.state is TrialState.COMPLETE for t in measured)
    assert len(trials) - len(measured) <= 1  # only the trial the owner was running
    assert [t.number for t in trials] == list(range(len(trials)))
