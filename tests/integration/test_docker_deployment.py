"""DockerDeployment against a real Docker engine started by the tests, serving the tiny model in a
locally built llama.cpp image: a whole trial, stop/timeout/cancel cleanup, GPU requests, secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from servetune.bench.builtin import BuiltinClient
from servetune.core.spec import DockerDeploymentSpec, parse_spec
from servetune.core.study import FailureKind, TrialState
from servetune.deploy.base import RunningEngine
from servetune.deploy.docker import DockerDeployment, container_name
from servetune.engines.base import LaunchCommand
from servetune.engines.llamacpp import LlamaCppEngine
from servetune.errors import DeploymentError
from servetune.modelgen import ModelFiles
from servetune.runner import TrialContext, run_trial
from servetune.study_session import deployment_for
from tests.integration.docker_helpers import ENTRYPOINT, llamacpp_image, private_dockerd

pytestmark = [pytest.mark.integration, pytest.mark.docker]

TOKEN = "hf_servetuneTestTokenDoNotLog123"


@pytest.fixture(scope="module")
def dockerd() -> Iterator[tuple[str, str]]:
    """(daemon URL, llama.cpp image tag) of a private dockerd for this module."""
    with private_dockerd() as url:
        client = docker.DockerClient(base_url=url)
        yield url, llamacpp_image(client)


def _spec(tiny_model: ModelFiles, url: str, image: str, tmp_path: Path, **deployment: object):
    return parse_spec(
        {
            "name": "dock",
            "engine": {
                "kind": "llamacpp", "model": str(tiny_model.gguf_path),
                "tokenizer": str(tiny_model.tokenizer_dir), "binary": "xllamacpp",
                "served_model_name": "tiny", "flags": {"threads": 2, "fit": "off"},
            },
            "deployment": {
                "kind": "docker", "image": image, "entrypoint": ENTRYPOINT, "pull": "never",
                "docker_host": url, "shm_size_gib": 0.25, "stop_timeout_s": 5,
                "startup_timeout_s": 60, "max_outside_cpu_fraction": 1.0,  # no load re-runs
                **deployment,
            },
            "space": {"params": {"parallel": {"kind": "choice", "values": [1, 2]}}},
            "workload": {"concurrency": [2], "num_requests": 4, "input_tokens": 16,
                         "output_tokens": 8, "warmup_requests": 1},
            "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
        }
    )  # fmt: skip


def _context(spec, tmp_path: Path, environ: dict[str, str] | None = None):
    engine = LlamaCppEngine(spec.engine)
    deployment = DockerDeployment(
        spec.deployment,
        study=spec.name,
        model_path=spec.engine.model,
        server_prefix=engine.server_prefix(),
        environ=environ or {},
    )
    ctx = TrialContext(
        spec=spec, engine=engine, deployment=deployment,
        client=BuiltinClient.for_spec(spec), log_dir=tmp_path / "logs", label="dock",
    )  # fmt: skip
    return ctx, deployment


def _all_containers(url: str) -> list[str]:
    return [c.name for c in docker.DockerClient(base_url=url).containers.list(all=True)]


def test_a_trial_runs_in_a_container_and_the_container_is_removed(
    dockerd: tuple[str, str], tiny_model: ModelFiles, tmp_path: Path
) -> None:
    url, image = dockerd
    spec = _spec(tiny_model, url, image, tmp_path)
    ctx, deployment = _context(spec, tmp_path, environ={"HF_TOKEN": TOKEN})
    seen: dict[str, object] = {}

    def started(running: RunningEngine) -> None:
        c = docker.DockerClient(base_url=url).containers.get(running.name)  # type: ignore[attr-defined]
        seen.update(name=c.name, env=c.attrs["Config"]["Env"], host=c.attrs["HostConfig"],
                    labels=c.labels, mounts=c.attrs["Mounts"])  # fmt: skip

    ctx.on_started = started
    result = asyncio.run(run_trial(ctx, {"parallel": 2}, 3))

    assert result.state is TrialState.COMPLETE, result.failure_reason
    level = result.metrics[0]
    assert level.completed == 4 and level.failed == 0
    assert level.output_tokens_per_s > 0
    # one container per trial, named and labelled after study and trial, removed afterwards
    assert seen["name"] == container_name("dock", "trial-0003") == "servetune-dock-trial-0003"
    assert seen["labels"] == {"io.servetune.study": "dock", "io.servetune.trial": "trial-0003"}
    assert _all_containers(url) == []
    host = seen["host"]
    assert isinstance(host, dict)
    assert host["Init"] is True and host["NetworkMode"] == "host"
    assert host["ShmSize"] == 256 * 1024 * 1024
    (mount,) = seen["mounts"]  # type: ignore[misc]
    assert mount["Source"] == str(tiny_model.gguf_path.parent) and mount["RW"] is False
    # the trial's params reached the server inside the container; the token only its env
    assert "--parallel 2" in " ".join(result.launch_argv)
    assert f"HF_TOKEN={TOKEN}" in seen["env"]  # type: ignore[operator]
    log_text = Path(result.log_path or "").read_text()
    assert "listening on" in log_text and TOKEN not in log_text
    assert TOKEN not in deployment.plan(LaunchCommand(argv=["x"]), "trial-0003").display()


def test_stop_timeout_and_cancel_remove_the_container(
    dockerd: tuple[str, str], tiny_model: ModelFiles, tmp_path: Path
) -> None:
    url, image = dockerd
    # stop: the engine gets SIGTERM through the container's init and exits on its own
    trap = (
        "import signal, sys, time, os; print('token', os.environ.get('HF_TOKEN'), flush=True);"
        "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(0)));"
        "time.sleep(600)"
    )
    spec = _spec(tiny_model, url, image, tmp_path, entrypoint=["python3", "-c", trap],
                 startup_timeout_s=2)  # fmt: skip
    ctx, deployment = _context(spec, tmp_path, environ={"HF_TOKEN": TOKEN})

    async def stop_one() -> int | None:
        running = await deployment.start(
            LaunchCommand(argv=["server"]), tmp_path / "trial-0001.log"
        )
        await asyncio.sleep(1.0)
        assert running.returncode() is None
        return await running.stop()

    assert asyncio.run(stop_one()) == 0
    log_text = (tmp_path / "trial-0001.log").read_text()
    assert "got SIGTERM" in log_text
    assert "token ***" in log_text and TOKEN not in log_text
    assert _all_containers(url) == []

    # timeout: a server that never answers fails as startup_timeout, container gone
    result = asyncio.run(run_trial(ctx, {"parallel": 1}, 2))
    assert result.failure_kind is FailureKind.STARTUP_TIMEOUT
    assert _all_containers(url) == []

    # cancel: cancelling the trial while the engine starts removes the container too
    async def cancel_one() -> None:
        up = asyncio.Event()
        ctx.on_started = lambda running: up.set()
        task = asyncio.create_task(run_trial(ctx, {"parallel": 1}, 5))
        await asyncio.wait_for(up.wait(), 30)
        assert _all_containers(url) == ["servetune-dock-trial-0005"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_one())
    assert _all_containers(url) == []

    # cancel while the container is being created and started: nothing is left either
    async def cancel_in_start(delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            start = deployment.start(LaunchCommand(argv=["server"]), tmp_path / "trial-0006.log")
            running = await asyncio.wait_for(start, timeout=delay_s)
            await running.stop()  # start won the race: stop it as run_trial would

    for delay_s in (0.005, 0.05, 0.2):
        asyncio.run(cancel_in_start(delay_s))
        assert _all_containers(url) == []


def test_an_engine_that_dies_at_start_is_classified_from_its_last_log_line(
    dockerd: tuple[str, str], tiny_model: ModelFiles, tmp_path: Path
) -> None:
    url, image = dockerd
    # a model file that is not a GGUF: llama.cpp's load error is among its last lines
    bad = tmp_path / "models" / "broken.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"not a gguf file\n" * 64)
    spec = _spec(tiny_model, url, image, tmp_path, startup_timeout_s=30)
    spec = spec.model_copy(update={"engine": spec.engine.model_copy(update={"model": str(bad)})})
    ctx, _ = _context(spec, tmp_path)
    result = asyncio.run(run_trial(ctx, {"parallel": 1}, 4))
    assert result.state is TrialState.FAIL
    assert result.failure_kind is FailureKind.MODEL_LOAD_FAILED, result.failure_reason
    assert _all_containers(url) == []


def test_gpu_request_without_gpus_fails_clearly_and_leaves_nothing(
    dockerd: tuple[str, str], tiny_model: ModelFiles, tmp_path: Path
) -> None:
    url, image = dockerd
    spec = _spec(tiny_model, url, image, tmp_path, gpu_ids=["0"])
    _, deployment = _context(spec, tmp_path)
    with pytest.raises(DeploymentError) as e:
        asyncio.run(deployment.start(LaunchCommand(argv=["server"]), tmp_path / "trial-0000.log"))
    assert "asked for GPUs ['0']" in str(e.value)
    assert "deployment.gpu_ids: []" in str(e.value)
    assert _all_containers(url) == []


def test_leftovers_of_a_dead_run_are_found_and_removed(
    dockerd: tuple[str, str], tiny_model: ModelFiles, tmp_path: Path
) -> None:
    url, image = dockerd
    spec = _spec(tiny_model, url, image, tmp_path, entrypoint=["sleep", "600"])
    _, first = _context(spec, tmp_path)
    other_spec = spec.model_copy(update={"name": "other"})
    _, other = _context(other_spec, tmp_path)

    async def leave_running() -> None:
        await first.start(LaunchCommand(argv=[]), tmp_path / "trial-0007.log")
        await other.start(LaunchCommand(argv=[]), tmp_path / "trial-0001.log")

    asyncio.run(leave_running())  # a run that died: nobody stops these
    assert first.leftovers() == ["servetune-dock-trial-0007"]
    # resuming the study builds its deployment the way `servetune resume` does: leftovers go
    resumed = deployment_for(spec, LlamaCppEngine(spec.engine), "dock")
    assert isinstance(resumed, DockerDeployment) and resumed.leftovers() == []
    assert _all_containers(url) == ["servetune-other-trial-0001"]  # another study's is left alone
    assert other.remove_leftovers() == ["servetune-other-trial-0001"]


def test_unreachable_daemon_and_missing_image_fail_with_the_fix(
    dockerd: tuple[str, str], tiny_model: ModelFiles, tmp_path: Path
) -> None:
    url, _ = dockerd
    missing = DockerDeploymentSpec(
        kind="docker", image="nope/none:1", pull="never", docker_host=url
    )
    deployment = DockerDeployment(missing, study="s", model_path=str(tiny_model.gguf_path))
    with pytest.raises(
        DeploymentError, match=r"not on the Docker host and deployment\.pull is never"
    ):
        asyncio.run(deployment.start(LaunchCommand(argv=["x"]), tmp_path / "trial-0000.log"))
    nowhere = missing.model_copy(update={"docker_host": f"unix://{tmp_path}/no.sock"})
    deployment = DockerDeployment(nowhere, study="s", model_path=str(tiny_model.gguf_path))
    with pytest.raises(DeploymentError, match="cannot reach the Docker daemon"):
        asyncio.run(deployment.start(LaunchCommand(argv=["x"]), tmp_path / "trial-0000.log"))
    assert _all_containers(url) == []
