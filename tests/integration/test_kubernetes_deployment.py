"""KubernetesDeployment through the official ``kubernetes`` client against an in-process API emulator
that validates every object against OME's CRDs: create → wait Ready → resolve endpoint → delete,
and a whole trial whose endpoint the InferenceService's status names (a real llama.cpp server)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from servetune.bench.builtin import BuiltinClient
from servetune.core.spec import KubernetesDeploymentSpec, parse_spec
from servetune.core.study import FailureKind, TrialState
from servetune.deploy.kubernetes import KubernetesDeployment
from servetune.engines.base import LaunchCommand
from servetune.engines.llamacpp import LlamaCppEngine
from servetune.errors import DeploymentError, EngineStartFailed
from servetune.modelgen import ModelFiles
from servetune.runner import TrialContext, run_trial
from tests.integration.k8s_emulator import Emulator, running_emulator
from tests.integration.llamacpp_helpers import server_process

pytestmark = pytest.mark.integration

ARGV = ["vllm", "serve", "/models/m", "--host", "0.0.0.0", "--port", "8080",
        "--max-num-seqs", "64", "--gpu-memory-utilization", "0.8"]  # fmt: skip


def _client(url: str) -> Any:
    cfg = kubernetes.client.Configuration()
    cfg.host = url
    return kubernetes.client.ApiClient(cfg)


def _deployment(url: str, **kw: Any) -> KubernetesDeployment:
    spec = KubernetesDeploymentSpec(
        **{"kind": "kubernetes", "namespace": "tuning", "runtime": "vllm-rt",
           "base_model": "llama-1b", "startup_timeout_s": 10, "stop_timeout_s": 10, **kw}
    )  # fmt: skip
    return KubernetesDeployment(
        spec, study="s1", model_path="/models/m", server_prefix=["vllm", "serve"],
        api_client=_client(url),
    )  # fmt: skip


def test_create_wait_ready_resolve_and_delete(tmp_path: Path) -> None:
    with running_emulator() as emu:
        deployment = _deployment(
            emu.url, image="vllm/vllm-openai:v0.11.0", create_runtime=True,
            create_base_model=True, model_storage_uri="hf://meta-llama/Llama-3.2-1B",
        )  # fmt: skip
        log = tmp_path / "trial-0002.log"
        running = asyncio.run(deployment.start(LaunchCommand(argv=ARGV), log))
        assert emu.rejected == []
        assert emu.created == [
            ("ClusterBaseModel", "llama-1b"),
            ("ClusterServingRuntime", "vllm-rt"),
            ("InferenceService", "st-s1-trial-0002"),
        ]
        assert running.base_url == "http://st-s1-trial-0002.svc"
        isvc = emu.objects[("inferenceservices", "tuning", "st-s1-trial-0002")]
        args = isvc["spec"]["engine"]["runner"]["args"]
        assert args[args.index("--max-num-seqs") + 1] == "64"
        assert args[args.index("--gpu-memory-utilization") + 1] == "0.8"
        assert running.returncode() is None  # Ready
        # a second trial reuses the shared runtime and base model
        second = asyncio.run(
            deployment.start(LaunchCommand(argv=ARGV), tmp_path / "trial-0003.log")
        )
        assert emu.created[-1] == ("InferenceService", "st-s1-trial-0003")
        assert len(emu.created) == 4
        asyncio.run(running.stop())
        asyncio.run(second.stop())
        assert emu.kinds() == [
            ("ClusterBaseModel", "llama-1b"),
            ("ClusterServingRuntime", "vllm-rt"),
        ]
        assert "Ready at http://st-s1-trial-0002.svc" in log.read_text()


def test_the_emulator_rejects_what_the_crd_rejects(tmp_path: Path) -> None:
    with running_emulator() as emu:
        api = kubernetes.client.CustomObjectsApi(_client(emu.url))
        bad = {"apiVersion": "ome.io/v1beta1", "kind": "InferenceService",
               "metadata": {"name": "x", "namespace": "tuning"},
               "spec": {"engine": {"runner": {"name": "c", "args": [1]}}}}  # fmt: skip
        with pytest.raises(kubernetes.client.exceptions.ApiException) as e:
            api.create_namespaced_custom_object(
                "ome.io", "v1beta1", "tuning", "inferenceservices", bad
            )
        assert e.value.status == 422
        assert "spec.engine.runner.args.0" in emu.rejected[0]
        assert emu.kinds() == []


def test_never_ready_fails_with_the_condition_and_deletes_the_service(tmp_path: Path) -> None:
    with running_emulator(Emulator(never_ready={"st-s1-trial-0001"})) as emu:
        deployment = _deployment(emu.url, startup_timeout_s=1)
        with pytest.raises(EngineStartFailed) as e:
            asyncio.run(deployment.start(LaunchCommand(argv=ARGV), tmp_path / "trial-0001.log"))
        assert e.value.kind is FailureKind.STARTUP_TIMEOUT
        assert "not Ready after 1 s" in e.value.reason
        assert "EngineFailed engine pod CrashLoopBackOff" in e.value.reason
        assert emu.kinds() == []
        # an API error is a DeploymentError naming the resource and the server's reason
        with pytest.raises(DeploymentError, match="cannot create InferenceService st-s1-x: 422"):
            bad = _deployment(emu.url, namespace="other")
            bad.spec = bad.spec.model_copy(update={"namespace": "Bad_NS"})  # past validation
            asyncio.run(bad.start(LaunchCommand(argv=ARGV), tmp_path / "x.log"))


def test_leftovers_of_a_dead_run_are_found_and_deleted(tmp_path: Path) -> None:
    with running_emulator() as emu:
        first = _deployment(emu.url)
        asyncio.run(first.start(LaunchCommand(argv=ARGV), tmp_path / "trial-0004.log"))
        other = KubernetesDeployment(
            first.spec, study="s2", model_path="/models/m", api_client=_client(emu.url)
        )
        asyncio.run(other.start(LaunchCommand(argv=ARGV), tmp_path / "trial-0001.log"))
        resumed = _deployment(emu.url)  # a dead run never stopped them
        assert resumed.leftovers() == ["st-s1-trial-0004"]
        assert resumed.remove_leftovers() == ["st-s1-trial-0004"]
        assert emu.kinds() == [("InferenceService", "st-s2-trial-0001")]


def test_cancel_while_waiting_for_ready_deletes_the_service(tmp_path: Path) -> None:
    with running_emulator(Emulator(ready_after_s=60)) as emu:
        deployment = _deployment(emu.url)

        async def cancel_soon() -> None:
            start = deployment.start(LaunchCommand(argv=ARGV), tmp_path / "trial-0001.log")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(start, timeout=1.0)

        asyncio.run(cancel_soon())
        assert emu.created == [("InferenceService", "st-s1-trial-0001")]
        assert emu.kinds() == []


def test_a_service_that_loses_ready_reads_as_exited(tmp_path: Path) -> None:
    with running_emulator() as emu:
        deployment = _deployment(emu.url)
        running = asyncio.run(
            deployment.start(LaunchCommand(argv=ARGV), tmp_path / "trial-0001.log")
        )
        emu.objects.clear()  # deleted behind servetune's back
        running._last_check = 0.0
        assert running.returncode() == 1
        asyncio.run(running.stop())  # already gone: no error


def _trial_spec(tiny_model: ModelFiles) -> Any:
    return parse_spec(
        {
            "name": "k8s",
            "engine": {"kind": "llamacpp", "model": str(tiny_model.gguf_path), "binary": "xllamacpp",
                       "tokenizer": str(tiny_model.tokenizer_dir), "served_model_name": "tiny"},
            "deployment": {"kind": "kubernetes", "namespace": "tuning", "runtime": "llamacpp-rt",
                           "base_model": "tiny", "gpus_per_trial": 0, "startup_timeout_s": 20,
                           "max_outside_cpu_fraction": 1.0,  # trial counts: no load re-runs
                           "entrypoint": ["/app/llama-server"]},
            "space": {"params": {"parallel": {"kind": "choice", "values": [1, 2]}}},
            "workload": {"concurrency": [2], "num_requests": 4, "input_tokens": 16,
                         "output_tokens": 8, "warmup_requests": 1},
            "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
        }
    )  # fmt: skip


def _trial_context(spec: Any, emu_url: str, log_dir: Path) -> TrialContext:
    engine = LlamaCppEngine(spec.engine)
    deployment = KubernetesDeployment(
        spec.deployment, study="k8s", model_path=spec.engine.model,
        server_prefix=engine.server_prefix(), api_client=_client(emu_url),
    )  # fmt: skip
    return TrialContext(
        spec=spec, engine=engine, deployment=deployment,
        client=BuiltinClient.for_spec(spec), log_dir=log_dir, label="k8s",
    )  # fmt: skip


def test_a_trial_runs_through_the_kubernetes_deployment(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    spec = _trial_spec(tiny_model)
    params = {"parallel": 2}
    with (
        server_process(
            tiny_model.gguf_path, tmp_path / "server.log", {"threads": 2, **params}
        ) as url,
        running_emulator(Emulator(url_for=lambda obj: url)) as emu,
    ):
        ctx = _trial_context(spec, emu.url, tmp_path / "logs")
        result = asyncio.run(run_trial(ctx, params, 1))
        assert result.state is TrialState.COMPLETE, result.failure_reason
        assert result.metrics[0].completed == 4
        assert [kind for kind, _ in emu.created] == ["InferenceService"]
        assert emu.kinds() == []  # the trial's InferenceService was deleted
        assert emu.rejected == []
        log_text = Path(result.log_path or "").read_text()
        assert "'--parallel', '2'" in log_text and "'--model', '$(MODEL_PATH)'" in log_text


def test_a_trial_whose_service_never_gets_ready_fails_as_startup_timeout_once(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    spec = _trial_spec(tiny_model)
    spec = spec.model_copy(
        update={"deployment": spec.deployment.model_copy(update={"startup_timeout_s": 1})}
    )
    with running_emulator(Emulator(never_ready={"st-k8s-trial-0002"})) as emu:
        result = asyncio.run(run_trial(_trial_context(spec, emu.url, tmp_path), {"parallel": 1}, 2))
        assert result.state is TrialState.FAIL
        assert result.failure_kind is FailureKind.STARTUP_TIMEOUT
        assert "CrashLoopBackOff" in (result.failure_reason or "")
        assert emu.created == [("InferenceService", "st-k8s-trial-0002")]  # not retried
        assert emu.kinds() == []
