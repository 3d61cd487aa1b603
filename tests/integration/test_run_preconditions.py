"""`servetune run` refuses, before writing anything, a study no trial of which could start here:
an engine program that is not installed, a Docker daemon it cannot reach; and `--count` without
`--dry-run` (it would be silently ignored)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from servetune.cli import app
from tests.unit.gpu_engine_helpers import QWEN2_7B, spec_doc, write_config

pytestmark = pytest.mark.integration


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doc: dict[str, Any], *args: str) -> Any:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(doc))
    monkeypatch.setenv("SERVETUNE_DATA_DIR", str(tmp_path / "data"))
    return CliRunner().invoke(app, ["run", str(spec_file), *args])


def _vllm_doc(tmp_path: Path) -> dict[str, Any]:
    folder = write_config(tmp_path, QWEN2_7B)
    return spec_doc(
        "vllm",
        str(folder),
        {"max-num-seqs": {"kind": "choice", "values": [64, 128]}},
        gpus={"count": 8, "memory_gib": 80},
    )


def test_an_engine_that_is_not_installed_stops_the_run_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = _vllm_doc(tmp_path)
    doc["engine"]["executable"] = "vllm-not-installed-here"
    result = _run(tmp_path, monkeypatch, doc)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "'vllm-not-installed-here' (vllm) is not installed" in text
    assert "engine.executable" in text and "Traceback" not in result.output
    assert not (tmp_path / "data").exists()


def test_an_unreachable_docker_daemon_stops_the_run_before_anything_is_written(
    tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = {
        "engine": {"kind": "llamacpp", "model": str(tiny_model.gguf_path)},
        "deployment": {
            "kind": "docker",
            "image": "servetune-test:none",
            "docker_host": f"unix://{tmp_path}/no-docker.sock",
        },
        "space": {"params": {"threads": {"kind": "int", "low": 1, "high": 2}}},
        "workload": {"input_tokens": 16, "output_tokens": 8, "concurrency": [1], "num_requests": 4},
        "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
    }
    result = _run(tmp_path, monkeypatch, doc)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "deployment (docker): cannot reach the Docker daemon" in text
    assert "deployment.docker_host" in text
    assert not (tmp_path / "data").exists()


def test_count_without_dry_run_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(tmp_path, monkeypatch, _vllm_doc(tmp_path), "--count", "3")
    assert result.exit_code == 2, result.output
    assert "--count only applies with --dry-run" in " ".join(result.output.split())
    assert not (tmp_path / "data").exists()
