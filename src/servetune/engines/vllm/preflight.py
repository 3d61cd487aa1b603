"""vLLM pre-flight: params that vLLM 0.33.0 would refuse, or that cannot fit the GPUs, rejected
before any launch, from the model's config.json and the GPU facts.
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

ENGINE = "vLLM"


def gpus_used(flags: Mapping[str, ParamValue | None]) -> int:
    """GPUs one vLLM server occupies: tensor-parallel-size × pipeline-parallel-size ×
    data-parallel-size (vllm/config/parallel.py ``ParallelConfig.world_size`` × the data-parallel
    replicas, each on its own GPUs); unset or non-integral sizes count as 1."""
    tp = as_int(flags.get("tensor-parallel-size")) or 1
    pp = as_int(flags.get("pipeline-parallel-size")) or 1
    dp = as_int(flags.get("data-parallel-size")) or 1
    return max(1, tp) * max(1, pp) * max(1, dp)


def check(
    flags: Mapping[str, ParamValue | None],
    workload: Workload,
    gpus: GpuFacts,
    model: ModelFacts | None,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Reasons ``flags`` (catalogue defaults < engine.flags < params) cannot run; empty = launch.

    - no GPU → needs GPUs;
    - tensor × pipeline × data parallel ≤ GPU count;
    - tensor-parallel-size divides the attention heads (and splits or replicates KV heads);
    - max-num-batched-tokens ≥ max-model-len unless chunked prefill is on, and ≥ max-num-seqs
      (vllm/config/scheduler.py ``verify_max_model_len`` raises otherwise);
    - a quantized model with dtype float32 (vllm/config/vllm.py: "is not supported for
      quantization method"; every method's get_supported_act_dtypes is half/bfloat16);
    - --quantization differing from the checkpoint's quant_method (config/model.py "does not
      match the quantization method"), unless one names the other's kernel (awq → awq_marlin);
    - an explicit kv-cache-dtype float16/bfloat16 that differs from the model dtype
      (CacheConfig: "An explicit float16 or bfloat16 must match the model data type");
    - weights that do not fit in gpu-memory-utilization of each GPU;
    - max-model-len shorter than one request of the workload, or longer than the model's
      max_position_embeddings (unless VLLM_ALLOW_LONG_MAX_MODEL_LEN is in ``env``).

    Without ``model`` (no config.json) only the checks that need no model run.
    """
    reasons = needs_gpus(ENGINE, gpus)
    tp = as_int(flags.get("tensor-parallel-size")) or 1
    pp = as_int(flags.get("pipeline-parallel-size")) or 1
    dp = as_int(flags.get("data-parallel-size")) or 1
    reasons += gpu_count(
        gpus_used(flags),
        gpus,
        what=f"tensor-parallel-size {tp} × pipeline-parallel-size {pp} × data-parallel-size {dp}",
    )
    if model is not None:
        reasons += head_divisibility(
            model,
            tp,
            tp_flag="tensor-parallel-size",
            engine=ENGINE,
            source="vllm/config/model.py verify_with_parallel_config",
        )

    max_len = as_int(flags.get("max-model-len"))
    model_len = max_len if max_len and max_len > 0 else None
    if model_len is None and model is not None:
        model_len = model.max_position_embeddings
    batched = as_int(flags.get("max-num-batched-tokens"))
    seqs = as_int(flags.get("max-num-seqs"))
    chunked = flags.get("enable-chunked-prefill")
    if batched is not None and model_len is not None and batched < model_len and chunked is False:
        reasons.append(
            f"max-num-batched-tokens {batched} < max-model-len {model_len} with chunked prefill "
            "off: vLLM refuses it (scheduler.py verify_max_model_len); raise "
            "max-num-batched-tokens, lower max-model-len or enable chunked prefill"
        )
    if batched is not None and seqs is not None and batched < seqs:
        reasons.append(
            f"max-num-batched-tokens {batched} < max-num-seqs {seqs}: vLLM refuses it "
            "(scheduler.py); raise max-num-batched-tokens or lower max-num-seqs"
        )

    dtype = flags.get("dtype")
    dtype_s = dtype if isinstance(dtype, str) else None
    quant = flags.get("quantization")
    quant_s = quant if isinstance(quant, str) else None
    ckpt_quant = model.quant_method if model is not None else None
    if quant_s and ckpt_quant and quant_s not in ckpt_quant and ckpt_quant not in quant_s:
        reasons.append(
            f"quantization {quant_s} does not match the checkpoint's quant_method {ckpt_quant}: "
            "vLLM refuses it (config/model.py); drop the flag or use the checkpoint's method"
        )
    if (quant_s or ckpt_quant) and dtype_s in ("float", "float32"):
        reasons.append(
            f"dtype {dtype_s} with quantization {quant_s or ckpt_quant}: vLLM's quantization "
            "methods run in half or bfloat16 only (config/vllm.py); use dtype auto, half or "
            "bfloat16"
        )
    kv = flags.get("kv-cache-dtype")
    served = _served_dtype(dtype_s, model)
    if kv in ("float16", "bfloat16") and served is not None and kv != served:
        reasons.append(
            f"kv-cache-dtype {kv} with the model served in {served}: vLLM requires an explicit "
            "float16/bfloat16 KV cache to match the model dtype (config/cache.py); use auto"
        )

    if model is not None:
        reasons += weights_fit(
            model,
            gpus,
            shards=tp * pp,
            fraction=as_float(flags.get("gpu-memory-utilization")),
            fraction_flag="gpu-memory-utilization",
            dtype=dtype_s,
            quantization=quant_s,
        )
    reasons += context_within_model(
        max_len,
        model,
        flag="max-model-len",
        engine=ENGINE,
        allow_env="VLLM_ALLOW_LONG_MAX_MODEL_LEN",
        env=env or {},
    )
    reasons += context_fits(
        max_len if max_len and max_len > 0 else None,
        workload.input_tokens,
        workload.output_tokens,
        "max-model-len",
    )
    return reasons


def _served_dtype(dtype: str | None, model: ModelFacts | None) -> str | None:
    """float16 / bfloat16 the model runs in (None when unknown or float32)."""
    names = {"half": "float16", "float16": "float16", "bfloat16": "bfloat16"}
    if dtype and dtype != "auto":
        return names.get(dtype)
    if model is not None and model.torch_dtype:
        if model.torch_dtype in ("float32", "float"):
            return "float16"  # dtype auto serves fp32 checkpoints in fp16 (ModelConfig.dtype doc)
        return names.get(model.torch_dtype)
    return None
