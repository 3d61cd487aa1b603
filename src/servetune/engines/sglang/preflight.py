"""SGLang pre-flight: params SGLang would refuse, or that cannot fit the GPUs, rejected before
any launch, from the model's config.json and the GPU facts.
"""

from __future__ import annotations

from collections.abc import Mapping

from servetune.core.spec import Workload
from servetune.core.study import ParamValue
from servetune.engines.gpu_preflight import (
    as_float,
    as_int,
    context_fits,
    context_within_model,
    gpu_count,
    head_divisibility,
    needs_gpus,
    weights_fit,
)
from servetune.engines.hardware import GpuFacts, ModelFacts

ENGINE = "SGLang"


def gpus_used(flags: Mapping[str, ParamValue | None]) -> int:
    """GPUs one SGLang server occupies: tp-size × pp-size × dp-size, or tp-size × pp-size with
    enable-dp-attention (the data-parallel attention groups share tp's GPUs;
    sglang/srt/server_args.py); unset or non-integral sizes count as 1."""
    tp = max(1, as_int(flags.get("tp-size")) or 1)
    pp = max(1, as_int(flags.get("pp-size")) or 1)
    dp = max(1, as_int(flags.get("dp-size")) or 1)
    return tp * pp if flags.get("enable-dp-attention") is True else tp * pp * dp


def check(
    flags: Mapping[str, ParamValue | None],
    workload: Workload,
    gpus: GpuFacts,
    model: ModelFacts | None,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Reasons ``flags`` cannot run; empty = launch.

    - no GPU → needs GPUs;
    - GPUs used: tp × pp × dp, or tp × pp with enable-dp-attention (dp shares tp's GPUs) ≤ count;
    - tp-size divides the attention heads and splits or replicates the KV heads
      (sglang/srt/models/llama.py asserts both);
    - ep-size divides tp-size (model_runner_components/moe_ep_setup.py: "tp_size must be
      divisible by ep_size");
    - a quantized model with dtype float32 (model_loader/loader.py: "is not supported for
      quantization method");
    - weights that do not fit in mem-fraction-static of each GPU (skipped when unset: SGLang
      computes it);
    - context-length shorter than one request of the workload, or longer than the model's
      max_position_embeddings (unless SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN is in ``env``).
    """
    reasons = needs_gpus(ENGINE, gpus)
    tp = as_int(flags.get("tp-size")) or 1
    pp = as_int(flags.get("pp-size")) or 1
    dp = as_int(flags.get("dp-size")) or 1
    ep = as_int(flags.get("ep-size")) or 1
    dp_attention = flags.get("enable-dp-attention") is True
    used = gpus_used(flags)
    what = f"tp-size {tp} × pp-size {pp}" + (
        " (dp attention shares tp's GPUs)" if dp_attention else f" × dp-size {dp}"
    )
    reasons += gpu_count(used, gpus, what=what)
    if ep > 1 and tp % ep:
        reasons.append(
            f"ep-size {ep} does not divide tp-size {tp}: SGLang refuses it (moe_ep_setup.py); "
            "use an ep-size that divides tp-size"
        )
    if model is not None:
        reasons += head_divisibility(
            model, tp, tp_flag="tp-size", engine=ENGINE, source="sglang/srt/models/llama.py"
        )
    dtype = flags.get("dtype")
    dtype_s = dtype if isinstance(dtype, str) else None
    quant = flags.get("quantization")
    quant_s = quant if isinstance(quant, str) else None
    ckpt_quant = model.quant_method if model is not None else None
    if (quant_s or ckpt_quant) and dtype_s in ("float", "float32"):
        reasons.append(
            f"dtype {dtype_s} with quantization {quant_s or ckpt_quant}: SGLang's quantization "
            "methods run in half or bfloat16 (model_loader/loader.py); use auto, half or bfloat16"
        )
    if model is not None:
        reasons += weights_fit(
            model,
            gpus,
            shards=tp * pp,
            fraction=as_float(flags.get("mem-fraction-static")),
            fraction_flag="mem-fraction-static",
            dtype=dtype_s,
            quantization=quant_s,
        )
    ctx = as_int(flags.get("context-length"))
    reasons += context_within_model(
        ctx,
        model,
        flag="context-length",
        engine=ENGINE,
        allow_env="SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN",
        env=env or {},
    )
    reasons += context_fits(ctx, workload.input_tokens, workload.output_tokens, "context-length")
    return reasons
