"""Unit tests of the llama.cpp adapter: argv for both launch paths, catalogue defaults, preflight,
spec checks, and the failure classifier on real start-up logs (no sockets, no subprocesses)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from servetune.core.space import SearchSpace
from servetune.core.spec import LlamaCppEngineSpec, StudySpec, Workload
from servetune.core.study import FailureKind, Params
from servetune.deploy.local import OOM_EVIDENCE_PREFIX
from servetune.engines import get_engine
from servetune.engines.llamacpp import LlamaCppEngine
from servetune.engines.llamacpp.classify import error_lines
from servetune.engines.llamacpp.flags import (
    CATALOGUE,
    LLAMA_SERVER_FLAGS,
    LLAMA_SERVER_FLAGS_SOURCE,
)
from servetune.engines.llamacpp.gguf_info import gguf_size_problem
from servetune.engines.llamacpp.launch import SERVER_MODULE, render_flag
from servetune.engines.llamacpp.preflight import SlotLayout, slot_layout
from servetune.engines.xllamacpp_server import build_parser, to_common_params, validate
from servetune.errors import EngineNotFound
from servetune.modelgen import ModelFiles

LOGS = Path(__file__).parent / "data" / "llamacpp_logs"
WHEEL = [sys.executable, "-m", SERVER_MODULE]


def no_binaries(name: str) -> str | None:
    return None


def engine(model: str = "/models/m.gguf", **kw: Any) -> LlamaCppEngine:
    which = kw.pop("which", no_binaries)
    return LlamaCppEngine(LlamaCppEngineSpec(kind="llamacpp", model=model, **kw), which=which)


def workload(input_tokens: int = 128, output_tokens: int = 64) -> Workload:
    return Workload(
        input_tokens=input_tokens, output_tokens=output_tokens, concurrency=[1], num_requests=4
    )


# ---- launch_command --------------------------------------------------------------------------


def test_wheel_argv_has_server_flags_then_fixed_flags_then_sorted_params() -> None:
    eng = engine(
        binary="xllamacpp", flags={"threads": 2, "warmup": False}, served_model_name="tiny"
    )
    cmd = eng.launch_command(
        {"parallel": 4, "cont-batching": False, "flash-attn": "on", "ctx-size": 4096},
        host="127.0.0.1",
        port=8123,
    )
    assert cmd.argv == [
        *WHEEL,
        "--model", "/models/m.gguf", "--host", "127.0.0.1", "--port", "8123", "--alias", "tiny",
        "--threads", "2", "--no-warmup",
        "--no-cont-batching", "--ctx-size", "4096",
        "--flash-attn", "on", "--parallel", "4",
    ]  # fmt: skip
    assert (cmd.host, cmd.port, cmd.env) == ("127.0.0.1", 8123, {})


def test_llama_server_on_path_is_used_with_the_same_flags() -> None:
    def which(name: str) -> str | None:
        return "/opt/llama/bin/llama-server" if name == "llama-server" else None

    params: Params = {"batch-size": 256, "ubatch-size": 128, "kv-unified": True, "mlock": True}
    binary = engine(which=which).launch_command(params, host="0.0.0.0", port=9000)
    wheel = engine(binary="xllamacpp", which=which).launch_command(
        params, host="0.0.0.0", port=9000
    )
    assert binary.argv[0] == "/opt/llama/bin/llama-server"
    assert binary.argv[1:] == wheel.argv[len(WHEEL) :]
    assert wheel.argv[: len(WHEEL)] == WHEEL


def test_without_llama_server_the_wheel_is_used() -> None:
    assert engine().launch_command({}, host="h", port=1).argv[: len(WHEEL)] == WHEEL


def test_binary_given_as_a_path_is_used(tmp_path: Path) -> None:
    exe = tmp_path / "llama-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert engine(binary=str(exe)).launch_command({}, host="h", port=1).argv[0] == str(exe)
    exe.chmod(0o644)
    with pytest.raises(EngineNotFound, match="not executable"):
        engine(binary=str(exe)).launch_command({}, host="h", port=1)


def test_missing_named_binary_raises_engine_not_found_with_the_fix() -> None:
    with pytest.raises(EngineNotFound, match=r"engine\.binary: xllamacpp"):
        engine(binary="/nowhere/llama-server").launch_command({}, host="h", port=1)


def test_bool_and_value_rendering() -> None:
    assert render_flag("flash-attn", True) == ["--flash-attn", "on"]
    assert render_flag("flash-attn", False) == ["--flash-attn", "off"]
    assert render_flag("mlock", False) == []
    assert render_flag("mmap", False) == ["--no-mmap"]
    assert render_flag("mmap", True) == []
    assert render_flag("kv-unified", False) == ["--no-kv-unified"]
    assert render_flag("ctx-size", 2048.0) == ["--ctx-size", "2048"]
    assert render_flag("n-gpu-layers", "all") == ["--n-gpu-layers", "all"]


def test_every_catalogue_flag_is_accepted_by_the_wheel_parser_and_reaches_common_params() -> None:
    """What launch_command writes, the xllamacpp stand-in parses and maps onto CommonParams."""
    import xllamacpp as x

    params: Params = {
        "threads": 3, "threads-batch": 5, "threads-http": 7, "parallel": 6, "batch-size": 1024,
        "ubatch-size": 256, "ctx-size": 3072, "flash-attn": "off", "cache-type-k": "q8_0",
        "cache-type-v": "q4_0", "cont-batching": False, "n-gpu-layers": "all", "load-mode": "none",
        "cache-reuse": 16, "cache-prompt": False, "cache-ram": 64, "warmup": False,
        "kv-unified": True, "kv-offload": False, "fit": "off", "metrics": True,
    }  # fmt: skip
    assert set(params) | {"mlock", "mmap"} == set(CATALOGUE)
    argv = engine(binary="xllamacpp").launch_command(params, host="127.0.0.1", port=1).argv
    p = to_common_params(build_parser().parse_args(argv[len(WHEEL) :]))
    assert (p.cpuparams.n_threads, p.cpuparams_batch.n_threads, p.n_threads_http) == (3, 5, 7)
    assert (p.n_parallel, p.n_batch, p.n_ubatch, p.n_ctx) == (6, 1024, 256, 3072)
    assert p.flash_attn_type == x.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    assert p.cache_type_k == x.ggml_type.GGML_TYPE_Q8_0
    assert p.cache_type_v == x.ggml_type.GGML_TYPE_Q4_0
    assert (p.cont_batching, p.cache_prompt, p.warmup, p.kv_unified) == (False, False, False, True)
    assert (p.n_gpu_layers, p.n_cache_reuse, p.cache_ram_mib) == (-2, 16, 64)
    assert p.load_mode == x.llama_load_mode.LLAMA_LOAD_MODE_NONE
    assert (p.no_kv_offload, p.fit_params, p.endpoint_metrics) == (True, False, True)
    assert p.model_alias == {"servetune"} and p.port == 1 and p.hostnames == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("flags", "mode"),
    [(["--mlock"], "MMAP_MLOCK"), (["--no-mmap"], "NONE"), (["--mlock", "--no-mmap"], "MLOCK"),
     (["-lm", "dio"], "DIRECT_IO")],
)  # fmt: skip
def test_older_mlock_and_mmap_flags_map_to_load_mode(flags: list[str], mode: str) -> None:
    import xllamacpp as x

    p = to_common_params(build_parser().parse_args(["-m", "m.gguf", *flags]))
    assert p.load_mode == getattr(x.llama_load_mode, f"LLAMA_LOAD_MODE_{mode}")


@pytest.mark.parametrize(
    "argv",
    [["--cache-type-k", "q9"], ["--paralel", "2"], ["-fa", "maybe"], ["-np", "0"],
     ["--batch-size", "0"], ["--ctx-size", "x"]],
)  # fmt: skip
def test_wheel_parser_rejects_bad_flags_with_status_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    ap = build_parser()
    with pytest.raises(SystemExit) as exc:
        validate(ap, ap.parse_args(["-m", "m.gguf", *argv]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    kind, _ = engine().classify_failure(err, 2)
    assert kind is FailureKind.INVALID_ARGS


def test_short_forms_and_flash_attn_switch_parse_like_llama_server() -> None:
    a = build_parser().parse_args(
        ["-m", "m", "-np", "3", "-c", "99", "-ub", "8", "-b", "16", "-fa"]
    )
    assert (a.parallel, a.ctx_size, a.ubatch_size, a.batch_size, a.flash_attn) == (
        3,
        99,
        8,
        16,
        "on",
    )
    assert build_parser().parse_args(["-m", "m"]).parallel == -1


# ---- catalogue --------------------------------------------------------------------------------


def test_catalogue_defaults_match_llama_cpp_common_params() -> None:
    """The documented defaults are the ones the engine itself starts from (common/common.h)."""
    import xllamacpp as x

    p = x.CommonParams()
    d = {name: info.default for name, info in CATALOGUE.items()}
    assert d["batch-size"] == p.n_batch == 2048
    assert d["ubatch-size"] == p.n_ubatch == 512
    assert d["ctx-size"] == p.n_ctx == 0
    assert d["threads"] == p.cpuparams.n_threads == -1
    assert d["threads-http"] == p.n_threads_http == -1
    assert d["cache-type-k"] == d["cache-type-v"] == "f16"
    assert p.cache_type_k == p.cache_type_v == x.ggml_type.GGML_TYPE_F16
    assert d["flash-attn"] == "auto"
    assert p.flash_attn_type == x.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_AUTO
    assert d["cont-batching"] is p.cont_batching is True
    assert d["cache-reuse"] == p.n_cache_reuse == 0
    assert d["cache-prompt"] is p.cache_prompt is True
    assert d["cache-ram"] == p.cache_ram_mib == 8192
    assert d["warmup"] is p.warmup is True
    assert d["kv-offload"] is (not p.no_kv_offload) is True
    assert (d["fit"] == "on") is p.fit_params is True
    assert d["metrics"] is p.endpoint_metrics is False
    assert d["parallel"] == build_parser().parse_args(["-m", "m"]).parallel == -1
    for info in CATALOGUE.values():
        assert info.meaning and info.source
        if info.choices and info.default is not None:
            assert info.default in info.choices


# ---- the command a user runs -----------------------------------------------------------------


def test_the_user_command_is_llama_server_with_the_same_flags_as_the_trial() -> None:
    eng = engine(binary="xllamacpp", flags={"threads": 8}, served_model_name="tiny")
    params: Params = {"parallel": 2, "ctx-size": 4096, "flash-attn": True}
    user = eng.user_command(params)
    trial = eng.launch_command(params, host="127.0.0.1", port=8080)
    assert user.argv[0] == "llama-server"
    assert user.argv[1:] == trial.argv[len(WHEEL) :]
    assert user.display().startswith("llama-server --model /models/m.gguf --host 127.0.0.1 ")
    # the user's own build when engine.binary names one
    own = engine(binary="/opt/llama.cpp/build/bin/llama-server").user_command({})
    assert own.argv[0] == "/opt/llama.cpp/build/bin/llama-server"


@pytest.mark.parametrize(
    ("flags", "load_mode"),
    [
        ({"mlock": True}, ["--load-mode", "mmap+mlock"]),
        ({"mlock": True, "mmap": False}, ["--load-mode", "mlock"]),
        ({"mmap": False}, ["--load-mode", "none"]),
        ({"mlock": False, "mmap": True}, []),  # llama-server's default
        ({"mlock": True, "load-mode": "dio"}, ["--load-mode", "dio"]),  # explicit wins
    ],
)
def test_older_mlock_and_mmap_are_printed_as_current_load_mode(
    flags: Params, load_mode: list[str]
) -> None:
    argv = engine(flags=flags).user_command({}).argv
    assert "--mlock" not in argv and "--no-mmap" not in argv
    tail = argv[argv.index("--alias") + 2 :]
    assert tail == load_mode


def _values(name: str) -> list[Any]:
    info = CATALOGUE[name]
    if info.type == "bool":
        return [True, False]
    if info.choices:
        return list(info.choices)
    if info.type == "int":
        return [1, -1, 4096]
    return [info.default]


def test_every_flag_the_catalogue_can_print_is_in_upstream_llama_servers_list() -> None:
    assert "llama.cpp" in LLAMA_SERVER_FLAGS_SOURCE and "00dc8057" in LLAMA_SERVER_FLAGS_SOURCE
    printed: set[str] = set()
    for name in CATALOGUE:
        for value in _values(name):
            argv = engine(flags={name: value}).user_command({name: value}).argv
            printed |= {a[2:] for a in argv if a.startswith("--")}
    missing = printed - LLAMA_SERVER_FLAGS
    assert not missing, f"servetune would print flags llama-server does not have: {missing}"
    assert {"model", "host", "port", "alias", "load-mode", "no-kv-offload"} <= printed


# ---- preflight --------------------------------------------------------------------------------


def workload_at(input_tokens: int, output_tokens: int, *concurrency: int) -> Workload:
    return Workload(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        concurrency=list(concurrency),
        num_requests=4,
    )


@pytest.mark.parametrize(
    ("ctx", "parallel", "unified", "layout"),
    [
        # (ctx-size, parallel, kv-unified) → (slots, unified, n_ctx, n_ctx_slot); each as logged by
        # the real server in tests/integration/test_llamacpp_local.py (model n_ctx_train 4096)
        (0, -1, None, (4, True, 4096, 4096)),  # the defaults: auto = 4 slots, one shared buffer
        (0, -1, False, (4, True, 4096, 4096)),  # auto forces unified on
        (0, 3, None, (3, False, 12288, 4096)),  # ctx 0, fit on, not unified: n_ctx_train per slot
        (0, 2, True, (2, True, 4096, 4096)),
        (1000, 3, None, (3, False, 1536, 512)),  # pad(1000) = 1024; 1024 / 3 → pad → 512
        (100, 1, None, (1, False, 256, 256)),  # padded up to 256
        (1000, 2, True, (2, True, 1024, 1024)),
        (1024, -1, None, (4, True, 1024, 1024)),
        (8192, 1, None, (1, False, 8192, 4096)),  # a slot is capped at n_ctx_train
        (2048, 64, None, (64, False, 16384, 256)),  # 32 per slot rounds up to 256
    ],
)
def test_slot_layout_follows_llama_cpp(
    ctx: int, parallel: int, unified: bool | None, layout: tuple[int, bool, int, int]
) -> None:
    got = slot_layout(ctx, parallel, unified, 4096)
    assert got is not None
    assert (got.slots, got.kv_unified, got.n_ctx, got.n_ctx_slot) == layout


def test_with_fit_off_an_unset_context_is_split_across_slots() -> None:
    assert slot_layout(0, 3, None, 4096, fit=False) == SlotLayout(3, False, 4608, 1536)
    assert slot_layout(0, -1, None, 4096, fit=False) == SlotLayout(4, True, 4096, 4096)
    assert slot_layout(1000, 3, None, 4096, fit=False) == slot_layout(1000, 3, None, 4096)


def test_slot_layout_is_unknown_without_the_models_length_or_for_values_never_run() -> None:
    assert slot_layout(0, -1, None, None) is None
    assert slot_layout(1024, 0, None, 4096) is None
    assert slot_layout(-5, 1, None, 4096) is None
    assert slot_layout(1024, 2, None, None) == SlotLayout(2, False, 1024, 512)


def test_the_baseline_serves_1000_plus_100_tokens_at_concurrency_1_to_3(
    tiny_model: ModelFiles,
) -> None:
    """Issue 5 item 5: the defaults (4 slots over one unified 4096-token buffer) were rejected
    for 1000 + 100 tokens at concurrency 1 although llama-server serves concurrency 1–3."""
    eng = engine(str(tiny_model.gguf_path))
    assert eng.model_context_length() == 4096
    for level in (1, 2, 3):
        assert eng.preflight({}, workload_at(1000, 100, level)) == [], level
    (reason,) = eng.preflight({}, workload_at(1000, 100, 1, 4))
    assert "concurrency 4" in reason and "4 requests × 1100" in reason and "4400" in reason
    assert "serves concurrency ≤ 3" in reason and "ctx-size to ≥ 4608" in reason
    assert "ctx-size 0 (the model's 4096)" in reason and "unified" in reason
    # more levels than slots: at most 4 are in flight, so 1000 + 100 at concurrency 64 with
    # ctx-size 4400 → pad → 4608 fits
    assert eng.preflight({"ctx-size": 4400}, workload_at(1000, 100, 64)) == []


def test_without_a_unified_cache_concurrency_only_queues_but_one_request_must_fit_a_slot(
    tiny_model: ModelFiles,
) -> None:
    eng = engine(str(tiny_model.gguf_path))
    # 2 slots of pad(512 / 2) = 256 tokens each: 200 + 40 fits at any concurrency
    assert eng.preflight({"parallel": 2, "ctx-size": 512}, workload_at(200, 40, 1, 16)) == []
    (reason,) = eng.preflight({"parallel": 2, "ctx-size": 512}, workload_at(250, 40, 1))
    assert "does not fit a slot" in reason and "n_ctx_slot 256" in reason
    assert "ctx-size to ≥ 1024 or lower parallel" in reason
    # ctx-size 0 without a unified cache gives each slot the model's full length
    assert eng.preflight({"parallel": 3}, workload_at(3000, 1000, 3)) == []
    assert eng.preflight({"parallel": 8, "ctx-size": 1024}, workload_at(100, 50, 8)) == []


def test_a_request_longer_than_the_model_asks_for_a_shorter_workload(
    tiny_model: ModelFiles,
) -> None:
    eng = engine(str(tiny_model.gguf_path))
    (reason,) = eng.preflight({"ctx-size": 16384}, workload_at(4000, 200, 1))
    assert "longer than the model's context length 4096" in reason
    assert "workload.input_tokens" in reason and "raise ctx-size" not in reason


def test_params_the_engine_runs_identically_have_one_effective_form(
    tiny_model: ModelFiles,
) -> None:
    eng = engine(str(tiny_model.gguf_path))
    w = workload_at(100, 20, 1)
    same = [
        {},
        {"parallel": -1},
        {"parallel": 4, "kv-unified": True},
        {"parallel": 4, "kv-unified": True, "ctx-size": 4096},
        {"ctx-size": 4000},  # pads to 4096
        {"parallel": -1, "kv-unified": False},  # auto forces unified
    ]
    forms = [eng.effective_params(p, w) for p in same]
    assert all(f == forms[0] for f in forms), forms
    assert forms[0]["parallel"] == 4 and forms[0]["kv-unified"] is True
    assert forms[0]["ctx-size"] == 4096
    # rounded to the same split: 1000 and 1536 over 3 slots are both 3 × 512
    assert eng.effective_params({"parallel": 3, "ctx-size": 1000}, w) == eng.effective_params(
        {"parallel": 3, "ctx-size": 1536}, w
    )
    # a ubatch above the batch is clamped to it; flash-attn true is "on"
    assert eng.effective_params({"batch-size": 256, "ubatch-size": 512}, w) == eng.effective_params(
        {"batch-size": 256, "ubatch-size": 256}, w
    )
    assert eng.effective_params({"flash-attn": True}, w) == eng.effective_params(
        {"flash-attn": "on"}, w
    )
    # different configurations stay different
    assert eng.effective_params({"parallel": 4}, w) != forms[0]  # 4 slots without unified KV
    assert eng.effective_params({"ctx-size": 4097}, w) != forms[0]  # pads to 4352


def test_preflight_uses_fixed_flags_and_checks_batches_threads_and_cache_types() -> None:
    eng = engine(flags={"batch-size": 256})
    reasons = eng.preflight(
        {"ubatch-size": 512, "threads": 0, "cache-type-v": "q8_0", "flash-attn": "off"}, workload()
    )
    text = "\n".join(reasons)
    # ubatch-size above batch-size is clamped by llama.cpp, not an impossible candidate
    assert "ubatch-size" not in text
    assert "threads = 0" in text
    assert "quantized V cache" in text
    assert len(reasons) == 2
    assert (
        eng.preflight({"threads": -1, "ubatch-size": 256, "cache-type-v": "q8_0"}, workload()) == []
    )


def test_preflight_skips_the_context_check_when_the_model_is_unreadable() -> None:
    assert engine("/missing.gguf").preflight({}, workload(4000, 4000)) == []


# ---- check_spec -------------------------------------------------------------------------------


def study(tmp: ModelFiles | None, params: dict[str, Any], **engine_kw: Any) -> StudySpec:
    doc: dict[str, Any] = {
        "engine": {"kind": "llamacpp", "model": str(tmp.gguf_path) if tmp else "/missing.gguf",
                   "binary": "xllamacpp", **engine_kw},
        "space": {"params": params},
        "workload": {"concurrency": [1], "num_requests": 4},
        "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
    }  # fmt: skip
    return StudySpec.model_validate(doc)


def problems(spec: StudySpec) -> dict[str, str]:
    return {p.loc: p.message for p in get_engine(spec.engine).check_spec(spec)}


def test_check_spec_accepts_a_good_spec(tiny_model: ModelFiles) -> None:
    spec = study(
        tiny_model,
        {"parallel": {"kind": "int", "low": 1, "high": 4},
         "cache-type-k": {"kind": "choice", "values": ["f16", "q8_0"]},
         "flash-attn": {"kind": "bool"}, "cont-batching": {"kind": "bool"},
         "n-gpu-layers": {"kind": "choice", "values": [0, "all"]}},
        tokenizer=str(tiny_model.tokenizer_dir), flags={"threads": 2, "fit": "off"},
    )  # fmt: skip
    assert problems(spec) == {}


def test_check_spec_names_unknown_and_misspelt_flags(tiny_model: ModelFiles) -> None:
    spec = study(
        tiny_model,
        {"paralel": {"kind": "int", "low": 1, "high": 4},
         "np": {"kind": "int", "low": 1, "high": 2}, "no-mmap": {"kind": "bool"},
         "port": {"kind": "int", "low": 1, "high": 2}, "zzz": {"kind": "bool"}},
        flags={"ctx_size": 4096},
    )  # fmt: skip
    found = problems(spec)
    assert "did you mean 'parallel'" in found["space.params.paralel"]
    assert "'parallel' instead of 'np'" in found["space.params.np"]
    assert "'mmap' with false" in found["space.params.no-mmap"]
    assert "servetune sets --port itself" in found["space.params.port"]
    assert "known flags:" in found["space.params.zzz"]
    assert "did you mean 'ctx-size'" in found["engine.flags.ctx_size"]


def test_check_spec_names_values_of_the_wrong_type(tiny_model: ModelFiles) -> None:
    spec = study(
        tiny_model,
        {"ctx-size": {"kind": "float", "low": 1, "high": 2},
         "cache-type-k": {"kind": "choice", "values": ["f16", "q9"]},
         "batch-size": {"kind": "bool"}, "parallel": {"kind": "choice", "values": [1, "two"]}},
        flags={"warmup": "no"},
    )  # fmt: skip
    found = problems(spec)
    assert "kind: int" in found["space.params.ctx-size"]
    assert "'q9'" in found["space.params.cache-type-k"]
    assert "bool param" in found["space.params.batch-size"]
    assert "'two'" in found["space.params.parallel"]
    assert "true or false" in found["engine.flags.warmup"]


def test_check_spec_reports_a_missing_model_and_tokenizer_with_the_fix() -> None:
    spec = study(None, {"parallel": {"kind": "int", "low": 1, "high": 2}}, tokenizer="/no/tok")
    found = problems(spec)
    assert "servetune make-model --size tiny --out DIR" in found["engine.model"]
    assert "tokenizer.json" in found["engine.tokenizer"]


def test_check_spec_reports_a_missing_binary(tiny_model: ModelFiles) -> None:
    spec = study(tiny_model, {"parallel": {"kind": "bool"}}, binary="/no/llama-server")
    found = problems(spec)
    assert "not found" in found["engine.binary"]
    assert "bool param" in found["space.params.parallel"]


def space(params: dict[str, Any]) -> SearchSpace:
    return SearchSpace.model_validate({"params": params})


def space_problems(params: dict[str, Any]) -> dict[str, str]:
    return {p.loc: p.message for p in engine().check_space(space(params))}


def test_check_space_reports_flag_problems_without_the_rest_of_the_spec() -> None:
    """The space alone is checked: no model, tokenizer or binary problem leaks in."""
    found = space_problems(
        {"paralel": {"kind": "int", "low": 1, "high": 4}, "ctx-size": {"kind": "bool"},
         "parallel": {"kind": "int", "low": 1, "high": 4}}
    )  # fmt: skip
    assert set(found) == {"space.params.paralel", "space.params.ctx-size"}
    assert "did you mean 'parallel'" in found["space.params.paralel"]


def test_check_spec_is_check_space_plus_check_engine(tiny_model: ModelFiles) -> None:
    spec = study(
        None,
        {"paralel": {"kind": "int", "low": 1, "high": 4}, "warmup": {"kind": "int", "low": 0,
         "high": 1}}, tokenizer=str(tiny_model.gguf_path.parent / "absent"),
    )  # fmt: skip
    eng = get_engine(spec.engine)
    assert eng.check_spec(spec) == eng.check_space(spec.space) + eng.check_engine()
    assert {p.loc for p in eng.check_spec(spec)} == {
        "space.params.paralel", "space.params.warmup", "engine.model", "engine.tokenizer",
    }  # fmt: skip


def study_for(
    files: ModelFiles, workload: dict[str, Any], params: dict[str, Any] | None = None, **kw: Any
) -> StudySpec:
    space = params or {"threads": {"kind": "choice", "values": [1, 2]}}
    doc = study(files, space).model_dump(mode="json", exclude_none=True)
    doc["engine"].update(kw)
    doc["workload"] = {"concurrency": [1], "num_requests": 4, **workload}
    return StudySpec.model_validate(doc)


def test_check_spec_refuses_a_fixed_ctx_size_smaller_than_one_request(
    tiny_model: ModelFiles,
) -> None:
    """Issue 6 item 6: a fixed ctx-size smaller than one request passed validate."""
    spec = study_for(
        tiny_model, {"input_tokens": 1000, "output_tokens": 100}, flags={"ctx-size": 512}
    )
    found = problems(spec)
    assert set(found) == {"engine.flags.ctx-size"}, found
    msg = found["engine.flags.ctx-size"]
    assert "the baseline" in msg and "does not fit a slot" in msg and "1100" in msg
    assert "raise ctx-size to ≥ 1280" in msg
    assert problems(study_for(tiny_model, {"input_tokens": 400, "output_tokens": 100},
                              flags={"ctx-size": 512})) == {}  # fmt: skip


def test_check_spec_refuses_requests_longer_than_the_models_context(
    tiny_model: ModelFiles,
) -> None:
    """Issue 6 item 6: input_tokens beyond the model's context length (4096, read from the GGUF)."""
    found = problems(study_for(tiny_model, {"input_tokens": 5000, "output_tokens": 10}))
    assert set(found) == {"workload.input_tokens"}, found
    assert "5010 tokens per request" in found["workload.input_tokens"]
    assert "the model's context length 4096" in found["workload.input_tokens"]
    # at the bound it is fine: 4000 + 96 = 4096 on one slot of the unified 4096 buffer
    assert problems(study_for(tiny_model, {"input_tokens": 4000, "output_tokens": 96})) == {}


