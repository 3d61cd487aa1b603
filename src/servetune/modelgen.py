"""Generate small random-weight Llama GGUF models with a matching Hugging Face tokenizer.

Used by the demo and the tests so nothing is downloaded: same size and seed → byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

ModelSize = Literal["tiny", "small"]

RECIPE_VERSION = 2
"""Bumped whenever the recipe changes, so old files on disk are regenerated.

2: untied F16 ``output.weight`` with zero rows for text-less tokens; F16 ``token_embd``."""

EOS_TOKEN = "<|endoftext|>"
"""The one special token (id 0): end of text, also used as BOS (which is never added)."""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A minimal Jinja chat template, enough for /v1/chat/completions to work."""

GGUF_NAME = "model.gguf"
TOKENIZER_DIR = "tokenizer"
MARKER_NAME = "servetune-model.json"


@dataclass(frozen=True)
class ModelShape:
    """Architecture of a generated model (Llama: RMSNorm, RoPE, SwiGLU, grouped-query attention).

    The output projection ``output.weight`` is its own tensor (not tied to ``token_embd.weight``),
    so the rows of tokens that must never be generated can be zero (see ``textless_token_ids``).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    context_length: int = 4096

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=512),
    "small": ModelShape(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=512),
}
"""tiny ≈ 15 MB, small ≈ 67 MB (F32 blocks, F16 token embedding and output projection)."""


@dataclass(frozen=True)
class ModelFiles:
    """A generated model: GGUF file, Hugging Face tokenizer directory, GGUF size in bytes."""

    gguf_path: Path
    tokenizer_dir: Path
    size_bytes: int


def make_model(size: ModelSize, out_dir: Path, seed: int = 0) -> ModelFiles:
    """Write ``out_dir/model.gguf`` and ``out_dir/tokenizer/`` for a random-weight Llama model.

    The tokenizer is a byte-level BPE (GPT-2 style; ``tokenizer.ggml.pre = gpt-2``) trained on the
    pydoc topics that ship with Python, so the Hugging Face tokenizer and llama.cpp count the same
    tokens. Weights are normal(0, 0.02) drawn from ``numpy.random.default_rng(seed)``: F32 in the
    blocks, F16 for the token embedding and the (untied) output projection; norms are ones. The
    output rows of the tokens in ``textless_token_ids`` are zero, so greedy decoding (temperature 0)
    always picks a token with text of its own: against thousands of random logits of either sign a
    logit of exactly 0 never wins the argmax in practice. Without this a streaming server holds back
    a lone UTF-8 continuation byte, and a request can end with no text at all, which a benchmark
    counts as a failed request. Same ``size`` and ``seed`` → byte-identical files. When the files
    already exist and the marker file (``servetune-model.json``) matches the recipe, size, seed and
    file hashes, nothing is rewritten.

    Raises ValueError for an unknown size and OSError when ``out_dir`` cannot be written.
    """
    if size not in SHAPES:
        raise ValueError(f"unknown model size {size!r}; use one of {sorted(SHAPES)}")
    shape = SHAPES[size]
    out_dir = Path(out_dir)
    gguf_path = out_dir / GGUF_NAME
    tok_dir = out_dir / TOKENIZER_DIR
    wanted = {"recipe_version": RECIPE_VERSION, "size": size, "seed": seed}
    existing = _read_marker(out_dir)
    if existing is not None and _marker_matches(existing, wanted, out_dir):
        logger.debug("model %s (seed %d) already in %s", size, seed, out_dir)
        return ModelFiles(gguf_path, tok_dir, gguf_path.stat().st_size)

    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER_NAME).unlink(missing_ok=True)
    tokenizer = _train_tokenizer(shape.vocab_size)
    tok_dir.mkdir(exist_ok=True)
    _write_tokenizer(tokenizer, tok_dir, shape)
    _write_gguf(tokenizer, shape, f"servetune-{size}", seed, gguf_path)
    files = {p: _sha256(out_dir / p) for p in _model_paths()}
    _atomic_write_text(
        out_dir / MARKER_NAME, json.dumps({**wanted, "sha256": files}, indent=2) + "\n"
    )
    size_bytes = gguf_path.stat().st_size
    logger.info(
        "generated %s model (seed %d, %.1f MB) in %s in %.1f s",
        size,
        seed,
        size_bytes / 1e6,
        out_dir,
        time.monotonic() - t0,
    )
    return ModelFiles(gguf_path, tok_dir, size_bytes)


def _model_paths() -> list[str]:
    return [GGUF_NAME, f"{TOKENIZER_DIR}/tokenizer.json", f"{TOKENIZER_DIR}/tokenizer_config.json"]


def _read_marker(out_dir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((out_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marker_matches(marker: dict[str, object], wanted: Mapping[str, object], out_dir: Path) -> bool:
    if any(marker.get(k) != v for k, v in wanted.items()):
        return False
    hashes = marker.get("sha256")
    if not isinstance(hashes, dict):
        return False
    for rel in _model_paths():
        path = out_dir / rel
        if not path.is_file() or hashes.get(rel) != _sha256(path):
            return False
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _training_text() -> list[str]:
    """Python's own pydoc topics (the text behind ``help('TOPIC')``), in key order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _train_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    """A byte-level BPE with ``<|endoftext|>`` as id 0 (deterministic for given text and size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer)
    return tok


