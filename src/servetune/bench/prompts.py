"""Synthetic benchmark prompts of an exact token length, counted with the model's own tokenizer.

Tokens are counted by a local Hugging Face tokenizer (``tokenizers``) or the server's /tokenize.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
from tokenizers import Tokenizer

from servetune.bench.http_errors import describe
from servetune.errors import BenchmarkError

log = logging.getLogger(__name__)

# Appended one at a time to close the last few tokens of the gap; short, common, usually 1 token.
_FILLERS = (
    " a",
    " I",
    " x",
    ".",
    ",",
    " of",
    " the",
    "!",
    "?",
    " o",
    " e",
    "-",
    ";",
    " 1",
    "a",
    "s",
)


@dataclass(frozen=True, slots=True)
class Prompt:
    """One benchmark prompt: its text and its length in tokens as the server counts it."""

    text: str
    token_count: int


class TokenCounter(Protocol):
    """Counts tokens the way the serving engine does (special tokens such as BOS included)."""

    async def count(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text, in order. Raises BenchmarkError if it cannot count."""
        ...

    async def aclose(self) -> None:
        """Release what the counter holds (HTTP connections)."""
        ...


class HfTokenCounter:
    """Counts with a local Hugging Face tokenizer: a ``tokenizer.json`` or a directory holding one.

    Counts include the special tokens the tokenizer's post-processor adds (e.g. BOS), as llama.cpp
    and vLLM do for ``/v1/completions`` prompts. Raises BenchmarkError if the file cannot be loaded.
    """

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise BenchmarkError(
                f"cannot load tokenizer {file}: {e}; give a Hugging Face tokenizer directory or "
                "tokenizer.json, or none to count through the server's /tokenize"
            ) from e
        self._tok.no_truncation()
        self._tok.no_padding()

    async def count(self, texts: Sequence[str]) -> list[int]:
        """Token counts, special tokens included (see class docstring)."""
        return [len(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=True)]

    async def aclose(self) -> None:
        """Nothing to release."""