def test_check_spec_refuses_a_baseline_that_cannot_hold_the_tokens_in_flight(
    tiny_model: ModelFiles,
) -> None:
    found = problems(study_for(tiny_model, {"input_tokens": 1000, "output_tokens": 100,
                                            "concurrency": [1, 8]}))  # fmt: skip
    assert set(found) == {"workload.concurrency"}, found
    assert "serves concurrency ≤ 3" in found["workload.concurrency"]


def test_check_spec_refuses_a_ctx_size_space_too_small_for_one_request(
    tiny_model: ModelFiles,
) -> None:
    found = problems(
        study_for(
            tiny_model,
            {"input_tokens": 1000, "output_tokens": 100},
            {"ctx-size": {"kind": "choice", "values": [256, 512]}},
        )
    )
    assert set(found) == {"space.params.ctx-size"}, found
    assert "allow ctx-size ≥ 1280" in found["space.params.ctx-size"]
    ok = {"ctx-size": {"kind": "choice", "values": [512, 2048]}}
    assert problems(study_for(tiny_model, {"input_tokens": 1000, "output_tokens": 100}, ok)) == {}


@pytest.mark.parametrize("cut", [1, 100_000, "half", 5000, 300, 30])
def test_check_spec_refuses_a_truncated_gguf(
    tiny_model: ModelFiles, tmp_path: Path, cut: int | str
) -> None:
    """Issue 6 item 6: a GGUF cut short (a copy or download interrupted) passed validate."""
    data = tiny_model.gguf_path.read_bytes()
    keep = len(data) // 2 if cut == "half" else (len(data) - cut if cut in (1, 100_000) else cut)
    assert isinstance(keep, int)
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:keep])
    found = problems(study_for(tiny_model, {}, model=str(short)))
    assert set(found) == {"engine.model"}, found
    assert "is truncated" in found["engine.model"] and f"{keep:,}" in found["engine.model"]
    assert "copy or download it again" in found["engine.model"]
    if keep > 6000:  # past the header: how much is missing
        assert f"({len(data) - keep:,} missing)" in found["engine.model"]
    assert gguf_size_problem(tiny_model.gguf_path) is None


