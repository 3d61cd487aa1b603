"""`servetune submit` against a live manager, and `servetune manager`'s refusals, as subprocesses.

The manager is served by uvicorn in the test process with ``ScriptedSupervisor``.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from servetune.manager.app import create_app
from servetune.modelgen import ModelFiles
from tests.integration.manager_helpers import ScriptedSupervisor, live_server, manager_settings
from tests.integration.study_helpers import cli_env, servetune, small_spec, write_spec
from tests.redis_server import RedisServer, free_port

pytestmark = pytest.mark.integration

TOKEN = "submit-token-abcdef0123456789"


def test_submit_creates_the_study_and_follows_it_to_the_end(
    tmp_path: Path, private_redis: RedisServer, tiny_model: ModelFiles
) -> None:
    settings = manager_settings(tmp_path, private_redis.url, api_token=TOKEN)
    app = create_app(settings, supervisor_factory=lambda *a: ScriptedSupervisor(*a, recommend=True))
    spec = write_spec(tmp_path / "spec.yaml", small_spec(tiny_model))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with live_server(app) as url:
        denied = servetune(tmp_path, "submit", str(spec), "--manager", url, "--name", "x")
        assert denied.returncode == 1 and "--token-file" in denied.stderr
        done = servetune(
            tmp_path, "submit", str(spec), "--manager", url, "--name", "remote",
            "--token-file", str(token_file),
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("study remote (id 1) on http://127.0.0.1:")
    assert any(line.startswith("trial  0 baseline COMPLETE") for line in lines), done.stdout
    assert any("trial  1 search" in line and "benchmark_failed" in line for line in lines)
    # then what `run` prints at the end, from the study as the manager stored it
    end = lines[lines.index("study remote: finished") + 1 :]
    assert "trials: 1 COMPLETE, 1 FAIL" in end, done.stdout
    assert "engine defaults (trial 0, feasible): threads=1" in end, done.stdout
    assert "run-to-run spread: 1.5 % (differences inside it are ties)" in end
    assert f"verdict: {ScriptedSupervisor.RECOMMENDATION}" in end
    launch = end.index("launch command (your llama.cpp build):")
    assert "llama-server" in end[launch + 1] and "--threads 1" in end[launch + 1], done.stdout
    assert end[-1] == f"report: {url}/api/studies/1/report"


def test_submit_of_a_study_with_nothing_to_recommend_ends_like_run(
    tmp_path: Path, private_redis: RedisServer, tiny_model: ModelFiles
) -> None:
    settings = manager_settings(tmp_path, private_redis.url)
    app = create_app(settings, supervisor_factory=ScriptedSupervisor)
    spec = write_spec(tmp_path / "spec.yaml", small_spec(tiny_model))
    with live_server(app) as url:
        done = servetune(tmp_path, "submit", str(spec), "--manager", url, "--name", "none")
    assert done.returncode == 1, done.stderr  # as `servetune run` when nothing completed
    end = done.stdout.split("study none: finished", 1)[1]
    assert "no trial completed: see `servetune show` for each failure's reason" in end
    assert end.strip().endswith(f"report: {url}/api/studies/1/report")


def test_submit_prints_the_problems_exactly_like_validate(
    tmp_path: Path, private_redis: RedisServer, tiny_model: ModelFiles
) -> None:
    doc = small_spec(tiny_model)
    doc["workload"]["concurrency"] = [0]
    doc["budget"]["max_trials"] = -1
    spec = write_spec(tmp_path / "bad.yaml", doc)
    app = create_app(
        manager_settings(tmp_path, private_redis.url), supervisor_factory=ScriptedSupervisor
    )
    with live_server(app) as url:
        submitted = servetune(tmp_path, "submit", str(spec), "--manager", url)
    validated = servetune(tmp_path, "validate", str(spec))
    assert (submitted.returncode, validated.returncode) == (2, 2)
    assert "problem(s)" in submitted.stderr
    assert submitted.stderr == validated.stderr


def test_a_browser_style_websocket_gets_its_bearer_subprotocol_back(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    import asyncio

    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    settings = manager_settings(tmp_path, private_redis.url, api_token=TOKEN)
    app = create_app(settings, supervisor_factory=ScriptedSupervisor)

    async def scenario(url: str) -> None:
        logs = url.replace("http", "ws") + "/ws/workers/w-1/logs"
        async with connect(logs, subprotocols=[f"bearer.{TOKEN}"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == f"bearer.{TOKEN}"
            assert '"type":"logs"' in str(await ws.recv()).replace(" ", "")
        with pytest.raises(InvalidStatus) as refused:  # closed before accept: HTTP 403
            async with connect(logs, subprotocols=["bearer.wrong"]):  # type: ignore[list-item]
                pass
        assert refused.value.response.status_code == 403

    with live_server(app) as url:
        asyncio.run(scenario(url))


def _start_manager(tmp_path: Path, port: int) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "servetune", "manager", "--port", str(port)]
    return subprocess.Popen(  # noqa: S603 - argv list of our own CLI
        argv, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_healthy(proc: subprocess.Popen[str], url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/api/health", timeout=2).json().get("status") == "ok":
                return
        time.sleep(0.2)
    raise AssertionError("the manager did not become healthy")


def test_the_manager_process_runs_its_private_redis_and_takes_it_down(tmp_path: Path) -> None:
    """`servetune manager` with the real supervisor: healthy with a private redis-server,
    which is gone after SIGTERM, and after SIGKILL of the manager too."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for stop in (signal.SIGTERM, signal.SIGKILL):
        proc = _start_manager(tmp_path, port)
        try:
            _wait_healthy(proc, url)
            assert httpx.get(f"{url}/docs", timeout=5).status_code == 200
            children = psutil.Process(proc.pid).children()
            redis_child = next(c for c in children if "redis-server" in c.name())
            proc.send_signal(stop)
            proc.wait(timeout=30)
            psutil.wait_procs([redis_child], timeout=10)
            assert not redis_child.is_running() or redis_child.status() == psutil.STATUS_ZOMBIE
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                output = proc.stdout.read()
                proc.stdout.close()
        assert "Traceback" not in output, output
    assert "manager on http://127.0.0.1:" in output


