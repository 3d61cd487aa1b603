"""The built-in benchmark client and prompt builder against a real llama.cpp server (tiny model)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from servetune.bench.builtin import BuiltinClient
from servetune.bench.prompts import Prompt, PromptBuilder
from servetune.core.metrics import summarize
from servetune.core.spec import Workload
from servetune.engines.base import Endpoint
from servetune.modelgen import ModelFiles
from tests.integration.llamacpp_helpers import server_process

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llama_url(tiny_model: ModelFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A llama.cpp server (xllamacpp) on the tiny model, 2 slots; stopped after the module."""
    log = tmp_path_factory.mktemp("llama") / "server.log"
    params = {"parallel": 2, "ctx-size": 2048, "threads": 1}
    with server_process(tiny_model.gguf_path, log, params) as url:
        yield url


def test_prompts_from_the_tokenizer_and_from_tokenize_agree_with_llamacpp(
    tiny_model: ModelFiles, llama_url: str
) -> None:
    async def go() -> tuple[list[Prompt], list[Prompt]]:
        local = await PromptBuilder.from_tokenizer(tiny_model.tokenizer_dir, 57, seed=5).build(6)
        remote = PromptBuilder.from_server(llama_url, 57, seed=5)
        try:
            return local, await remote.build(6)
        finally:
            await remote.aclose()

    local, remote = asyncio.run(go())
    assert local == remote  # same counts on both sides, so the fitting loop lands on the same text
    assert all(p.token_count == 57 for p in local)


def test_completions_against_llamacpp_honour_lengths_and_count_prompt_tokens_exactly(
    tiny_model: ModelFiles, llama_url: str
) -> None:
    wl = Workload(
        input_tokens=48,
        output_tokens=12,
        concurrency=[1, 2],
        num_requests=5,
        warmup_requests=1,
        seed=11,
    )
    client = BuiltinClient(tokenizer=tiny_model.tokenizer_dir)
    results = asyncio.run(client.run(Endpoint(llama_url, "tiny"), wl))
    for level, records in results:
        assert len(records) == 6
        m = summarize(level, records)
        assert (m.completed, m.failed, m.warmup) == (5, 0, 1), [r.error for r in records]
        assert m.mean_output_tokens == 12  # ignore_eos honoured: fixed output length
        assert all(r.prompt_tokens == r.expected_prompt_tokens == 48 for r in records)
        assert m.ttft_ms is not None and m.tpot_ms is not None


def test_chat_against_llamacpp_reports_the_template_tokens_on_top(
    tiny_model: ModelFiles, llama_url: str
) -> None:
    wl = Workload(
        api="chat",
        input_tokens=40,
        output_tokens=8,
        concurrency=[2],
        num_requests=4,
        warmup_requests=0,
    )
    results = asyncio.run(BuiltinClient().run(Endpoint(llama_url, "tiny"), wl))
    records = results[0][1]
    assert len(records) == 4
    for r in records:
        assert r.expected_prompt_tokens is None
        assert r.output_tokens == 8
        # llama.cpp wraps the 40-token message in its chat template.
        assert r.prompt_tokens is not None and r.prompt_tokens > 40
