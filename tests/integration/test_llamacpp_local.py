"""The real llama.cpp server (xllamacpp) on the tiny model through LocalDeployment and wait_ready:
serving, start-up failures and their kinds, stopping whole process groups, dying with the parent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from servetune.bench.builtin import BuiltinClient
from servetune.core.spec import StudySpec, Workload
from servetune.core.study import FailureKind, Params, TrialState
from servetune.deploy.base import RunningEngine
from servetune.deploy.local import (
    LocalDeployment,
    LocalRunningEngine,
    group_alive,
    group_members,
    kill_process_group,
)
from servetune.engines.base import LaunchCommand
from servetune.engines.llamacpp import LlamaCppEngine
from servetune.engines.readiness import wait_ready
from servetune.errors import EngineStartFailed
from servetune.modelgen import ModelFiles
from servetune.runner import RETRYABLE, TrialContext, run_trial
from tests.integration.llamacpp_helpers import (
    running_engine,
    server_process,
    stream_completion,
    tiny_engine,
)
from tests.integration.study_helpers import small_spec

pytestmark = pytest.mark.integration


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def llama_server_wrapper(tmp_path: Path) -> Path:
    """An executable named llama-server that runs the wheel's stand-in (the binary launch path)."""
    exe = tmp_path / "bin" / "llama-server"
    exe.parent.mkdir()
    exe.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "from servetune.engines.xllamacpp_server import main\n"
        "sys.exit(main())\n"
    )
    exe.chmod(0o755)
    return exe


@pytest.mark.parametrize("path", ["xllamacpp", "llama-server binary"])
def test_engine_serves_a_streamed_completion_and_stops_with_its_whole_group(
    tiny_model: ModelFiles, tmp_path: Path, path: str
) -> None:
    binary = "xllamacpp" if path == "xllamacpp" else str(llama_server_wrapper(tmp_path))
    engine = tiny_engine(tiny_model.gguf_path, binary=binary, served_model_name="tiny")

    async def scenario() -> tuple[int, int | None, int]:
        async with running_engine(
            engine, {"parallel": 2, "ctx-size": 1024}, tmp_path / "engine.log"
        ) as started:
            assert started.ready_s < 30
            assert started.endpoint.model == "tiny"
            async with httpx.AsyncClient(base_url=started.endpoint.base_url, timeout=30) as client:
                chunks, usage = await stream_completion(client, "tiny", "The server says", 8)
            assert chunks >= 1
            assert usage["completion_tokens"] == 8
            pgid = started.running.pgid
            assert group_alive(pgid)
        return pgid, await started.running.stop(), chunks

    pgid, rc, _ = asyncio.run(scenario())
    assert rc == 0  # clean exit on SIGTERM, for both launch paths
    assert group_members(pgid) == []
    log = (tmp_path / "engine.log").read_text()
    assert "n_slots = 2" in log and "received SIGTERM" in log


@pytest.mark.parametrize(
    ("params", "kind"),
    [
        ({"cache-type-v": "q8_0", "flash-attn": "off"}, FailureKind.INVALID_ARGS),
        ({"cache-type-k": "q9"}, FailureKind.INVALID_ARGS),
        # 30 M tokens × 8 KiB of f32 K+V: a 234 GiB KV cache no test machine can allocate
        ({"ctx-size": 30_000_000, "parallel": 1, "cache-type-k": "f32", "cache-type-v": "f32"},
         FailureKind.KV_CACHE_TOO_SMALL),
    ],
)  # fmt: skip
def test_a_failing_candidate_raises_engine_start_failed_with_its_kind(
    tiny_model: ModelFiles, tmp_path: Path, params: Params, kind: FailureKind
) -> None:
    engine = tiny_engine(tiny_model.gguf_path)

    async def scenario() -> None:
        async with running_engine(engine, params, tmp_path / "engine.log", timeout_s=60):
            pytest.fail("the engine should not have become ready")

    with pytest.raises(EngineStartFailed) as exc:
        asyncio.run(scenario())
    assert exc.value.kind is kind, exc.value.reason
    if kind is FailureKind.KV_CACHE_TOO_SMALL:  # what to do, with the log line as evidence
        reason = exc.value.reason
        # parallel is 1 already: the advice never says "lower parallel"
        assert reason.endswith(
            ": lower ctx-size, or use a quantized cache-type-k/cache-type-v (e.g. q8_0)"
        ), reason
        assert "failed to allocate buffer for kv cache" in reason, reason


