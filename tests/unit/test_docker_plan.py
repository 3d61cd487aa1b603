"""DockerDeployment's container plan (pure): the argv that runs inside, mounts, GPUs, names, and a
Hugging Face token that reaches the container's environment but never a display."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from servetune.core.spec import DockerDeploymentSpec, LlamaCppEngineSpec
from servetune.deploy.docker import DockerDeployment, container_name, redact
from servetune.engines.base import LaunchCommand
from servetune.engines.llamacpp import LlamaCppEngine

TOKEN = "hf_abcdefSECRET0123456789"


def _deployment(tmp_path: Path, **kw: object) -> tuple[DockerDeployment, LlamaCppEngine]:
    model = tmp_path / "models" / "m.gguf"
    engine = LlamaCppEngine(
        LlamaCppEngineSpec(kind="llamacpp", model=str(model), binary="xllamacpp")
    )
    spec = DockerDeploymentSpec(kind="docker", image="ghcr.io/ggml-org/llama.cpp:server", **kw)  # type: ignore[arg-type]
    deployment = DockerDeployment(
        spec, study="llama-h100", model_path=str(model), server_prefix=engine.server_prefix(),
        environ={"HF_TOKEN": TOKEN, "MY_TOKEN": "hf_other"},
    )  # fmt: skip
    return deployment, engine


def test_the_engines_server_program_is_replaced_by_the_images_entrypoint(tmp_path: Path) -> None:
    deployment, engine = _deployment(tmp_path, entrypoint=["/app/llama-server"])
    command = engine.launch_command({"parallel": 4, "batch-size": 256}, host="127.0.0.1", port=9000)
    plan = deployment.plan(command, "trial-0002")
    assert plan.argv[0] == "/app/llama-server"
    assert plan.argv[1:] == command.argv[len(engine.server_prefix()) :]
    joined = " ".join(plan.argv)
    assert "--parallel 4" in joined and "--batch-size 256" in joined and "--port 9000" in joined
    # without an entrypoint the launch command runs unchanged
    plain, _ = _deployment(tmp_path)
    assert plain.plan(command, "trial-0002").argv == command.argv


def test_mounts_gpus_shm_names_and_labels(tmp_path: Path) -> None:
    deployment, _ = _deployment(tmp_path, gpu_ids=["1", "3"], shm_size_gib=2)
    plan = deployment.plan(LaunchCommand(argv=["x"]), "trial-0007-attempt2")
    model_dir = str((tmp_path / "models").absolute())
    assert plan.mounts == [(model_dir, model_dir)]
    assert plan.gpu_ids == ["1", "3"]
    assert plan.shm_size_mib == 2048
    assert plan.name == "servetune-llama-h100-trial-0007-attempt2"
    assert plan.labels == {
        "io.servetune.study": "llama-h100",
        "io.servetune.trial": "trial-0007-attempt2",
    }
    assert "--gpus device=1,3" in plan.display()
    other, _ = _deployment(tmp_path, model_dir=str(tmp_path / "all-models"))
    assert other.plan(LaunchCommand(argv=["x"]), "t").mounts[0][0] == str(tmp_path / "all-models")


def test_the_hf_token_reaches_the_env_and_never_a_display(tmp_path: Path) -> None:
    deployment, _ = _deployment(tmp_path, env={"VLLM_LOGGING_LEVEL": "DEBUG"})
    plan = deployment.plan(LaunchCommand(argv=["serve", f"--token={TOKEN}"]), "trial-0000")
    assert plan.env == {"VLLM_LOGGING_LEVEL": "DEBUG", "HF_TOKEN": TOKEN}
    shown = plan.display()
    assert TOKEN not in shown and "HF_TOKEN=***" in shown and "--token=***" in shown
    assert TOKEN not in repr(plan) and TOKEN not in str(plan)
    # the variable it is read from is configurable; null passes none
    named, _ = _deployment(tmp_path, hf_token_env="MY_TOKEN")
    assert named.plan(LaunchCommand(argv=["x"]), "t").env == {"HF_TOKEN": "hf_other"}
    none, _ = _deployment(tmp_path, hf_token_env=None)
    assert none.plan(LaunchCommand(argv=["x"]), "t").env == {}


@pytest.mark.parametrize(
    ("study", "trial", "name"),
    [("a b/c", "trial-0001", "servetune-a-b-c-trial-0001"), ("run.24", "t", "servetune-run.24-t")],
)
def test_container_names_are_docker_safe(study: str, trial: str, name: str) -> None:
    assert container_name(study, trial) == name


def test_redact_hides_every_secret_and_ignores_empty_ones() -> None:
    assert redact("a hf_x b hf_x", ["hf_x", ""]) == "a *** b ***"


def test_a_missing_sdk_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from servetune.core.spec import KubernetesDeploymentSpec
    from servetune.deploy.kubernetes import KubernetesDeployment
    from servetune.errors import DeploymentError

    monkeypatch.setitem(sys.modules, "docker", None)  # as if servetune[docker] were not installed
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    deployment, _ = _deployment(tmp_path)
    with pytest.raises(DeploymentError, match=re.escape("pip install 'servetune[docker]'")):
        deployment.client()
    spec = KubernetesDeploymentSpec(kind="kubernetes", runtime="r", base_model="b")
    k8s = KubernetesDeployment(spec, study="s", model_path="/m")
    with pytest.raises(DeploymentError, match=re.escape("pip install 'servetune[kubernetes]'")):
        asyncio.run(k8s.start(LaunchCommand(argv=["x"]), tmp_path / "trial-0000.log"))


def test_docker_spec_reads_yaml_gpu_indexes_and_refuses_a_token_in_the_spec() -> None:
    from servetune.core.spec import SpecError, parse_spec

    doc = {
        "engine": {"kind": "llamacpp", "model": "/m.gguf"},
        "space": {"params": {"parallel": {"kind": "choice", "values": [1, 2]}}},
        "workload": {"concurrency": [1], "num_requests": 4},
        "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
    }
    spec = parse_spec({**doc, "deployment": {"kind": "docker", "image": "i:1", "gpu_ids": [0, 1]}})
    assert isinstance(spec.deployment, DockerDeploymentSpec)
    assert spec.deployment.gpu_ids == ["0", "1"]
    with pytest.raises(SpecError) as e:
        parse_spec({**doc, "deployment": {"kind": "docker", "image": "i:1", "hf_token": TOKEN}})
    assert "never put a token in the spec" in str(e.value) and "hf_token_env" in str(e.value)
    assert TOKEN not in str(e.value)
