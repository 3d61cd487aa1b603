"""Contract tests of StudyStore, run alike on a SQLite file and on the real local PostgreSQL.

Each PostgreSQL test gets its own database ``servetune_test_<random>``, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import select, text

from servetune.core.metrics import RequestRecord, summarize
from servetune.core.slo import check_slos, request_bounds
from servetune.core.spec import StudySpec, parse_spec
from servetune.core.study import FailureKind, TrialResult, TrialRole, TrialState
from servetune.errors import SpecInvalid, StoreError, StudyBusy, StudyExists, StudyNotFound
from servetune.store.db import alembic_config, current_revision, head_revision, make_engine
from servetune.store.repo import LeaseOwner, StudyRecord, StudyStore, UnreadableStudy
from servetune.store.tables import StudyRow, TrialRow

pytestmark = pytest.mark.integration

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a fresh SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'nested' / 'dir' / 'servetune.db'}"
        return
    yield request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
def store(store_url: str) -> Iterator[StudyStore]:
    with StudyStore(store_url) as s:
        yield s


def make_spec(name: str | None = None) -> StudySpec:
    """A realistic llama.cpp study: two load levels, two SLOs, a constrained space."""
    return parse_spec(
        {
            "name": name,
            "engine": {
                "kind": "llamacpp",
                "model": "/models/qwen2.5-0.5b-instruct-q4_k_m.gguf",
                "flags": {"n-gpu-layers": 0},
            },
            "deployment": {"kind": "local", "startup_timeout_s": 60},
            "space": {
                "params": {
                    "parallel": {"kind": "int", "low": 1, "high": 8, "log": True},
                    "batch-size": {"kind": "choice", "values": [256, 512, 1024]},
                    "ubatch-size": {"kind": "choice", "values": [128, 256, 512]},
                    "cont-batching": {"kind": "bool"},
                    "cache-type-k": {"kind": "choice", "values": ["f16", "q8_0"]},
                },
                "constraints": ["ubatch-size <= batch-size"],
            },
            "strategy": {"kind": "tpe", "seed": 7},
            "budget": {"max_trials": 12, "confirm_repeats": 1},
            "workload": {
                "input_tokens": 128,
                "output_tokens": 32,
                "concurrency": [1, 4],
                "num_requests": 8,
            },
            "slos": [
                {"metric": "ttft_ms", "percentile": "p99", "max_ms": 800},
                {"metric": "tpot_ms", "percentile": "p50", "max_ms": 60, "levels": [4]},
            ],
            "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
        }
    )


def make_result(spec: StudySpec, slow: bool = False) -> TrialResult:
    """A full COMPLETE result built by the real core functions from hand-made request records."""
    metrics = []
    for level in spec.workload.levels():
        n = level.concurrency or 1
        step = 0.031 if slow else 0.0123
        records = [RequestRecord(sent_s=0.0, chunk_times_s=(0.05,), output_tokens=1, warmup=True)]
        for i in range(8):
            sent = 1.0 + i * 0.25
            first = sent + 0.08 + 0.011 * i * n
            records.append(
                RequestRecord(
                    sent_s=sent,
                    chunk_times_s=tuple(first + k * step for k in range(32)),
                    done_s=first + 31 * step + 0.001,
                    prompt_tokens=128,
                    output_tokens=32,
                    expected_prompt_tokens=128,
                )
            )
        records.append(RequestRecord(sent_s=3.5, error_kind="http_500", error="server error"))
        metrics.append(summarize(level, records, request_bounds(spec.slos), 2))
    report = check_slos(spec.slos, metrics, max_error_rate=0.2)
    started = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    return TrialResult(
        state=TrialState.COMPLETE,
        metrics=metrics,
        slo_report=report,
        feasible=report.feasible,
        objective_values=spec.objective.values(metrics),
        launch_argv=[
            "llama-server",
            "--model",
            "/models/m.gguf",
            "--parallel",
            "4",
            "--port",
            "41234",
        ],
        log_path="/tmp/servetune/logs/trial-1.log",
        started_at=started,
        finished_at=started + timedelta(seconds=42, microseconds=7),
        engine_start_s=3.25,
        benchmark_s=38.5,
        notes=["1 request failed: http_500"],
    )


PARAMS = {
    "parallel": 4,
    "batch-size": 512,
    "ubatch-size": 256,
    "cont-batching": True,
    "cache-type-k": "q8_0",
}


def test_create_get_list(store: StudyStore) -> None:
    spec = make_spec("qwen-cpu")
    source = {"engine": {"kind": "llamacpp", "model": "/models/m.gguf"}, "comment": "as written"}
    first = store.create_study("qwen-cpu", spec, source)
    second = store.create_study("qwen-cpu-2", make_spec(), {})

    assert first.name == "qwen-cpu" and first.status == "running"
    assert first.engine_kind == "llamacpp"
    assert first.spec == spec and first.spec_source == source
    assert first.created_at.tzinfo is not None and first.created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - first.created_at) < timedelta(minutes=1)
    assert first.finished_at is None and first.verdict is None

    assert store.get_study(first.id) == first
    assert store.get_study(str(first.id)) == first
    assert store.get_study("qwen-cpu") == first
    assert [s.name for s in store.list_studies()] == ["qwen-cpu-2", "qwen-cpu"]
    assert [s.name for s in store.list_studies(limit=1)] == ["qwen-cpu-2"]
    assert store.latest_study() == second


def test_empty_store_has_no_latest_study(store: StudyStore) -> None:
    assert store.latest_study() is None
    assert store.list_studies() == []


def test_name_clash_suggests_resume(store: StudyStore) -> None:
    store.create_study("nightly", make_spec(), {})
    with pytest.raises(StudyExists, match=r"servetune resume nightly"):
        store.create_study("nightly", make_spec(), {})
    assert len(store.list_studies()) == 1


def test_all_digit_name_is_rejected(store: StudyStore) -> None:
    with pytest.raises(SpecInvalid, match="digits only"):
        store.create_study("2025", make_spec(), {})


def test_unknown_study_names_the_ref(store: StudyStore) -> None:
    with pytest.raises(StudyNotFound, match="no studies yet"):
        store.get_study("nope")
    store.create_study("alpha", make_spec(), {})
    with pytest.raises(StudyNotFound, match=r"'nope'.*recent studies: alpha"):
        store.get_study("nope")
    with pytest.raises(StudyNotFound, match="999"):
        store.get_study(999)
    with pytest.raises(StudyNotFound, match="999"):
        store.trials(999)


def test_trial_round_trip(store: StudyStore) -> None:
    spec = make_spec()
    study = store.create_study("round-trip", spec, {})
    assert store.next_trial_number(study.id) == 0
    base = store.add_trial(study.id, 0, TrialRole.BASELINE, {})
    trial = store.add_trial(study.id, 1, TrialRole.SEARCH, PARAMS)
    confirm = store.add_trial(study.id, 2, TrialRole.CONFIRM, PARAMS, repeat_of=1)
    assert store.next_trial_number(study.id) == 3
    assert trial.state is TrialState.RUNNING and trial.result is None and trial.number == 1
    assert trial.created_at is not None and trial.created_at.tzinfo is not None
    assert confirm.repeat_of == 1 and confirm.role is TrialRole.CONFIRM

    result = make_result(spec)
    assert result.metrics[0].ttft_ms is not None and result.slo_report is not None
    assert result.objective_values is not None
    assert trial.id is not None
    saved = store.finish_trial(trial.id, result)

    assert saved.result == result
    assert saved.state is TrialState.COMPLETE and saved.params == PARAMS
    loaded = {t.number: t for t in store.trials(study.id)}
    assert list(loaded) == [0, 1, 2]
    assert loaded[1] == saved
    assert loaded[1].result == result
    assert isinstance(loaded[1].params["cont-batching"], bool)
    assert isinstance(loaded[1].params["batch-size"], int)
    assert loaded[0] == base and loaded[2] == confirm
    assert loaded[1].result is not None and loaded[1].result.finished_at == result.finished_at
    assert loaded[1].result.finished_at is not None
    assert loaded[1].result.finished_at.tzinfo is not None

    with store._sessions() as s:  # the scalar copies reports query on
        row = s.scalars(select(TrialRow).where(TrialRow.id == trial.id)).one()
    assert (row.state, row.failure_kind, row.feasible) == ("COMPLETE", None, result.feasible)
    assert row.objective_value == pytest.approx(result.objective_values[0])
    assert row.finished_at == result.finished_at


def test_failed_trial_and_infinite_values_round_trip(store: StudyStore) -> None:
    study = store.create_study("failures", make_spec(), {})
    t = store.add_trial(study.id, 0, TrialRole.BASELINE, {})
    assert t.id is not None
    failed = TrialResult(
        state=TrialState.FAIL,
        failure_kind=FailureKind.CUDA_OOM,
        failure_reason="CUDA error: out of memory\n\tat llama_kv_cache_init ‘kv’ ✓",
        launch_argv=["llama-server", "--parallel", "64"],
    )
    saved = store.finish_trial(t.id, failed)
    assert saved.failure_kind is FailureKind.CUDA_OOM and saved.result == failed
    assert saved.result is not None and saved.result.finished_at is None

    t2 = store.add_trial(study.id, 1, TrialRole.SEARCH, {"parallel": 2})
    assert t2.id is not None
    odd = TrialResult(state=TrialState.COMPLETE, objective_values=[math.inf, -math.inf])
    assert store.finish_trial(t2.id, odd).result == odd  # PostgreSQL's JSON has no Infinity token
    assert store.trials(study.id)[1].result == odd


def test_duplicate_trial_number_is_a_store_error(store: StudyStore) -> None:
    study = store.create_study("dup", make_spec(), {})
    store.add_trial(study.id, 0, TrialRole.BASELINE, {})
    with pytest.raises(StoreError, match="already has a trial 0") as info:
        store.add_trial(study.id, 0, TrialRole.SEARCH, {"parallel": 2})
    assert "INSERT" not in str(info.value)  # no SQL statement dumped at the user
    with pytest.raises(StudyNotFound):
        store.add_trial(study.id + 100, 0, TrialRole.SEARCH, {})


def test_finish_needs_a_finished_state_and_a_known_trial(store: StudyStore) -> None:
    study = store.create_study("states", make_spec(), {})
    t = store.add_trial(study.id, 0, TrialRole.BASELINE, {})
    assert t.id is not None
    with pytest.raises(ValueError, match="not RUNNING"):
        store.finish_trial(t.id, TrialResult(state=TrialState.RUNNING))
    with pytest.raises(StoreError, match="no trial with id"):
        store.finish_trial(t.id + 1000, TrialResult(state=TrialState.FAIL))


def test_interrupt_running_fails_only_running_trials(store: StudyStore) -> None:
    spec = make_spec()
    study = store.create_study("resume-me", spec, {})
    done = store.add_trial(study.id, 0, TrialRole.BASELINE, {})
    a = store.add_trial(study.id, 1, TrialRole.SEARCH, PARAMS)
    b = store.add_trial(study.id, 2, TrialRole.SEARCH, {"parallel": 2})
    assert done.id is not None and a.id is not None and b.id is not None
    result = make_result(spec)
    store.finish_trial(done.id, result)
    store.set_trial_process(done.id, 1111, 1111)  # a finished trial's process is not a survivor
    store.set_trial_process(a.id, 4242, 4240)
    assert store.trial_processes(study.id) == [(1, 4242, 4240)]

    reason = "the study process stopped while this trial was running"
    interrupted = store.interrupt_running(study.id, reason)

    assert [t.number for t in interrupted] == [1, 2]
    for t in interrupted:
        assert t.state is TrialState.FAIL and t.result is not None
        assert t.failure_kind is FailureKind.INTERRUPTED and t.result.failure_reason == reason
        assert t.result.finished_at is not None and t.result.finished_at.tzinfo is not None
    trials = store.trials(study.id)
    assert trials[0].state is TrialState.COMPLETE and trials[0].result == result
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert trials[1:] == interrupted
    assert store.trial_processes(study.id) == []
    assert store.interrupt_running(study.id, reason) == []
    assert store.next_trial_number(study.id) == 3


def test_study_status_and_verdict(store: StudyStore) -> None:
    study = store.create_study("verdict", make_spec(), {})
    verdict = {"best_trial": 3, "pareto_front": [], "summary": "trial 3: +18.2% output tokens/s"}
    store.set_study_status(study.id, "finished", verdict)
    got = store.get_study(study.id)
    assert got.status == "finished" and got.verdict == verdict
    assert got.finished_at is not None and got.finished_at >= got.created_at

    store.set_study_status(study.id, "running")  # resumed: verdict kept, no longer finished
    got = store.get_study("verdict")
    assert got.status == "running" and got.finished_at is None and got.verdict == verdict
    with pytest.raises(ValueError, match="unknown study status"):
        store.set_study_status(study.id, "done")  # type: ignore[arg-type]
    with pytest.raises(StudyNotFound):
        store.set_study_status(study.id + 100, "failed")


def test_calls_from_threads_of_an_event_loop(store: StudyStore) -> None:
    study = store.create_study("threads", make_spec(), {})

    async def main() -> None:
        await asyncio.gather(
            *(
                asyncio.to_thread(
                    store.add_trial, study.id, n, TrialRole.SEARCH, {"parallel": n + 1}
                )
                for n in range(6)
            )
        )

    asyncio.run(main())
    assert [t.params["parallel"] for t in store.trials(study.id)] == [1, 2, 3, 4, 5, 6]


_WRITER = textwrap.dedent("""
    import sys, time
    from servetune.core.study import TrialResult, TrialState, FailureKind, TrialRole
    from servetune.store.repo import StudyStore
    store = StudyStore(sys.argv[1])
    study = store.get_study("durable")
    t = store.add_trial(study.id, 0, TrialRole.BASELINE, {})
    failed = TrialResult(state=TrialState.FAIL, failure_kind=FailureKind.PORT_IN_USE,
                         failure_reason="bind: address in use")
    store.finish_trial(t.id, failed)
    t = store.add_trial(study.id, 1, TrialRole.SEARCH, {"parallel": 2})
    print("saved", flush=True)
    time.sleep(60)