@pytest.mark.parametrize(
    "param",
    [{"kind": "choice", "values": [1, 2]}, {"kind": "int", "low": 0, "high": 1},
     {"kind": "float", "low": 0, "high": 1}, {"kind": "choice", "values": [True, "no"]}],
)  # fmt: skip
def test_a_bool_flag_driven_by_another_kind_is_told_to_use_kind_bool(param: dict[str, Any]) -> None:
    message = space_problems({"cont-batching": param})["space.params.cont-batching"]
    assert "kind: bool" in message
    assert "kind: choice" not in message


def test_a_bool_flag_accepts_kind_bool_and_a_choice_of_bools() -> None:
    assert space_problems({"cont-batching": {"kind": "bool"}}) == {}
    assert space_problems({"warmup": {"kind": "choice", "values": [True, False]}}) == {}


@pytest.mark.parametrize(
    ("name", "param", "never"),
    [("parallel", {"kind": "int", "low": -5, "high": 0}, "(-5, -4)"),
     ("threads", {"kind": "int", "low": -1, "high": 4}, "(0)"),
     ("parallel", {"kind": "int", "low": -(10**12), "high": 8}, f"({-(10**12)}, {1 - 10**12})"),
     ("batch-size", {"kind": "int", "low": 0, "high": 512, "step": 256}, "(0)"),
     ("ctx-size", {"kind": "int", "low": -4096, "high": 4096, "step": 4096}, "(-4096)"),
     ("threads-batch", {"kind": "choice", "values": [-1, 0, 2]}, "threads-batch = 0")],
)  # fmt: skip
def test_int_ranges_with_values_llama_cpp_never_runs_are_problems(
    name: str, param: dict[str, Any], never: str
) -> None:
    message = space_problems({name: param})[f"space.params.{name}"]
    assert name in message and never in message
    assert "use ≥" in message


