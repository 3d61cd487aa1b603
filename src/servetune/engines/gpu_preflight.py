"""Pre-flight rules both GPU engines share: GPUs present, parallel sizes that divide the model's
heads and fit the GPUs, weights that fit in the memory fraction.

Pure functions over plain values (GpuFacts, ModelFacts, ints); each returns reasons (strings).
"""

from __future__ import annotations

from collections.abc import Mapping

from servetune.engines.hardware import GpuFacts, ModelFacts, weight_gib


def needs_gpus(engine: str, gpus: GpuFacts) -> list[str]:
    """A reason when there is no GPU: ``engine`` runs on NVIDIA GPUs only (as servetune
    launches it); names where the facts came from and what to do."""
    if gpus.count > 0:
        return []
    return [
        f"{engine} needs NVIDIA GPUs and this host has none ({gpus.source}); run the study on a "
        "GPU host, or set engine.gpus {count, memory_gib} to check a plan with --dry-run"
    ]


def head_divisibility(
    model: ModelFacts, tp: int, *, tp_flag: str, engine: str, source: str
) -> list[str]:
    """Reasons tensor-parallel size ``tp`` cannot split the model's heads.

    Attention heads must be divisible by tp; KV heads are either split (kv % tp == 0) or
    replicated (tp % kv == 0), anything else is rejected. Source: the engine's QKV layer
    (``source``: vLLM config/model.py "Total number of attention heads (H) must be divisible by
    tensor parallel size (T)"; SGLang models/llama.py asserts the same, and the KV rule).
    """
    reasons: list[str] = []
    heads, kv = model.num_attention_heads, model.kv_heads
    if heads and tp > 0 and heads % tp:
        fits = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0 and d <= 64)
        reasons.append(
            f"{tp_flag} {tp} does not divide the model's {heads} attention heads; {engine} "
            f"refuses it ({source}); use one of {fits}"
        )
    elif kv and tp > 0 and kv % tp and tp % kv:
        reasons.append(
            f"{tp_flag} {tp} neither divides nor is a multiple of the model's {kv} KV heads; "
            f"{engine} can neither split nor replicate them ({source})"
        )
    return reasons


def gpu_count(used: int, gpus: GpuFacts, *, what: str) -> list[str]:
    """A reason when a trial needs ``used`` GPUs (``what`` says how: "tp 4 × pp 1 × dp 2") and
    fewer are available."""
    if gpus.count and used > gpus.count:
        return [
            f"{what} = {used} GPUs but only {gpus.count} are available ({gpus.source}); lower "
            "the parallel sizes"
        ]
    return []


def weights_fit(
    model: ModelFacts,
    gpus: GpuFacts,
    *,
    shards: int,
    fraction: float | None,
    fraction_flag: str,
    dtype: str | None,
    quantization: str | None,
) -> list[str]:
    """A reason when the weights do not fit in ``fraction`` of each GPU's memory.

    Weights per GPU ≈ parameters × bytes per parameter / ``shards`` (tp × pp), see
    ``hardware.weight_gib`` (the estimate ``accelerate estimate-memory`` prints). With no room
    left for the KV cache the engine cannot start; a fit within 5% is not rejected, as the
    estimate is not exact. ``fraction`` None = the engine chooses it (check skipped).
    """
    if fraction is None or gpus.count == 0 or gpus.memory_gib <= 0:
        return []
    total = weight_gib(model, dtype, quantization)
    if total is None:
        return []
    per_gpu = total / max(1, shards)
    budget = gpus.memory_gib * fraction
    if per_gpu > budget * 1.05:
        return [
            f"the weights take about {per_gpu:.1f} GiB per GPU ({total:.1f} GiB over {shards} "
            f"GPU(s)) but {fraction_flag} {fraction:g} × {gpus.memory_gib:g} GiB leaves "
            f"{budget:.1f} GiB, with nothing for the KV cache; raise {fraction_flag}, shard "
            "over more GPUs (tensor/pipeline parallel) or quantize"
        ]
    return []


def context_fits(
    max_len: int | None, input_tokens: int, output_tokens: int, flag: str
) -> list[str]:
    """A reason when one request of the workload (input + output tokens) is longer than the
    context ``max_len`` the engine would accept (it rejects such requests)."""
    need = input_tokens + output_tokens
    if max_len is not None and max_len > 0 and max_len < need:
        return [
            f"{flag} {max_len} < input_tokens + output_tokens = {need}: every request would be "
            f"rejected; raise {flag} to ≥ {need}"
        ]
    return []


def context_within_model(
    max_len: int | None,
    model: ModelFacts | None,
    *,
    flag: str,
    engine: str,
    allow_env: str,
    env: Mapping[str, str],
) -> list[str]:
    """A reason when ``flag`` asks for more context than the model's config.json allows.

    Both engines refuse a context above the derived one unless ``allow_env`` is set (vLLM
    config/model.py "User-specified max_model_len (X) is greater than the derived
    max_model_len"; SGLang configs/model_config.py, SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN).
    Skipped when the config has rope_scaling (the derived length then differs from
    max_position_embeddings) or the variable is set in engine.env.
    """
    if model is None or max_len is None or max_len <= 0 or model.has_rope_scaling:
        return []
    limit = model.max_position_embeddings
    if limit is None or max_len <= limit or env.get(allow_env, "") not in ("", "0"):
        return []
    return [
        f"{flag} {max_len} > the model's max_position_embeddings {limit}: {engine} refuses it "
        f"unless {allow_env}=1 is set in engine.env; lower {flag} to ≤ {limit}"
    ]


def as_int(v: object) -> int | None:
    """``v`` as an int when it is an integral number (bools and strings → None)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return int(v) if float(v).is_integer() else None


def as_float(v: object) -> float | None:
    """``v`` as a float when it is a number (bools and strings → None)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)