""")


def test_results_survive_a_killed_process(store_url: str) -> None:
    with StudyStore(store_url) as s:
        s.create_study("durable", make_spec(), {"k": "v"})
    env = {**os.environ, "PYTHONPATH": SRC}
    argv = [sys.executable, "-c", _WRITER, store_url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)  # noqa: S603 - fixed argv
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"saved\n"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    with StudyStore(store_url) as fresh:
        study = fresh.get_study("durable")
        assert study.spec_source == {"k": "v"}
        trials = fresh.trials(study.id)
        states = [(t.number, t.state) for t in trials]
        assert states == [(0, TrialState.FAIL), (1, TrialState.RUNNING)]
        assert trials[0].failure_kind is FailureKind.PORT_IN_USE


def test_processes_opening_a_new_database_at_once(store_url: str) -> None:
    """Three processes open (and so migrate) the same empty database within a millisecond or so."""
    env = {**os.environ, "PYTHONPATH": SRC}
    script = textwrap.dedent("""
        import sys
        from servetune.core.spec import StudySpec
        from servetune.store.repo import StudyStore
        print("ready", flush=True)
        spec = StudySpec.model_validate_json(sys.stdin.readline())  # the start signal
        with StudyStore(sys.argv[1]) as store:
            store.create_study(sys.argv[2], spec, {})
    """)
    procs = [
        subprocess.Popen(  # noqa: S603 - fixed argv
            [sys.executable, "-c", script, store_url, f"s{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for i in range(3)
    ]
    try:
        for p in procs:  # every process has imported everything; now release them together
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        spec_line = make_spec().model_dump_json().encode() + b"\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(spec_line)
        for p in procs:
            assert p.stdin is not None
            p.stdin.flush()
        errors = [p.communicate(timeout=60)[1].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    with StudyStore(store_url) as s:
        assert sorted(x.name for x in s.list_studies()) == ["s0", "s1", "s2"]


def test_migrations_are_idempotent(store_url: str) -> None:
    with StudyStore(store_url) as first:
        first.create_study("kept", make_spec(), {})
    with StudyStore(store_url) as second, StudyStore(store_url) as third:
        assert [s.name for s in second.list_studies()] == ["kept"]
        assert third.get_study("kept").name == "kept"
    engine = make_engine(store_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_head_revision_is_the_newest_shipped_migration() -> None:
    """``HEAD_REVISION`` (known without importing Alembic) must follow every new migration."""
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == head_revision()


def test_reading_commands_do_not_import_alembic_on_an_up_to_date_database(tmp_path: Path) -> None:
    """Alembic costs ~0.3 s per process; only a migration needs it."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    StudyStore(url).close()
    code = (
        "import sys; from servetune.store.repo import StudyStore; "
        f"StudyStore({url!r}).close(); print('alembic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)  # noqa: S603
    assert out.stdout.strip() == "False", out.stderr


def test_schema_from_a_newer_servetune_is_refused(store_url: str) -> None:
    StudyStore(store_url).close()
    engine = make_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    with pytest.raises(StoreError, match=r"unknown to this servetune.*upgrade servetune"):
        StudyStore(store_url)


def test_migration_matches_the_tables(store_url: str) -> None:
    """``alembic check``: autogenerate finds no difference between tables.py and the migration."""
    StudyStore(store_url).close()
    command.check(alembic_config(url=store_url))  # raises AutogenerateDiffsDetected on any diff


def test_sqlite_pragmas(tmp_path: Path) -> None:
    with StudyStore(f"sqlite:///{tmp_path / 'db.sqlite'}") as s, s._engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000


def test_bad_urls_are_store_errors() -> None:
    with pytest.raises(StoreError, match="not supported"):
        StudyStore("mysql://root@127.0.0.1/servetune")
    with pytest.raises(StoreError, match="cannot parse"):
        StudyStore("not a url")
    with pytest.raises(StoreError, match="opening the database") as info:
        StudyStore("postgresql://servetune:hunter2@127.0.0.1:1/servetune")
    assert "hunter2" not in str(info.value)


# ---- the study lease: one owner per study, on every host sharing the database --------------


def owner(n: int, host: str = "gpu-1") -> LeaseOwner:
    return LeaseOwner(owner_id=f"run-{n}", host=host, pid=1000 + n)


def test_a_live_lease_refuses_others_naming_its_holder(store: StudyStore) -> None:
    study = store.create_study("leased", make_spec(), {})
    assert store.lease_holder(study.id) is None
    lease = store.acquire_lease(study.id, owner(1), ttl_s=60)
    assert (lease.owner_id, lease.host, lease.pid) == ("run-1", "gpu-1", 1001)
    assert lease.acquired_at.tzinfo is not None and lease.is_live()
    assert timedelta(seconds=59) < lease.expires_at - lease.acquired_at <= timedelta(seconds=60)
    with pytest.raises(StudyBusy) as busy:
        store.acquire_lease(study.id, owner(2, host="gpu-2"), ttl_s=60)
    message = str(busy.value)
    assert "being run by another process" in message
    assert "pid 1001 on host gpu-1" in message
    assert lease.acquired_at.isoformat(timespec="seconds") in message
    assert lease.expires_at.isoformat(timespec="seconds") in message
    # the holder may take it again (idempotent) and renew it; the other may not renew it
    assert store.acquire_lease(study.id, owner(1), ttl_s=60).owner_id == "run-1"
    renewed = store.renew_lease(study.id, "run-1", ttl_s=120)
    assert renewed.expires_at > lease.expires_at and renewed.renewed_at >= lease.renewed_at
    with pytest.raises(StudyBusy, match="lost its lease"):
        store.renew_lease(study.id, "run-2", ttl_s=60)
    assert store.get_study(study.id).lease == store.lease_holder(study.id)


def test_a_released_or_expired_lease_can_be_taken(store: StudyStore) -> None:
    study = store.create_study("handover", make_spec(), {})
    store.acquire_lease(study.id, owner(1), ttl_s=60)
    assert store.release_lease(study.id, "run-2") is False  # not the holder: nothing happens
    assert store.lease_holder(study.id) is not None
    assert store.release_lease(study.id, "run-1") is True
    assert store.lease_holder(study.id) is None
    assert store.release_lease(study.id, "run-1") is False

    store.acquire_lease(study.id, owner(2), ttl_s=0.3)
    with pytest.raises(StudyBusy):
        store.acquire_lease(study.id, owner(3), ttl_s=60)
    time.sleep(0.5)
    lapsed = store.lease_holder(study.id)
    assert lapsed is not None and not lapsed.is_live()
    taken = store.acquire_lease(study.id, owner(3, host="gpu-3"), ttl_s=60)
    assert (taken.owner_id, taken.host) == ("run-3", "gpu-3")
    # the run that lost it finds out when it renews
    with pytest.raises(StudyBusy, match="pid 1003 on host gpu-3"):
        store.renew_lease(study.id, "run-2", ttl_s=60)
    # a holder the caller proved dead can be taken over before expiry, by its owner id only
    with pytest.raises(StudyBusy):
        store.acquire_lease(study.id, owner(4), ttl_s=60, take_over="run-2")
    assert store.acquire_lease(study.id, owner(4), ttl_s=60, take_over="run-3").pid == 1004
    with pytest.raises(StudyNotFound):
        store.acquire_lease(study.id + 100, owner(1), ttl_s=60)


_RACER = textwrap.dedent("""
    import sys
    from servetune.errors import StudyBusy
    from servetune.store.repo import LeaseOwner, StudyStore
    store = StudyStore(sys.argv[1])
    study = store.get_study("raced")
    me = LeaseOwner(owner_id=sys.argv[2], host="h", pid=1)
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        store.acquire_lease(study.id, me, ttl_s=60)
        print("won", flush=True)
    except StudyBusy:
        print("busy", flush=True)
""")


def test_processes_racing_for_a_lease_get_exactly_one_owner(store_url: str) -> None:
    with StudyStore(store_url) as s:
        s.create_study("raced", make_spec(), {})
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [
        subprocess.Popen(  # noqa: S603 - fixed argv
            [sys.executable, "-c", _RACER, store_url, f"racer-{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for i in range(4)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
    said = [out.decode().strip() for out, _ in results]
    assert sorted(said) == ["busy", "busy", "busy", "won"], [err.decode() for _, err in results]
    with StudyStore(store_url) as s:
        holder = s.lease_holder(s.get_study("raced").id)
        assert holder is not None and holder.owner_id == f"racer-{said.index('won')}"


# ---- rows this version cannot read ---------------------------------------------------------


def test_an_unreadable_study_is_listed_with_its_reason_and_others_still_are(
    store: StudyStore,
) -> None:
    store.create_study("old-one", make_spec(), {})
    future = store.create_study("from-the-future", make_spec(), {})
    store.create_study("new-one", make_spec(), {})
    with store._engine.begin() as conn:  # as a newer servetune would write it
        spec = future.spec.model_dump(mode="json")
        spec["engine"]["kind"] = "vllm-next"
        spec["speculative"] = {"draft": "tiny"}
        conn.execute(StudyRow.__table__.update().where(StudyRow.id == future.id).values(spec=spec))
    listed = store.list_studies()
    assert [s.name for s in listed] == ["new-one", "from-the-future", "old-one"]
    bad = listed[1]
    assert isinstance(bad, UnreadableStudy)
    assert "written by another servetune version" in bad.reason and "engine" in bad.reason
    assert isinstance(listed[0], StudyRecord) and isinstance(listed[2], StudyRecord)
    assert store.latest_study() is not None and store.latest_study().name == "new-one"  # type: ignore[union-attr]
    with pytest.raises(StoreError, match=r"from-the-future \(id \d+\).*cannot be read"):
        store.get_study("from-the-future")


# ---- read-only databases (an archived data directory) --------------------------------------


@pytest.fixture
def read_only_view(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(writable folder, the same folder bind-mounted read-only): even root cannot write there."""
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(rw), str(ro)], check=True)  # noqa: S603 - fixed argv
    try:
        yield rw, ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)  # noqa: S603 - fixed argv


def test_a_read_only_sqlite_file_is_read_without_writing(read_only_view: tuple[Path, Path]) -> None:
    rw, ro = read_only_view
    with StudyStore(f"sqlite:///{rw / 'servetune.db'}") as s:
        study = s.create_study("archived", make_spec(), {})
        s.add_trial(study.id, 0, TrialRole.BASELINE, {})
    before = sorted(p.name for p in rw.iterdir())
    url = f"sqlite:///{ro / 'servetune.db'}"
    with pytest.raises(StoreError, match="unable to open database file"):
        StudyStore(url)  # a writer cannot open it
    with StudyStore(url, read_only=True) as s:
        assert s.read_only
        assert [x.name for x in s.list_studies()] == ["archived"]
        assert [t.number for t in s.trials(s.get_study("archived").id)] == [0]
        with pytest.raises(StoreError, match="readonly"):
            s.create_study("new", make_spec(), {})
    assert sorted(p.name for p in rw.iterdir()) == before


def test_a_read_only_database_on_an_old_schema_says_it_cannot_be_upgraded(
    read_only_view: tuple[Path, Path],
) -> None:
    rw, ro = read_only_view
    StudyStore(f"sqlite:///{rw / 'servetune.db'}").close()
    engine = make_engine(f"sqlite:///{rw / 'servetune.db'}")
    try:
        command.downgrade(alembic_config(url=f"sqlite:///{rw / 'servetune.db'}"), "0001")
    finally:
        engine.dispose()
    with pytest.raises(StoreError) as caught:
        StudyStore(f"sqlite:///{ro / 'servetune.db'}", read_only=True)
    message = str(caught.value)
    assert "read-only" in message and "revision 0001" in message
    assert f"needs {head_revision()}" in message and "write access" in message
    # with write access, the same file is upgraded as before
    with StudyStore(f"sqlite:///{rw / 'servetune.db'}", read_only=True) as s:
        assert not s.read_only
    engine = make_engine(f"sqlite:///{rw / 'servetune.db'}")
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_a_run_that_lost_its_lease_writes_nothing_more(store_url: str) -> None:
    with StudyStore(store_url) as first, StudyStore(store_url) as second:
        study = first.create_study("fenced", make_spec(), {})
        first.acquire_lease(study.id, owner(1), ttl_s=0.3)
        first.fence(study.id, "run-1")
        trial = first.add_trial(study.id, 0, TrialRole.BASELINE, {})
        assert trial.id is not None
        time.sleep(0.5)  # run-1 froze past its lease; run-2 takes the study over
        second.acquire_lease(study.id, owner(2, host="gpu-2"), ttl_s=60)
        second.fence(study.id, "run-2")
        done = TrialResult(state=TrialState.FAIL, failure_kind=FailureKind.CANCELLED)
        for write in (
            lambda: first.add_trial(study.id, 1, TrialRole.SEARCH, {}),
            lambda: first.finish_trial(trial.id, done),  # type: ignore[arg-type]
            lambda: first.set_trial_process(trial.id, 1, 1),  # type: ignore[arg-type]
            lambda: first.set_study_status(study.id, "cancelled", {"summary": "second verdict"}),
            lambda: first.interrupt_running(study.id, "x"),
        ):
            with pytest.raises(StudyBusy, match=r"lost its lease.*pid 1002 on host gpu-2"):
                write()
        assert [t.state for t in second.trials(study.id)] == [TrialState.RUNNING]
        assert second.get_study(study.id).status == "running"
        assert second.get_study(study.id).verdict is None
        # the new owner writes as usual
        second.interrupt_running(study.id, "taken over")
        second.set_study_status(study.id, "finished", {"summary": "one verdict"})
        first.fence(study.id, None)  # a store without a fence is not checked
        assert first.get_study(study.id).verdict == {"summary": "one verdict"}