def test_a_missing_model_fails_as_model_load_failed(tmp_path: Path) -> None:
    engine = tiny_engine(tmp_path / "absent.gguf")

    async def scenario() -> None:
        async with running_engine(engine, {}, tmp_path / "engine.log"):
            pytest.fail("the engine should not have become ready")

    with pytest.raises(EngineStartFailed) as exc:
        asyncio.run(scenario())
    assert exc.value.kind is FailureKind.MODEL_LOAD_FAILED
    assert "absent.gguf" in exc.value.reason


def test_a_busy_port_fails_as_port_in_use(tiny_model: ModelFiles, tmp_path: Path) -> None:
    engine = tiny_engine(tiny_model.gguf_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        async def scenario() -> None:
            async with running_engine(engine, {}, tmp_path / "engine.log", port=port):
                pytest.fail("the engine should not have become ready")

        with pytest.raises(EngineStartFailed) as exc:
            asyncio.run(scenario())
    assert exc.value.kind is FailureKind.PORT_IN_USE
    assert str(port) in exc.value.reason


def test_an_engine_not_ready_in_time_fails_as_startup_timeout(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    engine = tiny_engine(tiny_model.gguf_path)
    deployment = LocalDeployment(stop_timeout_s=5)

    async def scenario() -> tuple[EngineStartFailed, int]:
        host, port = deployment.reserve_port()
        running = await deployment.start(
            engine.launch_command({}, host=host, port=port), tmp_path / "engine.log"
        )
        try:
            with pytest.raises(EngineStartFailed) as exc:
                # the interpreter alone takes longer than this to start
                await wait_ready(engine.endpoint(host, port), running, engine, timeout_s=0.05)
            return exc.value, running.pgid
        finally:
            await running.stop()

    error, pgid = asyncio.run(scenario())
    assert error.kind is FailureKind.STARTUP_TIMEOUT
    assert "0.05 s" in error.reason
    assert group_members(pgid) == []


STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print("child", child.pid, flush=True)
time.sleep(60)
"""


def test_stop_kills_a_group_that_ignores_sigterm_grandchildren_included(tmp_path: Path) -> None:
    deployment = LocalDeployment(stop_timeout_s=0.5)
    log = tmp_path / "stubborn.log"

    async def scenario() -> tuple[int, int | None, int | None, int]:
        running = await deployment.start(
            LaunchCommand(argv=[sys.executable, "-c", STUBBORN], env={"MARK": "1"}), log
        )
        try:
            assert await asyncio.to_thread(wait_until, lambda: "child" in log.read_text(), 10)
            child = int(log.read_text().split()[1])
            assert child in group_members(running.pgid)
        finally:
            rc = await running.stop()
        return running.pgid, rc, await running.stop(), child

    pgid, rc, rc_again, child = asyncio.run(scenario())
    assert rc == -signal.SIGKILL
    assert rc_again == rc  # idempotent
    assert group_members(pgid) == []
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()


PARENT = """
import asyncio, sys, time
from pathlib import Path
from servetune.deploy.local import LocalDeployment
from tests.integration.llamacpp_helpers import tiny_engine

async def main():
    engine = tiny_engine(sys.argv[1])
    deployment = LocalDeployment()
    host, port = deployment.reserve_port()
    running = await deployment.start(engine.launch_command({}, host=host, port=port),
                                     Path(sys.argv[2]))
    print(running.pgid, flush=True)

asyncio.run(main())
time.sleep(120)
"""


def test_the_engine_dies_when_the_process_that_started_it_is_sigkilled(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed study leaves no engine behind."""
    repo = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", PARENT, str(tiny_model.gguf_path), str(tmp_path / "engine.log")],
        stdout=subprocess.PIPE, text=True, cwd=repo, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    engine_pgid = None
    try:
        assert parent.stdout is not None
        engine_pgid = int(parent.stdout.readline())
        assert engine_pgid != parent.pid
        assert wait_until(lambda: "listening on" in (tmp_path / "engine.log").read_text(), 30)
        assert group_alive(engine_pgid)
        parent.kill()
        parent.wait(10)
        assert wait_until(lambda: not group_alive(engine_pgid), 10), "engine outlived its parent"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait(10)
        if engine_pgid is not None and group_alive(engine_pgid):
            kill_process_group(engine_pgid, must_contain=str(tiny_model.gguf_path), timeout_s=2)


def test_kill_process_group_stops_a_recorded_engine_and_leaves_strangers_alone(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    engine = tiny_engine(tiny_model.gguf_path)
    deployment = LocalDeployment()

    async def start() -> LocalRunningEngine:
        host, port = deployment.reserve_port()
        return await deployment.start(
            engine.launch_command({}, host=host, port=port), tmp_path / "engine.log"
        )

    running = asyncio.run(start())
    try:
        assert wait_until(lambda: "listening on" in running.log_text(), 30)
        assert not kill_process_group(running.pgid, must_contain="some-other-model.gguf")
        assert group_alive(running.pgid)
        assert kill_process_group(running.pgid, must_contain=str(tiny_model.gguf_path))
        assert not group_alive(running.pgid)
        assert not kill_process_group(running.pgid)  # already gone: no error
        with pytest.raises(ValueError):
            kill_process_group(os.getpgrp())
    finally:
        assert asyncio.run(running.stop()) == 0  # reaped; it had exited on SIGTERM


# ---- llama.cpp's slot and context rules, against the real server ------------------------------

_INITIALIZING = re.compile(
    r"n_slots = (\d+), n_ctx_slot = (\d+), kv_unified = '(true|false)'"
)  # tools/server/server-context.cpp load_model's "initializing, n_slots = …" line


def _wait_logged(log_path: Path, timeout_s: float = 60.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _INITIALIZING.search(log_path.read_text(errors="replace"))
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"no n_ctx_slot line in {log_path}: {log_path.read_text()[-2000:]}")


@pytest.mark.parametrize(
    "params",
    [
        {},  # the defaults: auto = 4 slots over one unified buffer of the model's 4096
        {"parallel": -1, "kv-unified": False},
        {"parallel": 3},  # ctx-size 0, fit off (tiny_engine's), not unified: split in 3
        {"parallel": 3, "fit": "on"},  # ctx-size 0 with fit on: the model's length per slot
        {"parallel": 3, "ctx-size": 1000},
        {"parallel": 1, "ctx-size": 100},
        {"parallel": 2, "ctx-size": 1000, "kv-unified": True},
        {"parallel": 1, "ctx-size": 8192},  # capped at n_ctx_train
        {"parallel": 64, "ctx-size": 2048},  # 32 per slot rounds up to 256
    ],
)
def test_slot_layout_matches_what_the_server_logs(
    tiny_model: ModelFiles, tmp_path: Path, params: Params
) -> None:
    engine = tiny_engine(tiny_model.gguf_path)
    expected = engine.slot_layout(params)
    assert expected is not None
    log_path = tmp_path / "engine.log"
    with server_process(tiny_model.gguf_path, log_path, params):
        slots, n_ctx_slot, unified = _wait_logged(log_path).groups()
    assert (int(slots), int(n_ctx_slot), unified == "true") == (
        expected.slots,
        expected.n_ctx_slot,
        expected.kv_unified,
    ), log_path.read_text()[-3000:]


async def _completions(url: str, n_in: int, n_out: int, concurrency: int) -> list[int | str]:
    """Output tokens of each of ``concurrency`` simultaneous greedy requests of exactly ``n_in``
    prompt tokens (token ids) and ``max_tokens`` ``n_out``; an error's status and text instead."""

    async def one(client: httpx.AsyncClient) -> int | str:
        body = {
            "model": "tiny", "prompt": [100] * n_in, "max_tokens": n_out, "temperature": 0,
            "ignore_eos": True,
        }  # fmt: skip
        r = await client.post(f"{url}/v1/completions", json=body, timeout=120)
        if r.status_code != 200:
            return f"{r.status_code}: {r.text[:200]}"
        return int(r.json()["usage"]["completion_tokens"])

    async with httpx.AsyncClient() as client:
        return list(await asyncio.gather(*(one(client) for _ in range(concurrency))))


def _workload(n_in: int, n_out: int, concurrency: int) -> Workload:
    return Workload(
        input_tokens=n_in, output_tokens=n_out, concurrency=[concurrency], num_requests=4
    )


@pytest.mark.parametrize(
    ("params", "cases"),
    [
        # the baseline of issue 5 item 5: 1000 + 100 at concurrency 1-3 runs; 4 × 2600 tokens do
        # not fit its 4096. Cases keep a margin from the bound: how many requests really overlap
        # is timing (requests that finish free their cells), pre-flight assumes every slot busy.
        ({}, [(1000, 100, 1), (1000, 100, 3), (2500, 100, 4)]),
        # a unified buffer of 1024: 2 × 450 fits, 3 × 700 does not (tokens in flight)
        ({"ctx-size": 1024}, [(350, 100, 2), (600, 100, 3), (900, 100, 1), (1000, 100, 1)]),
        # two slots of 256 each: 200 + 40 fits at any concurrency, 250 + 40 does not fit one slot
        ({"parallel": 2, "ctx-size": 512}, [(200, 40, 4), (250, 40, 1), (300, 10, 1)]),
    ],
)
def test_what_preflight_accepts_runs_and_what_it_rejects_fails(
    tiny_model: ModelFiles,
    tmp_path: Path,
    params: Params,
    cases: list[tuple[int, int, int]],
) -> None:
    engine = tiny_engine(tiny_model.gguf_path)
    with server_process(tiny_model.gguf_path, tmp_path / "engine.log", params) as url:
        for n_in, n_out, concurrency in cases:
            accepted = engine.preflight(params, _workload(n_in, n_out, concurrency)) == []
            got = asyncio.run(_completions(url, n_in, n_out, concurrency))
            served = all(g == n_out for g in got)
            assert served == accepted, (params, n_in, n_out, concurrency, got)


# ---- failure evidence: signals, the kernel's OOM record, warnings ------------------------------


def _start_and_fail(
    engine: LlamaCppEngine, command: LaunchCommand, log_path: Path
) -> EngineStartFailed:
    async def scenario() -> EngineStartFailed:
        running = await LocalDeployment(stop_timeout_s=5.0).start(command, log_path)
        try:
            await wait_ready(engine.endpoint(command.host, command.port), running, engine, 90)
        except EngineStartFailed as e:
            return e
        finally:
            await running.stop()
        pytest.fail("the engine should not have become ready")

    return asyncio.run(scenario())


def test_a_bare_sigkill_of_a_real_engine_is_a_crash_not_host_oom(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    """Issue 6 item 3: SIGKILL alone is no evidence of OOM; engine_crashed is retried once."""
    engine = tiny_engine(tiny_model.gguf_path)

    async def scenario() -> tuple[int | None, str]:
        async with running_engine(engine, {}, tmp_path / "engine.log") as started:
            os.killpg(started.running.pgid, signal.SIGKILL)
            assert wait_until(lambda: started.running.returncode() is not None, 10)
            return started.running.returncode(), started.running.log_text()

    rc, log = asyncio.run(scenario())
    assert rc == -signal.SIGKILL
    kind, reason = engine.classify_failure(log, rc)
    assert kind is FailureKind.ENGINE_CRASHED, reason
    assert "killed by SIGKILL" in reason and "no evidence of running out of memory" in reason
    assert kind in RETRYABLE


def _memory_cgroup(tmp_name: str, limit_bytes: int) -> Path | None:
    """A new memory cgroup under this process's own (v1 or v2) limited to ``limit_bytes``; None
    where this process may not create one."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, limit_file = (
                Path("/sys/fs/cgroup/memory") / path.lstrip("/"),
                "memory.limit_in_bytes",
            )
        elif hierarchy == "0" and Path("/sys/fs/cgroup/cgroup.controllers").is_file():
            base, limit_file = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
        else:
            continue
        group = base / tmp_name
        try:
            group.mkdir(exist_ok=True)
            (group / limit_file).write_text(str(limit_bytes))
        except OSError:
            return None
        return group
    return None


def test_a_real_kernel_oom_kill_is_host_oom_with_the_kernels_record(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    """The engine runs in a memory cgroup of 300 MiB and asks for a ~3 GiB f32 KV cache, which
    llama.cpp clears (touches) at start: the kernel's OOM killer SIGKILLs it."""
    group = _memory_cgroup(f"servetune-test-{os.getpid()}", 300 * 1024 * 1024)
    if group is None:
        pytest.skip("this process may not create a memory cgroup (needs root and cgroupfs)")
    engine = tiny_engine(tiny_model.gguf_path)
    host, port = LocalDeployment().reserve_port()
    params: Params = {
        "ctx-size": 200_000,
        "parallel": 1,
        "cache-type-k": "f32",
        "cache-type-v": "f32",
    }
    argv = engine.launch_command(params, host=host, port=port).argv
    # the engine moves itself into the cgroup, then becomes the engine (same pid)
    command = LaunchCommand(
        argv=["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"), *argv],
        host=host,
        port=port,
    )
    try:
        failed = _start_and_fail(engine, command, tmp_path / "engine.log")
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()
    assert failed.kind is FailureKind.HOST_OOM, failed.reason
    assert "out-of-memory evidence" in failed.reason, failed.reason
    # the kernel log's record for this pid, or (where it is unreadable) a grown oom_kill counter
    assert "Killed process" in failed.reason or "oom_kill" in failed.reason, failed.reason
    assert "servetune: out-of-memory evidence:" in (tmp_path / "engine.log").read_text()


def test_an_mlock_warning_does_not_turn_a_real_crash_into_host_oom(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    """Issue 5 item 6: --mlock without the right limit logs "failed to mlock … Cannot allocate
    memory" (a warning; the server goes on); a later SIGSEGV is a crash (retried), as without it."""
    if shutil.which("capsh") is None:
        pytest.skip("capsh is needed to drop CAP_IPC_LOCK (root may always lock memory)")
    engine = tiny_engine(tiny_model.gguf_path)
    host, port = LocalDeployment().reserve_port()
    argv = engine.launch_command({"mlock": True}, host=host, port=port).argv
    limited = [
        "capsh", "--drop=cap_ipc_lock", "--", "-c", 'ulimit -l 64 && exec "$0" "$@"', *argv
    ]  # fmt: skip

    async def scenario() -> tuple[int | None, str]:
        deployment = LocalDeployment(stop_timeout_s=5.0)
        command = LaunchCommand(argv=limited, host=host, port=port)
        running = await deployment.start(command, tmp_path / "engine.log")
        try:
            await wait_ready(engine.endpoint(host, port), running, engine, 60)
            os.kill(running.pgid, signal.SIGSEGV)
            assert wait_until(lambda: running.returncode() is not None, 10)
            return running.returncode(), running.log_text()
        finally:
            await running.stop()

    rc, log = asyncio.run(scenario())
    assert "failed to mlock" in log and "Cannot allocate memory" in log, log[-2000:]
    assert rc == -signal.SIGSEGV
    kind, reason = engine.classify_failure(log, rc, {"mlock": True})
    assert kind is FailureKind.ENGINE_CRASHED, reason
    assert "killed by SIGSEGV" in reason


def test_a_sigkilled_engine_is_retried_once_and_the_trial_completes(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    """Issue 6 item 3 end to end: run_trial's first engine is SIGKILLed right after launch (no OOM
    anywhere); the trial is engine_crashed, retried on a fresh server, and completes."""
    doc = small_spec(tiny_model, name="killed")
    doc["engine"]["flags"] = {"threads": 2, "fit": "off"}
    spec = StudySpec.model_validate(doc)
    engine = LlamaCppEngine(spec.engine)
    starts: list[int] = []

    def kill_the_first(running: RunningEngine) -> None:
        starts.append(running.pgid or 0)
        if len(starts) == 1:
            os.killpg(running.pgid or 0, signal.SIGKILL)

    ctx = TrialContext(
        spec=spec,
        engine=engine,
        deployment=LocalDeployment(stop_timeout_s=5.0),
        client=BuiltinClient.for_spec(spec),
        log_dir=tmp_path,
        on_started=kill_the_first,
    )
    result = asyncio.run(run_trial(ctx, {"parallel": 2}, 0))
    assert len(starts) == 2
    assert result.state is TrialState.COMPLETE, result.failure_reason
    assert result.notes[0].startswith("retried once after engine_crashed: killed by SIGKILL"), (
        result.notes
    )
    assert "no evidence of running out of memory" in result.notes[0]