def test_int_ranges_llama_cpp_can_run_are_fine() -> None:
    assert space_problems({
        "parallel": {"kind": "int", "low": -1, "high": 7, "step": 2},  # -1 = auto, 1, 3, 5, 7
        "threads": {"kind": "choice", "values": [-1, 1, 2]},
        "ctx-size": {"kind": "int", "low": 0, "high": 8192, "step": 4096},
        "batch-size": {"kind": "int", "low": 64, "high": 4096, "log": True},
        "cache-reuse": {"kind": "int", "low": 0, "high": 256},
    }) == {}  # fmt: skip


def test_fixed_flags_llama_cpp_never_runs_are_problems(tiny_model: ModelFiles) -> None:
    spec = study(tiny_model, {"threads": {"kind": "int", "low": 1, "high": 2}},
                 flags={"parallel": 0, "ubatch-size": -1})  # fmt: skip
    found = problems(spec)
    assert "parallel = 0 never runs" in found["engine.flags.parallel"]
    assert "ubatch-size = -1 never runs: use ≥ 1" in found["engine.flags.ubatch-size"]


def test_a_model_path_that_is_a_directory_is_named_as_one(tiny_model: ModelFiles) -> None:
    spec = study(tiny_model, {"parallel": {"kind": "int", "low": 1, "high": 2}})
    spec = spec.model_copy(
        update={
            "engine": spec.engine.model_copy(update={"model": str(tiny_model.gguf_path.parent)})
        }
    )
    message = problems(spec)["engine.model"]
    assert "is a directory" in message and "model.gguf" in message
    assert "does not exist" not in message


