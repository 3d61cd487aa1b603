"""The SGLang adapter: argv against the catalogue, versions, pre-flight, failure classifier, and
the opposite-direction case that ends the probing of mem-fraction-static."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from servetune.core.space import SearchSpace
from servetune.core.spec import SglangEngineSpec, Workload
from servetune.core.study import FailureKind, Trial, TrialResult, TrialState
from servetune.engines.feasibility_hook import infeasible_for
from servetune.engines.hardware import GpuFacts
from servetune.engines.sglang import SglangEngine
from servetune.engines.sglang.classify import classify_sglang_log
from servetune.engines.sglang.flags import CATALOGUE, OLD_CATALOGUE, OLD_VERSION, VERSION
from servetune.errors import SpecInvalid
from servetune.specfile import validate_document
from tests.unit.gpu_engine_helpers import LLAMA_8B, log, spec_doc, write_config

WORKLOAD = Workload(input_tokens=512, output_tokens=128, concurrency=[8], num_requests=16)

SAMPLE: dict[str, Any] = {
    "mem-fraction-static": 0.85,
    "max-running-requests": 64,
    "chunked-prefill-size": 4096,
    "max-prefill-tokens": 8192,
    "schedule-policy": "lpm",
    "schedule-conservativeness": 0.5,
    "enable-mixed-chunk": True,
    "max-total-tokens": 100000,
    "page-size": 16,
    "tp-size": 2,
    "pp-size": 1,
    "dp-size": 1,
    "ep-size": 2,
    "enable-dp-attention": False,
    "attn-dp-size": 2,
    "disable-radix-cache": True,
    "kv-cache-dtype": "fp8_e5m2",
    "quantization": "fp8",
    "dtype": "bfloat16",
    "context-length": 8192,
    "attention-backend": "flashinfer",
    "enable-torch-compile": False,
    "cuda-graph-max-bs-decode": 128,
    "cuda-graph-max-bs-prefill": 16,
}


def engine(tmp_path: Path | None = None, **kw: Any) -> SglangEngine:
    model = str(write_config(tmp_path, LLAMA_8B)) if tmp_path is not None else "org/model"
    spec = SglangEngineSpec(kind="sglang", model=model, **kw)
    return SglangEngine(spec, gpu_probe=lambda: GpuFacts(0, 0.0, "nvidia-smi not found"))


def test_catalogue_entries_name_their_sglang_version() -> None:
    assert set(SAMPLE) == set(CATALOGUE)
    for info in CATALOGUE.values():
        assert info.source.startswith(f"SGLang {VERSION} sglang/srt/"), info.name
    assert OLD_CATALOGUE["cuda-graph-max-bs"].source.startswith(f"SGLang {OLD_VERSION} ")


def test_argv_renders_every_tuned_flag_as_the_catalogue_says() -> None:
    argv = engine().launch_command(SAMPLE, host="127.0.0.1", port=30000).argv
    assert argv[:5] == ["python3", "-m", "sglang.launch_server", "--model-path", "org/model"]
    rest = argv[11:]
    for name, value in SAMPLE.items():
        info = CATALOGUE[name]
        if info.type == "bool":
            assert (f"--{name}" in rest) is value, name
        else:
            i = rest.index(f"--{name}")
            assert rest[i + 1] == str(value), name
            if info.choices:
                assert value in info.choices
    flags = [x[2:] for x in rest if x.startswith("--")]
    assert set(flags) <= set(CATALOGUE)


def test_old_release_uses_cuda_graph_max_bs_and_rejects_the_new_name() -> None:
    doc = spec_doc(
        "sglang", "org/model", {"cuda-graph-max-bs": {"kind": "int", "low": 8, "high": 64}}
    )
    with pytest.raises(SpecInvalid) as e:
        validate_document(doc)
    assert "cuda-graph-max-bs-decode" in e.value.problems[0].message
    doc["engine"]["version"] = OLD_VERSION
    assert validate_document(doc).engine.kind == "sglang"
    doc["space"]["params"] = {"kv-cache-dtype": {"kind": "choice", "values": ["bf16"]}}
    with pytest.raises(SpecInvalid) as e:
        validate_document(doc)
    assert "not allowed" in e.value.problems[0].message


def test_validate_did_you_mean() -> None:
    doc = spec_doc(
        "sglang", "org/model", {"mem-fraction-statc": {"kind": "float", "low": 0.7, "high": 0.9}}
    )
    with pytest.raises(SpecInvalid) as e:
        validate_document(doc)
    assert "did you mean 'mem-fraction-static'" in e.value.problems[0].message


def test_preflight_heads_gpus_ep_and_memory(tmp_path: Path) -> None:
    e = engine(tmp_path, gpus={"count": 4, "memory_gib": 24})
    assert any(
        "does not divide the model's 32 attention heads" in r
        for r in e.preflight({"tp-size": 3}, WORKLOAD)
    )
    assert any(
        "8 GPUs but only 4" in r for r in e.preflight({"tp-size": 4, "dp-size": 2}, WORKLOAD)
    )
    assert e.preflight({"tp-size": 4, "dp-size": 2, "enable-dp-attention": True}, WORKLOAD) == []
    assert any(
        "ep-size 3 does not divide tp-size 4" in r
        for r in e.preflight({"tp-size": 4, "ep-size": 3}, WORKLOAD)
    )
    tight = e.preflight({"tp-size": 1, "mem-fraction-static": 0.5}, WORKLOAD)
    assert any("about 15.0 GiB per GPU" in r and "12.0 GiB" in r for r in tight), tight
    assert e.preflight({"tp-size": 1, "mem-fraction-static": 0.8}, WORKLOAD) == []


def test_preflight_without_gpus_says_so() -> None:
    assert "needs NVIDIA GPUs" in engine().preflight({}, WORKLOAD)[0]


@pytest.mark.parametrize(
    ("fixture", "rc", "kind", "directions", "evidence"),
    [
        ("sglang_not_enough_memory.log", 1, FailureKind.KV_CACHE_TOO_SMALL,
         [("mem-fraction-static", "increase")],
         "RuntimeError: Not enough memory. Please try to increase --mem-fraction-static."),
        ("sglang_graph_oom.log", 1, FailureKind.CUDA_OOM,
         [("mem-fraction-static", "decrease"), ("cuda-graph-max-bs-decode", "decrease")],
         "Capture cuda graph failed: CUDA out of memory"),
        ("sglang_port_in_use.log", 1, FailureKind.PORT_IN_USE, [], "address already in use"),
        ("sglang_tp_heads.log", 1, FailureKind.INVALID_ARGS, [], "total_num_heads % tp_size"),
        ("sglang_ready_then_quiet.log", None, FailureKind.STARTUP_TIMEOUT, [],
         "never answered a generation"),
        # a bare SIGKILL is no evidence of out-of-memory (issue 6): a crash, retried once
        ("sglang_ready_then_quiet.log", -9, FailureKind.ENGINE_CRASHED, [], "SIGKILL"),
    ],
)  # fmt: skip
def test_classifier_fixtures(
    fixture: str,
    rc: int | None,
    kind: FailureKind,
    directions: list[tuple[str, str]],
    evidence: str,
) -> None:
    c = classify_sglang_log(log(fixture), rc)
    assert c.kind is kind, c.reason
    assert [(d.flag, d.change) for d in c.directions] == directions
    assert evidence in c.reason
    assert "[2025-" not in c.reason


def test_a_sigkill_is_host_oom_only_with_the_kernels_record() -> None:
    record = "servetune: out-of-memory evidence: Killed process 4242 (python3) total-vm:1kB"
    c = classify_sglang_log(log("sglang_ready_then_quiet.log").rstrip("\n") + "\n" + record, -9)
    assert c.kind is FailureKind.HOST_OOM and "Killed process 4242" in c.reason


def test_old_release_names_its_graph_flag_in_the_direction() -> None:
    e = engine(version=OLD_VERSION)
    c = e.classify(log("sglang_graph_oom.log"), 1)
    assert c.directions[1].flag == "cuda-graph-max-bs"


def _failed(number: int, mfs: float, fixture: str, e: SglangEngine) -> Trial:
    kind, reason = e.classify_failure(log(fixture), 1)
    return Trial(
        number=number,
        params={"mem-fraction-static": mfs},
        state=TrialState.FAIL,
        result=TrialResult(state=TrialState.FAIL, failure_kind=kind, failure_reason=reason),
    )


def test_opposite_directions_on_neighbours_end_the_probing_of_the_flag() -> None:
    """sglang issue #4330: 0.85 runs out of memory, 0.84 has 'Not enough memory'."""
    e = engine()
    space = SearchSpace.model_validate(
        {"params": {"mem-fraction-static": {"kind": "choice", "values": [0.8, 0.84, 0.85, 0.9]}}}
    )
    trials = [
        _failed(1, 0.85, "sglang_graph_oom.log", e),
        _failed(2, 0.84, "sglang_not_enough_memory.log", e),
    ]
    for v in (0.8, 0.84, 0.85, 0.9):
        region = infeasible_for(trials, e, space, {"mem-fraction-static": v})
        assert region is not None and region.closed
        assert "no value of mem-fraction-static works" in region.message
        assert "0.84 needed more (kv_cache_too_small, trial 2)" in region.message
    assert infeasible_for(trials[:1], e, space, {"mem-fraction-static": 0.8}) is None
    other = {"mem-fraction-static": 0.8, "cuda-graph-max-bs-decode": 16}
    assert infeasible_for(trials, e, space, other) is None


