"""Unit tests of PromptBuilder with real tokenizers trained in-test (byte-level BPE)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from pydoc_data.topics import topics

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from servetune.bench.prompts import Prompt, PromptBuilder
from servetune.errors import BenchmarkError


def _train(vocab_size: int, bos: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(topics.values())[:30], trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok


@pytest.fixture(scope="module", params=[(600, True), (3000, False)], ids=["bpe600-bos", "bpe3000"])
def tokenizer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Tokenizer, Path]:
    """A trained tokenizer and the directory holding its tokenizer.json."""
    vocab, bos = request.param
    tok = _train(vocab, bos)
    d = tmp_path_factory.mktemp(f"tok{vocab}")
    tok.save(str(d / "tokenizer.json"))
    return tok, d


def build(
    path: Path | str, input_tokens: int, n: int, seed: int = 0, start: int = 0
) -> list[Prompt]:
    return asyncio.run(
        PromptBuilder.from_tokenizer(path, input_tokens, seed=seed).build(n, start=start)
    )


@pytest.mark.parametrize("input_tokens", [3, 7, 32, 128, 1000])
def test_every_prompt_has_exactly_the_requested_tokens(
    tokenizer: tuple[Tokenizer, Path], input_tokens: int
) -> None:
    tok, d = tokenizer
    prompts = build(d, input_tokens, 20)
    for p in prompts:
        assert p.token_count == input_tokens
        assert len(tok.encode(p.text).ids) == input_tokens, p.text


def test_tokenizer_json_file_works_as_well_as_its_directory(
    tokenizer: tuple[Tokenizer, Path],
) -> None:
    _, d = tokenizer
    assert build(d / "tokenizer.json", 50, 3) == build(d, 50, 3)


def test_prompts_are_distinct_from_their_first_tokens(tokenizer: tuple[Tokenizer, Path]) -> None:
    tok, d = tokenizer
    prompts = build(d, 64, 30)
    assert len({p.text for p in prompts}) == 30
    ids = [tok.encode(p.text).ids for p in prompts]
    specials = tok.num_special_tokens_to_add(False)
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            common = 0
            while ids[i][common] == ids[j][common]:
                common += 1
            # A prefix cache could reuse at most the special tokens and a digit or two.
            assert common <= specials + 2, (prompts[i].text[:20], prompts[j].text[:20])


def test_same_seed_same_prompts_other_seed_other_prompts(tokenizer: tuple[Tokenizer, Path]) -> None:
    _, d = tokenizer
    assert build(d, 40, 5, seed=1) == build(d, 40, 5, seed=1)
    assert build(d, 40, 5, seed=1) != build(d, 40, 5, seed=2)
    # Prompt i does not depend on how many were built before it.
    assert build(d, 40, 5, seed=1)[3:] == build(d, 40, 2, seed=1, start=3)


def test_too_few_tokens_for_any_text_is_an_error(tokenizer: tuple[Tokenizer, Path]) -> None:
    tok, d = tokenizer
    specials = tok.num_special_tokens_to_add(False)
    if specials:
        with pytest.raises(BenchmarkError, match="too small"):
            build(d, specials, 1)
    prompts = build(d, specials + 1, 3)  # one token of text: no room for the prefix, still exact
    assert all(len(tok.encode(p.text).ids) == specials + 1 for p in prompts)


def test_a_missing_tokenizer_is_a_benchmark_error(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="cannot load tokenizer"):
        PromptBuilder.from_tokenizer(tmp_path / "nope", 16)


def test_truncation_in_tokenizer_json_does_not_cap_the_count(tmp_path: Path) -> None:
    tok = _train(600, bos=True)
    tok.enable_truncation(max_length=16)
    tok.save(str(tmp_path / "tokenizer.json"))
    prompts = build(tmp_path, 100, 2)
    tok.no_truncation()
    assert [len(tok.encode(p.text).ids) for p in prompts] == [100, 100]


def test_building_many_prompts_leaves_the_event_loop_free_and_matches_one_by_one(
    tokenizer: tuple[Tokenizer, Path],
) -> None:
    """A worker's event loop (heartbeat-free, but it sends events and polls aborts) keeps
    running while a benchmark prebuilds its prompts with a local tokenizer."""
    _, d = tokenizer

    async def main() -> tuple[list[Prompt], list[Prompt], int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        bulk = await PromptBuilder.from_tokenizer(d, 128).build(40)
        ticker.cancel()
        single = PromptBuilder.from_tokenizer(d, 128)
        return bulk, [await single.prompt(i) for i in range(40)], ticks

    bulk, one_by_one, ticks = asyncio.run(main())
    assert bulk == one_by_one
    assert ticks > 10  # the loop ran on while the prompts were being built