def test_a_tokenizer_path_that_does_not_load_is_a_problem(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    def tokenizer_problem(path: Path) -> str | None:
        found = problems(study(tiny_model, {"parallel": {"kind": "bool"}}, tokenizer=str(path)))
        return found.get("engine.tokenizer")

    assert tokenizer_problem(tiny_model.tokenizer_dir) is None
    assert tokenizer_problem(tiny_model.tokenizer_dir / "tokenizer.json") is None
    message = tokenizer_problem(tiny_model.tokenizer_dir / "special_tokens_map.json")
    assert message is not None
    assert "not a loadable tokenizer" in message and "special_tokens_map.json" in message
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    message = tokenizer_problem(broken)
    assert message is not None and "not a loadable tokenizer" in message
    message = tokenizer_problem(tmp_path)
    assert message is not None and "without tokenizer.json" in message


# ---- classify_failure -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("log", "rc", "kind", "evidence"),
    [
        ("missing_model.log", 1, FailureKind.MODEL_LOAD_FAILED, "failed to open GGUF file"),
        ("bad_model_file.log", 1, FailureKind.MODEL_LOAD_FAILED, "invalid magic characters"),
        ("port_in_use.log", 1, FailureKind.PORT_IN_USE, "couldn't bind HTTP server socket"),
        (
            "huge_ctx.log",
            1,
            FailureKind.KV_CACHE_TOO_SMALL,
            "failed to allocate buffer for kv cache",
        ),
        ("quantized_v_without_fa.log", 1, FailureKind.INVALID_ARGS, "requires flash_attn"),
        ("bad_cache_type.log", 2, FailureKind.INVALID_ARGS, "invalid choice: 'q9_9'"),
        ("unknown_flag.log", 2, FailureKind.INVALID_ARGS, "unrecognized arguments: --paralel"),
        # a bare SIGKILL is no evidence of OOM (issue 6 item 3): crashed, retried once
        ("normal_startup.log", -9, FailureKind.ENGINE_CRASHED, "killed by SIGKILL"),
        ("normal_startup.log", 137, FailureKind.ENGINE_CRASHED, "killed by SIGKILL"),
        ("normal_startup.log", 1, FailureKind.ENGINE_CRASHED, "exited with status 1"),
        ("normal_startup.log", None, FailureKind.UNKNOWN, ""),
    ],
)
def test_classify_captured_start_up_logs(
    log: str, rc: int | None, kind: FailureKind, evidence: str
) -> None:
    """Logs captured from real runs of the xllamacpp server (see tests/unit/data/llamacpp_logs)."""
    got_kind, reason = engine().classify_failure((LOGS / log).read_text(), rc)
    assert got_kind is kind
    assert evidence in reason
    assert not reason.startswith("0.0")  # llama.cpp's timestamp prefix is stripped


