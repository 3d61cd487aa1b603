"""`servetune run --dry-run` shows what each deployment would start: the docker run line or the
OME manifests, with the trial's own flags, and contacts no daemon or API server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from servetune.cli import app
from tests.unit.gpu_engine_helpers import QWEN2_7B, spec_doc, write_config


def _dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deployment: dict[str, Any]) -> str:
    folder = write_config(tmp_path, QWEN2_7B)
    doc = spec_doc(
        "vllm",
        str(folder),
        {"max-num-seqs": {"kind": "choice", "values": [64, 128]}},
        gpus={"count": 8, "memory_gib": 80},
    )
    doc["name"] = "dry"
    doc["strategy"] = {"kind": "grid"}
    doc["deployment"] = deployment
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(doc))
    monkeypatch.setenv("SERVETUNE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")  # never contacted
    result = CliRunner().invoke(app, ["run", str(spec_file), "--dry-run", "--count", "4"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "data").exists()
    return result.output


def test_docker_dry_run_prints_each_trials_container_with_its_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _dry_run(
        tmp_path,
        monkeypatch,
        {"kind": "docker", "image": "vllm/vllm-openai:v0.11.0", "gpu_ids": ["0", "1"]},
    )
    text = " ".join(out.split())
    # as in a real run: the defaults, their early repeat (budget.baseline_repeats 2), the search
    assert out.index("trial 0 (baseline)") < out.index("trial 1 (confirm)") < out.index("trial 2")
    assert "docker deployment:" in text
    assert "docker run --init --network host --name servetune-dry-trial-0002" in text
    assert "--gpus device=0,1" in text and "vllm/vllm-openai:v0.11.0" in text
    assert "--max-num-seqs 64" in text and "--max-num-seqs 128" in text
    assert "hf_secret_value_123" not in out and "HF_TOKEN=***" in text


def test_kubernetes_dry_run_prints_the_inference_service_with_the_trials_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _dry_run(
        tmp_path,
        monkeypatch,
        {"kind": "kubernetes", "runtime": "vllm-rt", "base_model": "qwen", "namespace": "tune"},
    )
    assert "kubernetes deployment:" in out
    body = out.split("trial 3 (search)")[1].split("kubernetes deployment:")[1]
    body = body.split("pre-flight:")[0]
    docs = [d for d in yaml.safe_load_all(body) if d]
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    assert isvc["metadata"]["namespace"] == "tune"
    assert isvc["metadata"]["labels"]["servetune.io/trial"] == "trial-0003"
    args = json.dumps(isvc["spec"])
    assert '"--max-num-seqs", "128"' in args