def test_a_gap_between_opposite_failures_stays_open_on_a_continuous_flag() -> None:
    e = engine()
    space = SearchSpace.model_validate(
        {"params": {"mem-fraction-static": {"kind": "float", "low": 0.6, "high": 0.95}}}
    )
    trials = [
        _failed(1, 0.9, "sglang_graph_oom.log", e),
        _failed(2, 0.7, "sglang_not_enough_memory.log", e),
    ]
    assert infeasible_for(trials, e, space, {"mem-fraction-static": 0.8}) is None
    region = infeasible_for(trials, e, space, {"mem-fraction-static": 0.65})
    assert region is not None and not region.closed
    assert "only 0.7 < mem-fraction-static < 0.9 may still work" in region.message
    assert infeasible_for(trials, e, space, {"mem-fraction-static": 0.92}) is not None


QWEN3_30B_A3B = {
    "hidden_size": 2048,
    "head_dim": 128,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_attention_heads": 32,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "max_position_embeddings": 40960,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}
"""Qwen/Qwen3-30B-A3B's config.json sizes (30.5 B parameters: experts of moe_intermediate_size)."""


def test_moe_weights_use_the_expert_size(tmp_path: Path) -> None:
    folder = write_config(tmp_path, QWEN3_30B_A3B)
    e = SglangEngine(
        SglangEngineSpec(kind="sglang", model=str(folder), gpus={"count": 2, "memory_gib": 48})
    )
    one = e.preflight({"tp-size": 1, "mem-fraction-static": 0.9}, WORKLOAD)
    assert any("about 56.8 GiB per GPU" in r for r in one), one
    assert e.preflight({"tp-size": 2, "mem-fraction-static": 0.9}, WORKLOAD) == []


def test_context_length_above_the_model_is_rejected_and_classified(tmp_path: Path) -> None:
    e = engine(tmp_path, gpus={"count": 1, "memory_gib": 80})
    r = e.preflight({"context-length": 200000}, WORKLOAD)
    assert any("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1" in x for x in r)
    c = classify_sglang_log(
        "ValueError: Warning: User-specified context_length (200000) is greater than the derived "
        "context_length (131072). This may lead to incorrect model outputs or CUDA errors. To "
        "allow overriding this maximum, set the env var SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1",
        1,
    )
    assert c.kind is FailureKind.INVALID_ARGS
    assert c.direction is not None and (c.direction.flag, c.direction.change) == (
        "context-length",
        "decrease",
    )