def test_a_kv_cache_failure_says_what_to_change_and_quotes_the_log() -> None:
    params: Params = {"ctx-size": 30_000_000, "parallel": 1}
    eng = engine(flags={"cache-type-k": "f32", "cache-type-v": "f32"})
    kind, reason = eng.classify_failure((LOGS / "huge_ctx.log").read_text(), 1, params)
    assert kind is FailureKind.KV_CACHE_TOO_SMALL
    assert reason.startswith("the KV cache these flags ask for could not be allocated (")
    assert (
        "llama_init_from_model: failed to initialize the context: failed to allocate buffer for "
        "kv cache" in reason
    )
    assert "attempted to allocate 234376.00 MB" in reason  # how much it asked for
    assert reason.endswith(
        ": lower ctx-size, or use a quantized cache-type-k/cache-type-v (e.g. q8_0)"
    ), reason


@pytest.mark.parametrize(
    ("params", "never"),
    [
        # one slot already: never "lower parallel"
        ({"ctx-size": 30_000_000, "parallel": 1}, ["parallel"]),
        # both caches quantized already: never "use a quantized cache"
        (
            {"ctx-size": 30_000_000, "cache-type-k": "q8_0", "cache-type-v": "q4_0"},
            ["quantized", "q8_0"],
        ),
        # K quantized: only V is suggested
        ({"ctx-size": 30_000_000, "cache-type-k": "q8_0"}, ["cache-type-k"]),
        # flash attention off: a quantized V cache needs it, so the advice says so
        ({"ctx-size": 30_000_000, "flash-attn": "off"}, []),
    ],
)
def test_kv_cache_advice_never_recommends_what_the_failing_trial_already_did(
    params: Params, never: list[str]
) -> None:
    kind, reason = engine().classify_failure((LOGS / "huge_ctx.log").read_text(), 1, params)
    assert kind is FailureKind.KV_CACHE_TOO_SMALL
    advice = reason.rsplit("): ", 1)[1]
    assert advice.startswith("lower ctx-size")
    for word in never:
        assert word not in advice, advice
    if params.get("flash-attn") == "off":
        assert "needs flash-attn" in advice


