"""OME manifests servetune generates validate against OME's real CRD schemas (../shared/data/ome) and
carry the trial's flags in the engine container's args, not only the GPU count."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest

from servetune.core.spec import KubernetesDeploymentSpec, LlamaCppEngineSpec, SpecError, parse_spec
from servetune.deploy.kubernetes import (
    KubernetesDeployment,
    inference_service,
    resource_name,
)
from servetune.engines.base import LaunchCommand
from servetune.engines.llamacpp import LlamaCppEngine
from tests import ome_schema

VLLM_ARGV = [
    "vllm", "serve", "/models/llama-3.2-1b", "--host", "0.0.0.0", "--port", "8080",
    "--served-model-name", "servetune", "--max-num-seqs", "128",
    "--gpu-memory-utilization", "0.85", "--enable-chunked-prefill", "--tensor-parallel-size", "2",
]  # fmt: skip


def _spec(**kw: Any) -> KubernetesDeploymentSpec:
    base: dict[str, Any] = {
        "kind": "kubernetes",
        "runtime": "vllm-rt",
        "base_model": "llama-3.2-1b",
    }
    return KubernetesDeploymentSpec(**{**base, **kw})


def _runner(obj: dict[str, Any]) -> dict[str, Any]:
    runner: dict[str, Any] = obj["spec"]["engine"]["runner"]
    return runner


def _pairs(args: list[str]) -> dict[str, str]:
    return {a: b for a, b in itertools.pairwise(args) if a.startswith("--")}


def test_the_converted_schemas_accept_omes_own_samples_and_reject_broken_ones() -> None:
    samples = ome_schema.samples()
    assert {s["kind"] for s in samples} == {"InferenceService", "ClusterServingRuntime"}
    for sample in samples:
        assert ome_schema.errors(sample) == [], sample["metadata"]["name"]
    isvc = next(s for s in samples if s["kind"] == "InferenceService")
    typo = {**isvc, "spec": {**isvc["spec"], "engine": {"minReplicas": 1, "runnr": {}}}}
    assert any("runnr" in e for e in ome_schema.errors(typo))
    wrong = {**isvc, "spec": {**isvc["spec"], "engine": {"minReplicas": "one"}}}
    assert any("engine.minReplicas" in e for e in ome_schema.errors(wrong))
    bad_name = {**isvc, "metadata": {"name": "Trial_3"}}
    assert ome_schema.errors(bad_name)


def test_inference_service_runs_the_trials_flags_in_the_container_args() -> None:
    spec = _spec(namespace="tuning", gpus_per_trial=2, image="vllm/vllm-openai:v0.11.0")
    command = LaunchCommand(argv=VLLM_ARGV, env={"VLLM_LOGGING_LEVEL": "INFO"})
    obj = inference_service(
        spec, command, study="llama-h100", trial="trial-0004",
        model_path="/models/llama-3.2-1b", server_prefix=["vllm", "serve"],
    )  # fmt: skip
    assert ome_schema.errors(obj) == []
    runner = _runner(obj)
    assert runner["command"] == ["vllm", "serve"]
    assert runner["args"][0] == "$(MODEL_PATH)"  # OME mounts the base model there
    flags = _pairs(runner["args"])
    assert flags["--max-num-seqs"] == "128"
    assert flags["--gpu-memory-utilization"] == "0.85"
    assert flags["--tensor-parallel-size"] == "2"
    assert "--enable-chunked-prefill" in runner["args"]
    assert flags["--port"] == "8080" and runner["ports"][0]["containerPort"] == 8080
    assert runner["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert runner["resources"]["requests"] == {"nvidia.com/gpu": 2}
    assert runner["image"] == "vllm/vllm-openai:v0.11.0"
    assert runner["env"] == [{"name": "VLLM_LOGGING_LEVEL", "value": "INFO"}]
    assert obj["metadata"]["namespace"] == "tuning"
    labels = {"servetune.io/study": "llama-h100", "servetune.io/trial": "trial-0004"}
    assert obj["metadata"]["labels"] == labels
    assert obj["spec"]["engine"]["labels"] == labels
    assert obj["spec"]["model"] == {"name": "llama-3.2-1b"}
    assert obj["spec"]["runtime"] == {"name": "vllm-rt"}


def test_each_trials_params_land_in_its_manifest_through_the_engines_launch_command() -> None:
    engine = LlamaCppEngine(
        LlamaCppEngineSpec(
            kind="llamacpp", model="/models/m.gguf", binary="xllamacpp", flags={"threads": 8}
        )
    )
    spec = _spec(entrypoint=["/app/llama-server"], gpus_per_trial=0)
    deployment = KubernetesDeployment(
        spec, study="s", model_path="/models/m.gguf", server_prefix=engine.server_prefix()
    )
    host, port = deployment.reserve_port()
    for trial, params in [
        ("trial-0001", {"parallel": 2, "batch-size": 512}),
        ("trial-0002", {"parallel": 8, "batch-size": 1024}),
    ]:
        command = engine.launch_command(params, host=host, port=port)
        (obj,) = deployment.manifests(command, trial)
        assert ome_schema.errors(obj) == []
        runner = _runner(obj)
        assert runner["command"] == ["/app/llama-server"]
        flags = _pairs(runner["args"])
        assert flags["--parallel"] == str(params["parallel"])
        assert flags["--batch-size"] == str(params["batch-size"])
        assert flags["--threads"] == "8"
        assert flags["--model"] == "$(MODEL_PATH)"
        assert flags["--host"] == "0.0.0.0" and flags["--port"] == "8080"
        assert "resources" not in runner  # gpus_per_trial 0: no GPU request
        assert obj["metadata"]["name"] == f"st-s-{trial}"


def test_runtime_and_base_model_are_generated_when_asked_and_validate() -> None:
    spec = _spec(
        image="lmsysorg/sglang:v0.5.3", create_runtime=True, create_base_model=True,
        model_storage_uri="hf://meta-llama/Llama-3.2-1B-Instruct",
    )  # fmt: skip
    deployment = KubernetesDeployment(spec, study="s", model_path="/m")
    command = LaunchCommand(argv=["python3", "-m", "sglang.launch_server", "--model-path", "/m"])
    objs = deployment.manifests(command, "trial-0000")
    assert [o["kind"] for o in objs] == [
        "ClusterBaseModel",
        "ClusterServingRuntime",
        "InferenceService",
    ]
    for obj in objs:
        assert ome_schema.errors(obj) == [], obj["kind"]
    base_model, runtime, isvc = objs
    assert base_model["metadata"]["name"] == "llama-3.2-1b"
    assert base_model["spec"]["storage"]["storageUri"] == "hf://meta-llama/Llama-3.2-1B-Instruct"
    assert runtime["metadata"]["name"] == "vllm-rt"
    assert runtime["spec"]["engineConfig"]["runner"]["image"] == "lmsysorg/sglang:v0.5.3"
    assert _runner(isvc)["command"] == ["python3"]
    assert _runner(isvc)["args"][:3] == ["-m", "sglang.launch_server", "--model-path"]


@pytest.mark.parametrize(
    ("study", "trial"),
    [
        ("Llama_8B.h100", "trial-0003-attempt2"),
        ("x" * 200, "trial-0001"),
        ("9lives", "trial-0000"),
    ],
)
def test_resource_names_are_dns_labels_and_unique_per_trial(study: str, trial: str) -> None:
    name = resource_name(study, trial)
    assert re.fullmatch(ome_schema.DNS_1035, name) and len(name) <= 63
    assert name != resource_name(study, "trial-9999")


def test_kubernetes_spec_errors_name_the_field_and_the_fix() -> None:
    doc: dict[str, Any] = {
        "engine": {"kind": "llamacpp", "model": "/m.gguf"},
        "space": {"params": {"parallel": {"kind": "choice", "values": [1, 2]}}},
        "workload": {"concurrency": [1], "num_requests": 4},
        "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
    }
    with pytest.raises(SpecError) as e:
        parse_spec({**doc, "deployment": {"kind": "kubernetes", "base_model": "b"}})
    assert "deployment.runtime: missing; add this field" in str(e.value)
    with pytest.raises(SpecError) as e:
        parse_spec(
            {**doc, "deployment": {"kind": "kubernetes", "runtime": "r", "base_model": "b",
                                   "namespace": "Tuning_Team"}}
        )  # fmt: skip
    assert "deployment.namespace: 'Tuning_Team' is not a Kubernetes namespace" in str(e.value)
    with pytest.raises(SpecError) as e:
        parse_spec(
            {
                **doc,
                "deployment": {
                    "kind": "kubernetes",
                    "runtime": "r",
                    "base_model": "b",
                    "create_base_model": True,
                },
            }
        )
    assert "create_base_model needs `model_storage_uri`" in str(e.value)
    spec = parse_spec({**doc, "deployment": {"startup_timeout_s": 5}})
    assert spec.deployment.kind == "local"  # no kind = local, as before
