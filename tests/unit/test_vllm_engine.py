"""The vLLM adapter: argv against the catalogue, validation, pre-flight, failure classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from servetune.core.spec import VllmEngineSpec, Workload, parse_spec
from servetune.core.study import FailureKind
from servetune.engines import get_engine
from servetune.engines.hardware import GpuFacts
from servetune.engines.vllm import VllmEngine
from servetune.engines.vllm.classify import classify_vllm_log
from servetune.engines.vllm.flags import CATALOGUE, VERSION
from servetune.errors import SpecInvalid
from servetune.specfile import validate_document
from tests.unit.gpu_engine_helpers import (
    LLAMA_8B,
    LLAMA_70B,
    QWEN2_7B,
    log,
    spec_doc,
    write_config,
)

WORKLOAD = Workload(input_tokens=512, output_tokens=128, concurrency=[8], num_requests=16)

SAMPLE: dict[str, Any] = {
    "max-num-seqs": 128,
    "max-num-batched-tokens": 8192,
    "enable-chunked-prefill": False,
    "scheduling-policy": "priority",
    "gpu-memory-utilization": 0.85,
    "block-size": 32,
    "kv-cache-dtype": "fp8",
    "enable-prefix-caching": True,
    "dtype": "bfloat16",
    "quantization": "fp8",
    "max-model-len": 8192,
    "enforce-eager": True,
    "tensor-parallel-size": 2,
    "pipeline-parallel-size": 1,
    "data-parallel-size": 2,
    "enable-expert-parallel": False,
    "max-cudagraph-capture-size": 256,
    "cudagraph-capture-sizes": "1,2,4,8",
    "speculative-config": '{"method": "ngram", "num_speculative_tokens": 4}',
    "kv-cache-memory-bytes": 8000000000,
    "seed": 7,
}


def engine(
    tmp_path: Path | None = None, cfg: dict[str, Any] | None = None, **kw: Any
) -> VllmEngine:
    model = str(write_config(tmp_path, cfg)) if tmp_path is not None and cfg else "org/model"
    spec = VllmEngineSpec(kind="vllm", model=model, **kw)
    return VllmEngine(spec, gpu_probe=lambda: GpuFacts(0, 0.0, "nvidia-smi not found"))


def test_every_catalogue_flag_is_sampled_and_names_its_vllm_version() -> None:
    assert set(SAMPLE) == set(CATALOGUE)
    for info in CATALOGUE.values():
        assert f"vLLM {VERSION}" in info.source, info.name
        assert info.source.split(f"vLLM {VERSION} ")[1].startswith("vllm/"), info.name


def test_argv_renders_every_tuned_flag_as_the_catalogue_says() -> None:
    cmd = engine().launch_command(SAMPLE, host="127.0.0.1", port=8123)
    argv = cmd.argv
    assert argv[:3] == ["vllm", "serve", "org/model"]
    assert argv[3:9] == [
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--served-model-name",
        "servetune",
    ]
    rest = argv[9:]
    seen: dict[str, list[str]] = {}
    i = 0
    while i < len(rest):
        assert rest[i].startswith("--"), rest[i]
        name = rest[i][2:]
        values = []
        i += 1
        while i < len(rest) and not rest[i].startswith("--"):
            values.append(rest[i])
            i += 1
        seen[name] = values
    for name, value in SAMPLE.items():
        info = CATALOGUE[name]
        if info.type == "bool":
            flag = name if value else f"no-{name}"
            assert seen.pop(flag) == [], name
        elif name == "cudagraph-capture-sizes":
            assert seen.pop(name) == ["1", "2", "4", "8"]
        else:
            assert seen.pop(name) == [str(value)], name
            if info.choices:
                assert value in info.choices
    assert seen == {}


def test_false_bool_is_the_no_form_and_fixed_flags_come_first() -> None:
    e = engine(flags={"max-model-len": 4096, "tp": 2})
    argv = e.launch_command({"enable-prefix-caching": False}, host="h", port=1).argv
    assert argv[-5:] == [
        "--max-model-len",
        "4096",
        "--tensor-parallel-size",
        "2",
        "--no-enable-prefix-caching",
    ]


def test_registry_returns_the_vllm_adapter() -> None:
    assert isinstance(get_engine(VllmEngineSpec(kind="vllm", model="m")), VllmEngine)


@pytest.mark.parametrize(
    ("params", "loc", "expect"),
    [
        ({"max-num-seq": {"kind": "int", "low": 1, "high": 8}}, "space.params.max-num-seq",
         "did you mean 'max-num-seqs'"),
        ({"gpu-memory-utilisation": {"kind": "float", "low": 0.8, "high": 0.9}},
         "space.params.gpu-memory-utilisation", "did you mean 'gpu-memory-utilization'"),
        ({"kv-cache-dtype": {"kind": "choice", "values": ["fp16"]}}, "space.params.kv-cache-dtype",
         "is not allowed"),
        ({"max-num-seqs": {"kind": "float", "low": 1, "high": 8}}, "space.params.max-num-seqs",
         "takes integers"),
        ({"gpu-memory-utilization": {"kind": "float", "low": 0.5, "high": 1.2}},
         "space.params.gpu-memory-utilization", "reaches 1.2"),
        ({"enforce-eager": {"kind": "choice", "values": ["yes"]}}, "space.params.enforce-eager",
         "true or false"),
        ({"no-enable-prefix-caching": {"kind": "bool"}}, "space.params.no-enable-prefix-caching",
         "'enable-prefix-caching' with false"),
        ({"tp": {"kind": "int", "low": 1, "high": 2}}, "space.params.tp",
         "'tensor-parallel-size'"),
        ({"cuda-graph-sizes": {"kind": "choice", "values": ["1 2"]}},
         "space.params.cuda-graph-sizes", "cudagraph-capture-sizes"),
        ({"speculative-config": {"kind": "choice", "values": ["ngram"]}},
         "space.params.speculative-config", "JSON object"),
    ],
)  # fmt: skip
def test_validate_rejects_bad_flags_naming_the_field(
    params: dict[str, Any], loc: str, expect: str
) -> None:
    with pytest.raises(SpecInvalid) as e:
        validate_document(spec_doc("vllm", "org/model", params))
    msgs = {p.loc: p.message for p in e.value.problems}
    assert loc in msgs, msgs
    assert expect in msgs[loc]


def test_validate_accepts_a_good_vllm_spec_and_checks_config_json(tmp_path: Path) -> None:
    doc = spec_doc("vllm", "org/model", {"max-num-seqs": {"kind": "choice", "values": [64, 128]}})
    assert validate_document(doc).engine.kind == "vllm"
    doc["engine"]["config_json"] = str(tmp_path / "missing.json")
    with pytest.raises(SpecInvalid) as e:
        validate_document(doc)
    assert e.value.problems[0].loc == "engine.config_json"
    assert "does not exist" in e.value.problems[0].message


@pytest.mark.parametrize(
    ("name", "kind"), [("vllm-llama-8b", "vllm"), ("sglang-llama-8b", "sglang")]
)
def test_example_specs_validate_and_their_baseline_passes_preflight(name: str, kind: str) -> None:
    from servetune.specfile import load_spec

    spec, _ = load_spec(Path(__file__).parents[2] / "examples" / f"{name}.yaml")
    assert spec.engine.kind == kind
    e = get_engine(spec.engine)
    assert e.preflight({}, spec.workload) == []


# ---- pre-flight -------------------------------------------------------------------------------


def test_preflight_without_gpus_says_so() -> None:
    reasons = engine().preflight({}, WORKLOAD)
    assert len(reasons) == 1
    assert "needs NVIDIA GPUs" in reasons[0] and "nvidia-smi not found" in reasons[0]


def test_preflight_tp_must_divide_attention_heads(tmp_path: Path) -> None:
    e = engine(tmp_path, QWEN2_7B, gpus={"count": 8, "memory_gib": 80})
    reasons = e.preflight({"tensor-parallel-size": 8}, WORKLOAD)
    assert any("does not divide the model's 28 attention heads" in r for r in reasons)
    assert any("1, 2, 4, 7, 14, 28" in r for r in reasons)
    assert e.preflight({"tensor-parallel-size": 4}, WORKLOAD) == []


def test_preflight_parallel_sizes_must_fit_the_gpus(tmp_path: Path) -> None:
    e = engine(tmp_path, LLAMA_8B, gpus={"count": 4, "memory_gib": 80})
    reasons = e.preflight({"tensor-parallel-size": 2, "data-parallel-size": 4}, WORKLOAD)
    assert reasons == [
        "tensor-parallel-size 2 × pipeline-parallel-size 1 × data-parallel-size 4 = 8 GPUs but "
        "only 4 are available (engine.gpus); lower the parallel sizes"
    ]
    assert e.preflight({"tensor-parallel-size": 2, "data-parallel-size": 2}, WORKLOAD) == []


def test_preflight_weights_must_fit_the_memory_fraction(tmp_path: Path) -> None:
    e = engine(tmp_path, LLAMA_70B, gpus={"count": 2, "memory_gib": 80})
    one = e.preflight({"tensor-parallel-size": 1}, WORKLOAD)
    assert any("about 131.4 GiB per GPU" in r and "73.6 GiB" in r for r in one), one
    assert e.preflight({"tensor-parallel-size": 2}, WORKLOAD) == []
    low = e.preflight({"tensor-parallel-size": 2, "gpu-memory-utilization": 0.7}, WORKLOAD)
    assert any("gpu-memory-utilization 0.7" in r for r in low)
    fp8 = e.preflight({"tensor-parallel-size": 1, "quantization": "fp8"}, WORKLOAD)
    assert fp8 == []


def test_preflight_batched_tokens_below_model_len_needs_chunked_prefill(tmp_path: Path) -> None:
    e = engine(tmp_path, LLAMA_8B, gpus={"count": 1, "memory_gib": 80})
    bad = {"max-num-batched-tokens": 2048, "max-model-len": 8192, "enable-chunked-prefill": False}
    assert any(
        "max-num-batched-tokens 2048 < max-model-len 8192" in r for r in e.preflight(bad, WORKLOAD)
    )
    assert e.preflight({**bad, "enable-chunked-prefill": True}, WORKLOAD) == []


def test_preflight_dtype_quantization_and_context(tmp_path: Path) -> None:
    e = engine(tmp_path, LLAMA_8B, gpus={"count": 1, "memory_gib": 80})
    r = e.preflight({"quantization": "awq", "dtype": "float32"}, WORKLOAD)
    assert any("dtype float32 with quantization awq" in x for x in r)
    r = e.preflight({"kv-cache-dtype": "float16"}, WORKLOAD)
    assert any("model served in bfloat16" in x for x in r)
    r = e.preflight({"max-model-len": 512}, WORKLOAD)
    assert any("max-model-len 512 < input_tokens + output_tokens = 640" in x for x in r)


# ---- classifier ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "rc", "kind", "directions", "evidence"),
    [
        ("vllm_no_cache_memory.log", 1, FailureKind.KV_CACHE_TOO_SMALL,
         [("gpu-memory-utilization", "increase")], "ValueError: No available memory"),
        ("vllm_kv_too_small_for_len.log", 1, FailureKind.KV_CACHE_TOO_SMALL,
         [("gpu-memory-utilization", "increase"), ("max-model-len", "decrease")],
         "ValueError: To serve at least one request"),
        ("vllm_batched_tokens.log", 1, FailureKind.INVALID_ARGS,
         [("max-num-batched-tokens", "increase"), ("max-model-len", "decrease")],
         "max_num_batched_tokens (2048) is smaller than max_model_len (8192)"),
        ("vllm_tp_heads.log", 1, FailureKind.INVALID_ARGS, [],
         "Total number of attention heads (52)"),
        ("vllm_port_in_use.log", 1, FailureKind.PORT_IN_USE, [], "address already in use"),
        ("vllm_ready_then_quiet.log", None, FailureKind.STARTUP_TIMEOUT, [],
         "opened its port and said it was ready but never answered a generation"),
        ("vllm_died_after_ready.log", 1, FailureKind.ENGINE_CRASHED, [],
         "vLLM died after it was ready (exit status 1): EngineDeadError"),
    ],
)  # fmt: skip
def test_classifier_fixtures(
    fixture: str,
    rc: int | None,
    kind: FailureKind,
    directions: list[tuple[str, str]],
    evidence: str,
) -> None:
    c = classify_vllm_log(log(fixture), rc)
    assert c.kind is kind, c.reason
    assert [(d.flag, d.change) for d in c.directions] == directions
    assert evidence in c.reason
    assert "(EngineCore_DP0" not in c.reason and "ERROR 10-25" not in c.reason


def test_stored_reason_gives_back_its_directions() -> None:
    e = engine()
    kind, reason = e.classify_failure(log("vllm_no_cache_memory.log"), 1)
    assert [d.flag for d in e.failure_directions(kind, reason)] == ["gpu-memory-utilization"]
    assert e.failure_directions(FailureKind.CUDA_OOM, reason) == ()


def test_spec_union_picks_vllm_by_kind() -> None:
    doc = spec_doc("vllm", "org/model", {"max-num-seqs": {"kind": "int", "low": 8, "high": 64}})
    assert isinstance(parse_spec(doc).engine, VllmEngineSpec)


def test_dry_run_prints_baseline_first_with_verdicts_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from servetune.cli import app

    folder = write_config(tmp_path, QWEN2_7B)
    doc = spec_doc(
        "vllm",
        str(folder),
        {"tensor-parallel-size": {"kind": "choice", "values": [4, 8]}},
        gpus={"count": 8, "memory_gib": 80},
    )
    doc["strategy"] = {"kind": "grid"}
    doc.setdefault("budget", {})["baseline_repeats"] = 1  # no early repeat: trial 1 is searched
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(__import__("json").dumps(doc))
    monkeypatch.setenv("SERVETUNE_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(app, ["run", str(spec_file), "--dry-run", "--count", "3"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.index("trial 0 (baseline)") < out.index("trial 1 (search)") < out.index("trial 2")
    assert f"vllm serve {folder} --host 127.0.0.1 --port 8000" in out
    assert "--tensor-parallel-size 8" in out
    assert "pre-flight: rejected: tensor-parallel-size 8 does not divide" in out
    assert out.count("pre-flight: ok") == 2
    assert not (tmp_path / "data").exists()


def test_warning_lines_prove_nothing_and_a_bare_prefix_line_is_harmless() -> None:
    text = (
        "WARNING 11-29 10:00:00 [worker.py:1] CUDA out of memory while probing; retrying\n"
        "(EngineCore_DP0 pid=7) ERROR 11-29 10:00:01 [core.py:9] \n"
        "ERROR 11-29 10:00:02 [core.py:9] RuntimeError: NCCL error: unhandled system error\n"
    )
    c = classify_vllm_log(text, 1)
    assert c.kind is FailureKind.ENGINE_CRASHED
    assert c.reason == "exited with status 1: RuntimeError: NCCL error: unhandled system error"


def test_max_model_len_above_the_models_is_rejected_before_and_classified_after(
    tmp_path: Path,
) -> None:
    short = {**LLAMA_8B, "max_position_embeddings": 4096}
    e = engine(tmp_path, short, gpus={"count": 1, "memory_gib": 80})
    r = e.preflight({"max-model-len": 8192}, WORKLOAD)
    assert any("max-model-len 8192 > the model's max_position_embeddings 4096" in x for x in r)
    allowed = engine(
        tmp_path,
        short,
        gpus={"count": 1, "memory_gib": 80},
        env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
    )
    assert allowed.preflight({"max-model-len": 8192}, WORKLOAD) == []
    c = classify_vllm_log(
        "ValueError: User-specified max_model_len (8192) is greater than the derived "
        "max_model_len (max_position_embeddings=4096 or model_max_length=None in model's "
        "config.json).",
        1,
    )
    assert c.kind is FailureKind.INVALID_ARGS
    assert [(d.flag, d.change) for d in c.directions] == [("max-model-len", "decrease")]


def test_checkpoint_files_give_the_weight_size(tmp_path: Path) -> None:
    folder = write_config(tmp_path, LLAMA_70B)
    (folder / "model-00001.safetensors").write_bytes(b"\0" * 1024)
    e = engine(gpus={"count": 1, "memory_gib": 80}, config_json=str(folder))
    assert e.preflight({}, WORKLOAD) == []  # 1 KiB of checkpoint, not the 131 GiB estimate


def test_run_on_a_host_without_gpus_fails_clearly_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from servetune.cli import app

    spec_file = tmp_path / "spec.json"
    doc = spec_doc("vllm", "org/model", {"max-num-seqs": {"kind": "choice", "values": [8, 16]}})
    spec_file.write_text(__import__("json").dumps(doc))
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no nvidia-smi
    monkeypatch.setenv("SERVETUNE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SERVETUNE_DB_URL", f"sqlite:///{tmp_path / 'studies.db'}")
    result = CliRunner().invoke(app, ["run", str(spec_file)])
    assert result.exit_code == 1, result.output
    assert "vLLM needs NVIDIA GPUs and this host has none" in result.output
    assert "nvidia-smi not found on PATH" in result.output
    assert not (tmp_path / "studies.db").exists()


def test_displayed_command_hides_the_hf_token() -> None:
    e = engine(env={"HF_TOKEN": "hf_secret123", "CUDA_VISIBLE_DEVICES": "0,1"})
    cmd = e.launch_command({}, host="127.0.0.1", port=8000)
    assert cmd.env["HF_TOKEN"] == "hf_secret123"  # the process still gets it
    shown = cmd.display()
    assert "hf_secret123" not in shown
    assert shown.startswith("CUDA_VISIBLE_DEVICES=0,1 HF_TOKEN='***' vllm serve org/model")