WORDINGS = LOGS / "wordings"


def _fixture(name: str) -> str:
    """A log fixture without its ``#`` header (the header names the llama.cpp release/source)."""
    text = (WORDINGS / name).read_text()
    assert text.startswith("# source: "), f"{name} must name its source"
    return "\n".join(x for x in text.splitlines() if not x.startswith("#"))


@pytest.mark.parametrize(
    ("name", "rc", "kind", "evidence"),
    [
        # issue 5 item 6: the mlock warning is not evidence; the crash is what happened
        ("mlock_warning_then_sigsegv_wheel.log", -11, FailureKind.ENGINE_CRASHED,
         "killed by SIGSEGV (exit status -11)"),
        ("mlock_warning_then_sigsegv_2023.log", 139, FailureKind.ENGINE_CRASHED,
         "killed by SIGSEGV (exit status 139)"),
        ("pinned_memory_warning_then_sigabrt_2024.log", -6, FailureKind.ENGINE_CRASHED,
         "killed by SIGABRT (exit status -6): ggml.c:12345: GGML_ASSERT("),
        ("port_in_use_b3923.log", 1, FailureKind.PORT_IN_USE,
         "main: couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 8080"),
        ("port_in_use_2023.log", 1, FailureKind.PORT_IN_USE,
         "couldn't bind to server socket: hostname=127.0.0.1 port=8080"),
        ("kv_cache_2024.log", 1, FailureKind.KV_CACHE_TOO_SMALL,
         "llama_kv_cache_init: failed to allocate buffer for kv cache"),
        ("model_load_server_2024.log", 1, FailureKind.MODEL_LOAD_FAILED,
         "llama_model_load: error loading model: failed to open model.gguf"),
        ("prompt_cache_errors_then_sigkill_wheel.log", -9, FailureKind.ENGINE_CRASHED,
         "no evidence of running out of memory"),
    ],
)  # fmt: skip
def test_each_releases_wording_means_the_same_failure(
    name: str, rc: int, kind: FailureKind, evidence: str
) -> None:
    got, reason = engine().classify_failure(_fixture(name), rc)
    assert got is kind, reason
    assert evidence in reason, reason


