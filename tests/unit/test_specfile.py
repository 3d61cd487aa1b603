"""Reading a spec file: duplicate keys, binary and non-UTF-8 files are refused with the place.

Files only (tmp_path); no sockets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from servetune.errors import SpecInvalid
from servetune.specfile import read_document


def problems(path: Path) -> list[str]:
    with pytest.raises(SpecInvalid) as caught:
        read_document(path)
    return [f"{p.loc}: {p.message}" for p in caught.value.problems]


def test_a_top_level_duplicate_key_names_the_key_and_both_lines(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: a\nworkload:\n  input_tokens: 8\nname: b\n", encoding="utf-8")
    (found,) = problems(spec)
    assert found.startswith(f"{spec}:4:1: duplicate key 'name'")
    assert "first at line 1, column 1, again at line 4, column 1" in found


def test_a_nested_duplicate_key_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "workload:\n  concurrency: [1]\n  output_tokens: 4\n  concurrency: [8]\n", encoding="utf-8"
    )
    (found,) = problems(spec)
    assert "duplicate key 'concurrency'" in found
    assert "line 2, column 3, again at line 4, column 3" in found


def test_a_json_duplicate_key_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('{"budget": {"max_trials": 4,\n "max_trials": 40}}', encoding="utf-8")
    (found,) = problems(spec)
    assert "duplicate key 'max_trials'" in found
    assert "first at line 1, column 13, again at line 2, column 2" in found


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "base: &b {input_tokens: 8, output_tokens: 4}\nworkload:\n  <<: *b\n  output_tokens: 16\n",
        encoding="utf-8",
    )
    assert read_document(spec)["workload"] == {"input_tokens": 8, "output_tokens": 16}


def test_a_gguf_given_as_the_spec_is_named_as_a_model_file(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4)
    (found,) = problems(model)
    assert found.startswith(f"{model}: this is a GGUF model file, not a spec")


def test_binary_and_non_utf8_files_are_refused_with_the_offset(tmp_path: Path) -> None:
    binary = tmp_path / "blob.yaml"
    binary.write_bytes(b"name: x\n\x00\x01\x02")
    (found,) = problems(binary)
    assert "binary file (a NUL byte at offset 8)" in found

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: x\nnotes: café\n".encode("latin-1"))
    (found,) = problems(latin1)
    assert "not UTF-8 text: byte 0xe9 at offset 18 (line 2)" in found


def test_a_too_deeply_nested_document_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 50_000, encoding="utf-8")
    (found,) = problems(deep)
    assert found.startswith(str(deep))


@pytest.mark.parametrize("written", ["1e12", "1.0e12", "1E+12", "+1e12"])
def test_exponent_numbers_are_numbers_so_the_bound_is_named(tmp_path: Path, written: str) -> None:
    """YAML 1.2 reads 1e12 as a float; PyYAML's 1.1 rules read it as text, which made the error
    "not a valid integer" instead of the bound on num_requests."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"workload:\n  num_requests: {written}\n  name: v1e5\n", encoding="utf-8")
    doc = read_document(spec)
    assert doc["workload"]["num_requests"] == 1e12
    assert doc["workload"]["name"] == "v1e5"  # a word that merely contains e5 stays text
