"""The generated models: byte-identical for a seed, reused when present, the Hugging Face
tokenizer counts exactly the tokens the real llama.cpp server counts, and greedy output has text."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from gguf import GGUFReader
from tokenizers import Tokenizer, decoders

from servetune.bench.prompts import PromptBuilder
from servetune.engines.llamacpp.gguf_info import read_context_length
from servetune.modelgen import SHAPES, ModelFiles, make_model, textless_token_ids
from tests.integration.llamacpp_helpers import running_engine, stream_completion, tiny_engine

pytestmark = pytest.mark.integration

FILES = ("model.gguf", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")


def test_same_seed_gives_byte_identical_files_and_another_seed_other_weights(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    # in another process: the tokenizer trainer's hash maps are seeded per process
    subprocess.run(  # noqa: S603
        [sys.executable, "-m", "servetune.modelgen", "--out", str(tmp_path / "again")],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    again = make_model("tiny", tmp_path / "again", seed=0)  # reuses the files just written
    for rel in FILES:
        assert (tmp_path / "again" / rel).read_bytes() == (
            tiny_model.gguf_path.parent / rel
        ).read_bytes(), rel
    assert again.size_bytes == tiny_model.size_bytes
    assert 10e6 < tiny_model.size_bytes < 20e6
    other = make_model("tiny", tmp_path / "seed1", seed=1)
    assert other.gguf_path.read_bytes() != tiny_model.gguf_path.read_bytes()
    assert (other.tokenizer_dir / "tokenizer.json").read_bytes() == (
        tiny_model.tokenizer_dir / "tokenizer.json"
    ).read_bytes()


def test_existing_files_are_reused_and_damaged_ones_regenerated(tmp_path: Path) -> None:
    first = make_model("tiny", tmp_path, seed=3)
    original = first.gguf_path.read_bytes()
    stamp = first.gguf_path.stat().st_mtime_ns
    make_model("tiny", tmp_path, seed=3)
    assert first.gguf_path.stat().st_mtime_ns == stamp  # not rewritten
    with first.gguf_path.open("r+b") as f:  # damage one byte of the weights
        f.seek(-1, 2)
        f.write(b"\x7f")
    make_model("tiny", tmp_path, seed=3)
    assert first.gguf_path.read_bytes() == original


def test_small_model_size_and_untied_output(tmp_path: Path) -> None:
    small = make_model("small", tmp_path / "small")
    assert 64e6 < small.size_bytes < 70e6
    names = {t.name for t in GGUFReader(small.gguf_path).tensors}
    assert {"token_embd.weight", "output.weight"} <= names


def test_output_rows_of_tokens_without_text_of_their_own_are_zero(tiny_model: ModelFiles) -> None:
    """Exactly the tokens the tokenizers ByteLevel decoder cannot turn into text on their own
    (it writes U+FFFD for bytes that are not valid UTF-8), and <|endoftext|>, can never win."""
    tok = Tokenizer.from_file(str(tiny_model.tokenizer_dir / "tokenizer.json"))
    byte_level = decoders.ByteLevel()
    vocab = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    expected = {0} | {i for i, t in enumerate(vocab) if "\ufffd" in byte_level.decode([t])}
    assert 169 in expected  # a lone UTF-8 continuation byte, seen streaming no text
    assert textless_token_ids(vocab) == sorted(expected)

    tensors = {t.name: t for t in GGUFReader(tiny_model.gguf_path).tensors}
    output = np.asarray(tensors["output.weight"].data, dtype=np.float32)
    embedding = np.asarray(tensors["token_embd.weight"].data, dtype=np.float32)
    assert output.shape == embedding.shape == (len(vocab), SHAPES["tiny"].dim)
    zero_rows = {i for i in range(len(vocab)) if not output[i].any()}
    assert zero_rows == expected
    assert all(embedding[i].any() for i in expected)  # such tokens still read fine in a prompt


def test_every_benchmark_prompt_streams_text_under_greedy_decoding(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    """48 distinct 32-token prompts built like the benchmark builds them, 8 output tokens at
    temperature 0: each request streams text (none ends as a `no_output` failure)."""
    n, input_tokens, output_tokens = 48, 32, 8
    engine = tiny_engine(tiny_model.gguf_path)

    async def scenario() -> list[tuple[int, dict[str, Any]]]:
        builder = PromptBuilder.from_tokenizer(tiny_model.tokenizer_dir, input_tokens)
        try:
            prompts = await builder.build(n)
        finally:
            await builder.aclose()
        assert len({p.text for p in prompts}) == n
        assert {p.token_count for p in prompts} == {input_tokens}
        gate = asyncio.Semaphore(4)
        # a fresh connection per request, as the benchmark client does
        limits = httpx.Limits(max_keepalive_connections=0)
        async with (
            running_engine(
                engine, {"parallel": 4, "ctx-size": 1024}, tmp_path / "e.log"
            ) as started,
            httpx.AsyncClient(base_url=started.endpoint.base_url, timeout=30, limits=limits) as c,
        ):

            async def one(text: str) -> tuple[int, dict[str, Any]]:
                async with gate:
                    return await stream_completion(c, started.endpoint.model, text, output_tokens)

            return list(await asyncio.gather(*(one(p.text) for p in prompts)))

    results = asyncio.run(scenario())
    assert [i for i, (chunks, _) in enumerate(results) if chunks == 0] == []
    assert [u.get("completion_tokens") for _, u in results] == [output_tokens] * n
    assert [u.get("prompt_tokens") for _, u in results] == [input_tokens] * n


def test_generated_model_metadata_and_tokenizer_config(tiny_model: ModelFiles) -> None:
    assert read_context_length(tiny_model.gguf_path) == SHAPES["tiny"].context_length
    config = json.loads((tiny_model.tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["add_bos_token"] is False
    tok = Tokenizer.from_file(str(tiny_model.tokenizer_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == SHAPES["tiny"].vocab_size
    assert tok.token_to_id("<|endoftext|>") == 0


TEXTS = [
    "Hello, world!",
    "  two leading spaces, trailing ones  ",
    "lines\nand\n\nblank lines\r\nand\ttabs\t\tdouble",
    "Punctuation: (a, b); [c] {d} <e> 'f' \"g\" ... ?! -- @#$%^&*_+=|\\/~`",
    "Unicode: ümlaut café naïve, 日本語のテキスト, Ελληνικά, emoji 🙂🚀, snowman ☃",
    "def square(x):\n    return x ** 2  # a comment\n\nprint(square(12345.678))",
    "numbers 0 7 42 1234567890 3.14159 -273.15 1e-9",
    "the the the the the the the the",
    "",
]


def test_tokenizer_counts_match_the_llama_cpp_server(
    tiny_model: ModelFiles, tmp_path: Path
) -> None:
    """The prompt builder's token counts are the server's token counts (same ids, too)."""
    from pydoc_data.topics import topics

    texts = [*TEXTS, topics["if"][:2000]]
    tok = Tokenizer.from_file(str(tiny_model.tokenizer_dir / "tokenizer.json"))
    engine = tiny_engine(tiny_model.gguf_path)

    async def server_tokens() -> list[list[int]]:
        out = []
        async with (
            running_engine(engine, {}, tmp_path / "engine.log") as started,
            httpx.AsyncClient(base_url=started.endpoint.base_url, timeout=30) as client,
        ):
            for text in texts:
                r = await client.post("/tokenize", json={"content": text})
                r.raise_for_status()
                out.append(r.json()["tokens"])
        return out

    for text, ids in zip(texts, asyncio.run(server_tokens()), strict=True):
        local = tok.encode(text).ids
        assert len(local) == len(ids), repr(text)
        assert local == ids, repr(text)