def test_the_same_crash_is_classified_alike_with_or_without_a_warning() -> None:
    """Issue 5 item 6's example: the mlock warning turned a SIGSEGV into host_oom (not retried)."""
    with_warning = _fixture("mlock_warning_then_sigsegv_wheel.log")
    without = "\n".join(x for x in with_warning.splitlines() if "mlock" not in x)
    assert "failed to mlock" in with_warning and "mlock" not in without
    for rc in (-11, 139, -9):
        assert engine().classify_failure(with_warning, rc)[0] is FailureKind.ENGINE_CRASHED
        assert engine().classify_failure(without, rc)[0] is FailureKind.ENGINE_CRASHED
    # the same lines logged as errors would be evidence (the level decides, not the words)
    as_error = with_warning.replace(" W warning: failed to mlock", " E failed to mlock x")
    assert error_lines(as_error) == []  # mlock failures are never fatal, whatever the level
    assert error_lines("0.00.1.1 E ggml_aligned_malloc: insufficient memory") == [
        "ggml_aligned_malloc: insufficient memory"
    ]
    assert error_lines("0.00.1.1 W ggml_aligned_malloc: insufficient memory") == []


def test_sigkill_is_host_oom_only_with_the_kernels_record() -> None:
    log = (LOGS / "normal_startup.log").read_text()
    record = (
        f"{OOM_EVIDENCE_PREFIX} the kernel log says: Memory cgroup out of memory: Killed process "
        "12744 (python) total-vm:1880196kB, anon-rss:306048kB"
    )
    kind, reason = engine().classify_failure(log + "\n" + record + "\n", -9)
    assert kind is FailureKind.HOST_OOM
    assert "Killed process 12744" in reason
    assert engine().classify_failure(log, -9)[0] is FailureKind.ENGINE_CRASHED
    # the engine's own allocation error is evidence too
    alloc = log + "\nterminate called after throwing an instance of 'std::bad_alloc'\n"
    assert engine().classify_failure(alloc, -6)[0] is FailureKind.HOST_OOM


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        # llama-server's own argument errors (common/arg.cpp format strings; the first as quoted
        # in a public bug report about a build without --no-mmap)
        ("error: invalid argument: --no-mmap", FailureKind.INVALID_ARGS),
        ('error while handling argument "--cache-type-k": Unsupported cache type: q9\n\nusage:',
         FailureKind.INVALID_ARGS),
        # CUDA failures as quoted in public reports of llama-server runs
        ("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 590.07 MiB on device 0: "
         "cudaMalloc failed: out of memory\n"
         "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
         FailureKind.CUDA_OOM),
        ("cudaMalloc failed: out of memory\n"
         "alloc_tensor_range: failed to allocate CUDA0 buffer of size 1879048192\n"
         "llama_init_from_model: failed to initialize the context: failed to allocate buffer for "
         "kv cache", FailureKind.KV_CACHE_TOO_SMALL),
        ("terminate called after throwing an instance of 'std::bad_alloc'\n  what():  "
         "std::bad_alloc", FailureKind.HOST_OOM),
    ],
)  # fmt: skip
def test_classify_llama_server_and_cuda_lines(text: str, kind: FailureKind) -> None:
    assert engine().classify_failure(text, 1)[0] is kind


def test_endpoint_is_the_base_url_and_served_model_name() -> None:
    eng = engine(served_model_name="tiny")
    assert eng.endpoint("127.0.0.1", 8080).base_url == "http://127.0.0.1:8080"
    assert eng.endpoint("::1", 8080).base_url == "http://[::1]:8080"
    assert eng.endpoint("127.0.0.1", 8080).model == "tiny"