def _write_tokenizer(tokenizer, tok_dir: Path, shape: ModelShape) -> None:  # type: ignore[no-untyped-def]
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json (transformers' layout)."""
    _atomic_write_text(tok_dir / "tokenizer.json", tokenizer.to_str(pretty=True))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": None,
        "pad_token": None,
        "model_max_length": shape.context_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            "0": {
                "content": EOS_TOKEN,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
    }
    _atomic_write_text(tok_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    specials = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN}
    _atomic_write_text(tok_dir / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")


def textless_token_ids(tokens: Sequence[str], special: Collection[int] = (0,)) -> list[int]:
    """Ids of byte-level BPE ``tokens`` that carry no text of their own, in increasing order.

    ``tokens[i]`` is the vocabulary string of id ``i`` in GPT-2's byte-level alphabet; it is mapped
    back to bytes with GPT-2's byte↔unicode table (``gguf.vocab.bytes_to_unicode``, the table the
    ``tokenizers`` ByteLevel decoder uses) and is text-less when those bytes are not valid UTF-8 on
    their own (strict ``bytes.decode('utf-8')``: a lone continuation byte, a cut multi-byte
    sequence). The ``special`` ids (``<|endoftext|>``) are included too. Raises KeyError for a
    character outside the byte-level alphabet in a non-special token.
    """
    from gguf.vocab import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    out = []
    for i, token in enumerate(tokens):
        if i in special:
            out.append(i)
            continue
        try:
            bytes(byte_of[c] for c in token).decode("utf-8")
        except UnicodeDecodeError:
            out.append(i)
    return out


def _write_gguf(tokenizer, shape: ModelShape, name: str, seed: int, path: Path) -> None:  # type: ignore[no-untyped-def]
    """The GGUF file: llama architecture metadata, the BPE vocabulary and merges, the tensors."""
    import gguf

    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [""] * len(vocab)
    for text, idx in vocab.items():
        tokens[idx] = text
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    n_vocab, d, f = len(tokens), shape.dim, shape.ffn_dim
    kv_dim = shape.head_dim * shape.n_kv_heads

    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(name)
    w.add_context_length(shape.context_length)
    w.add_embedding_length(d)
    w.add_block_count(shape.n_layers)
    w.add_feed_forward_length(f)
    w.add_head_count(shape.n_heads)
    w.add_head_count_kv(shape.n_kv_heads)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    # no general.file_type: the tensors mix F32 and F16 (llama.cpp then guesses it for its log)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if i == 0 else gguf.TokenType.NORMAL for i in range(n_vocab)]
    )
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)

    def normal(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims) * 0.02).astype(np.float32)

    ones = np.ones(d, np.float32)
    w.add_tensor("token_embd.weight", normal(n_vocab, d).astype(np.float16))
    w.add_tensor("output_norm.weight", ones)
    for b in range(shape.n_layers):
        p = f"blk.{b}."
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "attn_q.weight", normal(d, d))
        w.add_tensor(p + "attn_k.weight", normal(kv_dim, d))
        w.add_tensor(p + "attn_v.weight", normal(kv_dim, d))
        w.add_tensor(p + "attn_output.weight", normal(d, d))
        w.add_tensor(p + "ffn_norm.weight", ones)
        w.add_tensor(p + "ffn_gate.weight", normal(f, d))
        w.add_tensor(p + "ffn_up.weight", normal(f, d))
        w.add_tensor(p + "ffn_down.weight", normal(d, f))
    output = normal(n_vocab, d)
    output[textless_token_ids(tokens)] = 0.0
    w.add_tensor("output.weight", output.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m servetune.modelgen --size tiny --out DIR [--seed N]``: print the GGUF path."""
    ap = argparse.ArgumentParser(prog="python -m servetune.modelgen", description=__doc__)
    ap.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = make_model(args.size, args.out, args.seed)
    print(files.gguf_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