def wait_following(supervisor: ScriptedSupervisor, proc: subprocess.Popen[str]) -> None:
    """Wait until `submit` (``proc``) follows study 1 over the WebSocket."""
    deadline = time.monotonic() + 30
    while not supervisor._subs[1]:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def test_ctrl_c_stops_following_and_says_the_study_goes_on(
    tmp_path: Path, private_redis: RedisServer, tiny_model: ModelFiles
) -> None:
    from typing import Any

    def held(*args: Any) -> ScriptedSupervisor:
        return ScriptedSupervisor(*args, hold=True)

    app = create_app(manager_settings(tmp_path, private_redis.url), supervisor_factory=held)
    spec = write_spec(tmp_path / "spec.yaml", small_spec(tiny_model, name="long"))
    with live_server(app) as url:
        argv = [sys.executable, "-m", "servetune", "submit", str(spec), "--manager", url]
        proc = subprocess.Popen(  # noqa: S603 - argv list of our own CLI
            argv, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("study long (id 1) on ")
            wait_following(app.state.manager.supervisor, proc)
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 130
        assert "keeps running on the manager" in " ".join(out.split())
        assert httpx.get(f"{url}/api/studies/1").json()["running_here"] is True


def test_submit_follows_the_study_through_a_manager_restart(
    tmp_path: Path, private_redis: RedisServer, tiny_model: ModelFiles
) -> None:
    from typing import Any

    built: list[ScriptedSupervisor] = []

    def first_held(*args: Any) -> ScriptedSupervisor:
        built.append(ScriptedSupervisor(*args, hold=not built, recommend=True))  # restarted: runs
        return built[-1]

    app = create_app(manager_settings(tmp_path, private_redis.url), supervisor_factory=first_held)
    spec = write_spec(tmp_path / "spec.yaml", small_spec(tiny_model, name="through"))
    port = free_port()
    with live_server(app, port=port) as url:
        argv = [sys.executable, "-m", "servetune", "submit", str(spec), "--manager", url]
        proc = subprocess.Popen(  # noqa: S603 - argv list of our own CLI
            argv, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("study through (id 1) on ")
        wait_following(built[0], proc)
    try:
        with live_server(app, port=port):  # the same manager again: it resumes the study
            out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "reconnecting" in out and "study through: finished" in out
    assert sum(line.startswith("trial  0 baseline") for line in out.splitlines()) == 1
    assert len(built) == 2 and built[1].submitted == [1]
