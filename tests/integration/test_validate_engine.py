"""`servetune validate` refuses, with exit status 2 and the field to fix, what the engine can
never run: a fixed ctx-size smaller than one request, requests longer than the model's context,
a truncated GGUF (issue 6 item 6); and `run` refuses them before writing anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from servetune.modelgen import ModelFiles
from tests.integration.study_helpers import servetune, small_spec, write_spec

pytestmark = pytest.mark.integration


def _truncated(tiny_model: ModelFiles, tmp_path: Path) -> str:
    data = tiny_model.gguf_path.read_bytes()
    short = tmp_path / "short.gguf"
    short.write_bytes(data[: len(data) - 4096])
    return str(short)


@pytest.mark.parametrize(
    ("case", "field", "words"),
    [
        ("fixed ctx-size", "engine.flags.ctx-size", "raise ctx-size to ≥ 1280"),
        ("long requests", "workload.input_tokens", "the model's context length 4096"),
        ("truncated gguf", "engine.model", "4,096 missing"),
    ],
)
def test_validate_and_run_refuse_what_the_engine_cannot_run(
    tiny_model: ModelFiles, tmp_path: Path, case: str, field: str, words: str
) -> None:
    doc: dict[str, Any] = small_spec(tiny_model, name="never")
    if case == "fixed ctx-size":
        doc["engine"]["flags"] = {"ctx-size": 512}
        doc["workload"].update(input_tokens=1000, output_tokens=100)
    elif case == "long requests":
        doc["workload"].update(input_tokens=5000, output_tokens=64)
    else:
        doc["engine"]["model"] = _truncated(tiny_model, tmp_path)
    spec = write_spec(tmp_path / "spec.yaml", doc)
    for command in ("validate", "run"):
        out = servetune(tmp_path, command, str(spec))
        assert out.returncode == 2, out.stdout + out.stderr
        assert field in out.stderr and words in out.stderr, out.stderr
        assert "1 problem(s)" in out.stderr, out.stderr
    # nothing written: no trial logs, no study in the database
    assert not (tmp_path / "data" / "logs" / "never").exists()
    listed = servetune(tmp_path, "list")
    assert "never" not in listed.stdout, listed.stdout