class ServerTokenCounter:
    """Counts through the server's ``POST /tokenize``.

    llama.cpp form first: ``{"content": text, "add_special": true}`` → ``{"tokens": [...]}``
    (llama.cpp ``tools/server/README.md``); if the server rejects it (4xx), vLLM's form
    ``{"model": m, "prompt": text, "add_special_tokens": true}``. At most ``max_in_flight``
    requests at once. Raises BenchmarkError when the server cannot tokenize.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        timeout_s: float = 30.0,
        max_in_flight: int = 8,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._url = base_url.rstrip("/") + "/tokenize"
        self._model = model
        self._timeout_s = timeout_s
        self._client = httpx.AsyncClient(timeout=timeout_s, headers=headers, trust_env=False)
        self._sem = asyncio.Semaphore(max_in_flight)
        self._vllm_form = False

    async def count(self, texts: Sequence[str]) -> list[int]:
        """Token counts, special tokens included."""
        return list(await asyncio.gather(*(self._count_one(t) for t in texts)))

    async def _count_one(self, text: str) -> int:
        async with self._sem:
            try:
                if not self._vllm_form:
                    r = await self._client.post(
                        self._url, json={"content": text, "add_special": True}
                    )
                    if 400 <= r.status_code < 500:
                        log.debug(
                            "llama.cpp /tokenize form rejected (%s); trying vLLM's", r.status_code
                        )
                        self._vllm_form = True
                if self._vllm_form:
                    body: dict[str, object] = {"prompt": text, "add_special_tokens": True}
                    if self._model:
                        body["model"] = self._model
                    r = await self._client.post(self._url, json=body)
                r.raise_for_status()
                tokens = r.json()["tokens"]
            except httpx.HTTPError as e:
                raise BenchmarkError(
                    f"cannot count tokens through {self._url}: {describe(e, self._timeout_s)}; "
                    "give the model's tokenizer "
                    "(engine.tokenizer in the spec, --tokenizer on the command line) instead"
                ) from e
            except (ValueError, KeyError, TypeError) as e:
                raise BenchmarkError(f"{self._url} answered without a token list: {e!r}") from e
        if not isinstance(tokens, list):
            raise BenchmarkError(f"{self._url} answered tokens={tokens!r}, not a list")
        return len(tokens)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


@functools.cache
def _vocabulary() -> tuple[str, ...]:
    """English-ish words that ship with Python: the sorted distinct words of pydoc_data.topics."""
    from pydoc_data.topics import topics

    words = {w for text in topics.values() for w in re.findall(r"[A-Za-z]{2,12}", text)}
    return tuple(sorted(words))


class PromptBuilder:
    """Builds distinct prompts of exactly ``input_tokens`` tokens, deterministically from ``seed``.

    Prompt ``i`` is ``"<i>."`` (a distinct prefix, so a prefix cache cannot make later requests
    cheaper) followed by words drawn from Python's own documentation with a RNG seeded by
    (seed, i). The length is fitted by a loop over the counter: interpolation/bisection on the
    number of words to the longest text within budget, then short fillers appended until the count
    is exact, then the count is the one verified. ``token_count`` includes special tokens (BOS),
    so it equals ``usage.prompt_tokens`` for ``/v1/completions``. For the chat API the server adds
    its chat template's tokens on top; the benchmark client therefore records an expected prompt
    length for the completions API only.

    If ``input_tokens`` is so small that the prefix alone does not fit, prompts are words only.
    Raises BenchmarkError when no text of exactly ``input_tokens`` tokens can be found.
    """

    def __init__(self, counter: TokenCounter, input_tokens: int, *, seed: int = 0) -> None:
        if input_tokens < 1:
            raise ValueError(f"input_tokens must be ≥ 1, got {input_tokens}")
        self.counter = counter
        self.input_tokens = input_tokens
        self.seed = seed
        self._cache: dict[int, Prompt] = {}

    @classmethod
    def from_tokenizer(cls, path: str | Path, input_tokens: int, *, seed: int = 0) -> PromptBuilder:
        """Count with a local Hugging Face tokenizer (directory or tokenizer.json)."""
        return cls(HfTokenCounter(path), input_tokens, seed=seed)

    @classmethod
    def from_server(
        cls, base_url: str, input_tokens: int, *, model: str | None = None, seed: int = 0
    ) -> PromptBuilder:
        """Count through the server's ``/tokenize``; call ``aclose()`` when done."""
        return cls(ServerTokenCounter(base_url, model), input_tokens, seed=seed)

    async def aclose(self) -> None:
        """Release the counter's resources."""
        await self.counter.aclose()

    async def prompt(self, index: int) -> Prompt:
        """Prompt number ``index`` (≥ 0), built once and cached."""
        cached = self._cache.get(index)
        if cached is None:
            cached = self._cache[index] = await self._fit(index)
        return cached

    async def build(self, n: int, start: int = 0) -> list[Prompt]:
        """Prompts ``start`` … ``start + n − 1``, built concurrently (helps a server counter).

        With a local tokenizer (``HfTokenCounter``) counting is CPU work that never yields
        (about 12 ms per 1,000-token prompt, so the 2,000 prompts built before a long level
        would hold the caller's event loop for ~24 s): those are built in a worker thread, on
        an event loop of its own, and the caller's loop keeps running meanwhile.
        """
        if isinstance(self.counter, HfTokenCounter) and n > 1:
            return await asyncio.to_thread(asyncio.run, self._build(start, n))
        return await self._build(start, n)

    async def _build(self, start: int, n: int) -> list[Prompt]:
        return list(await asyncio.gather(*(self.prompt(i) for i in range(start, start + n))))

    async def _count(self, text: str) -> int:
        return (await self.counter.count([text]))[0]

    async def _fit(self, index: int) -> Prompt:
        target = self.input_tokens
        rng = random.Random(f"servetune-prompt:{self.seed}:{index}")
        vocab = _vocabulary()
        prefix = f"{index}."
        if await self._count(prefix) > target:
            prefix = ""
            if await self._count("") >= target:
                raise BenchmarkError(
                    f"input_tokens={target} is too small: the special tokens leave no room for text"
                )
        words = rng.choices(vocab, k=target + 8)

        def text(k: int) -> str:
            body = " ".join(words[:k])
            return f"{prefix} {body}" if prefix and body else prefix + body

        # Bracket: count(text(lo)) <= target < count(text(hi)).
        lo, c_lo = 0, await self._count(text(0))
        hi, c_hi = len(words), await self._count(text(len(words)))
        while c_hi <= target:  # rare: words shorter than a token each; draw more
            words += rng.choices(vocab, k=target)
            hi, c_hi = len(words), await self._count(text(len(words)))
        step = 0
        while hi - lo > 1 and c_lo < target:
            step += 1
            if step % 3:  # interpolate (counts grow ~linearly in words) …
                k = lo + round((target - c_lo) * (hi - lo) / (c_hi - c_lo))
            else:  # … with a bisection every third step so a bad guess cannot stall
                k = (lo + hi) // 2
            k = min(max(k, lo + 1), hi - 1)
            c = await self._count(text(k))
            if c <= target:
                lo, c_lo = k, c
            else:
                hi, c_hi = k, c
        found = await self._pad(text(lo), c_lo, target)
        # The next word overshot and no filler closed the gap: give back a word or two and retry.
        back = lo
        while found is None and back > 0:
            back -= 1
            t = text(back)
            found = await self._pad(t, await self._count(t), target)
            if lo - back >= 3:
                break
        if found is None:
            raise BenchmarkError(
                f"cannot build a prompt of exactly {target} tokens with this tokenizer"
            )
        return Prompt(found, target)

    async def _pad(self, text: str, count: int, target: int) -> str | None:
        """Append fillers to ``text`` (``count`` tokens) up to ``target`` tokens; None if stuck."""
        for _ in range(4 * (target - count) + 8):
            if count == target:
                return text
            candidates = [text + f for f in _FILLERS]
            counts = await self.counter.count(candidates)
            exact = [c for c, n in zip(candidates, counts, strict=True) if n == target]
            if exact:
                return exact[0]
            growing = [
                (n, c) for c, n in zip(candidates, counts, strict=True) if count < n < target
            ]
            if not growing:
                return None
            count, text = min(growing)  # the smallest step keeps the most room to land exactly
        return None
