"""The built-in benchmark client: streams requests at each load level and times every token.

httpx (one client per run, a fresh connection per request); one ``RequestRecord`` per request,
failures included (by kind), per level.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import random
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any, Literal, cast

import httpx

from servetune.bench.prompts import (
    HfTokenCounter,
    Prompt,
    PromptBuilder,
    ServerTokenCounter,
    TokenCounter,
)
from servetune.bench.sse import SseEvent, SseParser
from servetune.core.metrics import LoadLevel, RequestRecord, ServingMetrics, summarize
from servetune.core.spec import StudySpec, Workload
from servetune.engines.base import Endpoint
from servetune.errors import BenchmarkError

log = logging.getLogger(__name__)

MAX_PREBUILT_PROMPTS = 2000
"""Prompts built ahead of a duration-bound level at most; beyond that they are built on demand."""


@dataclass(frozen=True)
class BenchProgress:
    """Where a benchmark stands: requests done (and failed) in the current phase of one level.

    ``total`` is None when the level is bounded by duration instead of a request count.
    """

    level: LoadLevel
    phase: Literal["warmup", "measure"]
    done: int
    failed: int
    total: int | None


ProgressCallback = Callable[[BenchProgress], None]


class _BeforeFirstByte(Exception):
    """A transport failure before any response byte arrived (the request may be re-sent)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        self.message = message
        super().__init__(message)


class _Protocol(Exception):
    """The server's stream broke the OpenAI streaming format (or carried an error object)."""


class _PromptPool:
    """Hands out prompts in order across the whole run, so no two requests share a prompt."""

    def __init__(self, prompts: PromptBuilder | Sequence[Prompt]) -> None:
        self._prompts = prompts
        self._next = 0
        self._wrapped = False

    async def prebuild(self, n: int) -> None:
        """Build the next ``n`` prompts now, outside any measurement (no-op for a list)."""
        if isinstance(self._prompts, PromptBuilder) and n > 0:
            await self._prompts.build(n, start=self._next)

    def take(self) -> int:
        """Reserve the next prompt index (synchronously, so concurrent takers never share one)."""
        i = self._next
        self._next += 1
        return i

    async def get(self, index: int) -> Prompt:
        """Prompt number ``index``: built (or from the cache) for a builder, cycled for a list."""
        if isinstance(self._prompts, PromptBuilder):
            return await self._prompts.prompt(index)
        if index >= len(self._prompts) and not self._wrapped:
            self._wrapped = True
            log.warning(
                "only %d prompts given; reusing them (a prefix cache may flatter later requests)",
                len(self._prompts),
            )
        return self._prompts[index % len(self._prompts)]


class BuiltinClient:
    """Drives an OpenAI-compatible endpoint with streaming requests and records every one.

    Requests: ``POST /v1/completions`` (``prompt``) or ``/v1/chat/completions`` (one user
    message) with ``stream: true``, ``stream_options.include_usage``, ``max_tokens`` =
    ``workload.output_tokens``, ``ignore_eos: true`` (accepted by llama.cpp, vLLM and SGLang;
    ``min_tokens`` is not sent because llama.cpp has no such parameter), ``temperature: 0``.
    Every request opens its own connection and sends ``Connection: close``: llama.cpp's server
    has been seen to drop reused keep-alive connections under concurrent load.

    HTTP goes through httpx: one ``AsyncClient`` per ``run`` (HTTP/1.1, no keep-alive, no
    environment proxies, no cookies; see ``_client``), each request streamed with
    ``send(..., stream=True)``. It costs ~1 ms of client CPU per request on the fake server
    (the hand-written h11 client it replaced cost ~0.4 ms), and a burst of requests sent at once
    pays that inside their TTFTs: ``bench/bench_client.py`` measures the client's capacity and
    its TTFT error per concurrency. ``https`` endpoints use TLS verified against the system's
    trust store; ``api_key`` is sent as ``Authorization: Bearer``. ``sent_s`` is taken before
    the connection is opened, so TTFT includes the TCP connect (as a fresh client's would).

    Timing, all ``time.perf_counter`` seconds: ``sent_s`` just before the request is sent;
    ``chunk_times_s`` the moment httpx handed over the bytes (one HTTP body chunk, from one
    socket read) that completed an SSE event carrying non-empty ``text`` / ``delta.content``
    (or ``delta.reasoning_content``), taken before parsing; ``done_s`` when ``[DONE]`` (or the
    end of the stream) arrived.

    Retries: a request that fails before its first response byte (connect error; connection
    closed or reset with no response: httpx's ConnectError, ReadError / WriteError, or
    RemoteProtocolError "Server disconnected ...") is re-sent up to ``max_retries`` times;
    ``retries`` counts the re-sends and ``sent_s`` is reset to the re-send time, so latencies
    measure the attempt that was answered (the failed attempt shows in ``retries`` /
    ``ServingMetrics.retried``).

    Error kinds (``RequestRecord.error_kind``): ``http_<status>``, ``connect``, ``timeout``
    (``workload.request_timeout_s`` per attempt, in total), ``read`` (connection dropped or
    reset, before the response after the retries, or mid-stream), ``protocol`` (a malformed
    HTTP response, not an SSE stream, bad JSON, an ``error`` object in the stream),
    ``short_output`` (``usage.completion_tokens`` < ``max_tokens``; without usage,
    ``finish_reason: "stop"``), ``no_output`` (no content chunk).

    Output tokens: ``usage.completion_tokens`` when the server sends it (always asked for with
    ``stream_options.include_usage``); else, after each level (never while it is measured), the
    streamed text is counted with the same token counter the prompts were built with (local
    tokenizer or ``/tokenize``) and the record is marked ``output_tokens_estimated``; events
    carrying several tokens get their per-event counts (``count_output_tokens``).

    ``expected_prompt_tokens`` is recorded for the completions API only: for chat, the server
    adds its chat template's tokens, which the client does not know.

    Prompts: given to ``run``, or else built from ``tokenizer`` (a Hugging Face tokenizer
    directory or tokenizer.json; loaded once, prompts cached across runs), or else counted
    through the endpoint's ``/tokenize``.
    """

    def __init__(
        self,
        *,
        tokenizer: str | Path | None = None,
        max_retries: int = 1,
        api_key: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_retries = max_retries
        self.api_key = api_key
        self._builders: dict[tuple[int, int], PromptBuilder] = {}

    @classmethod
    def for_spec(cls, spec: StudySpec) -> BuiltinClient:
        """A client for a study: prompts from the engine's tokenizer, else from /tokenize."""
        return cls(tokenizer=spec.engine.tokenizer)

    async def run(
        self,
        endpoint: Endpoint,
        workload: Workload,
        prompts: PromptBuilder | Sequence[Prompt] | None = None,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> list[tuple[LoadLevel, list[RequestRecord]]]:
        """Benchmark every level of ``workload`` in order; return each level with its records.

        Each level sends ``warmup_requests`` warm-up requests (records flagged ``warmup``), then
        the measured ones: concurrency mode keeps N in flight until ``num_requests`` are done or
        ``duration_s`` has elapsed (then issues no more and lets in-flight ones finish); rate mode
        issues on a Poisson process (exponential gaps seeded by ``workload.seed`` and the level)
        with no cap on in-flight requests. Records are in issue order, warm-ups first.

        Raises BenchmarkError when the prompts cannot be built or do not match the workload;
        request failures are never raised, they are records with an ``error_kind``.
        """
        if prompts is not None:
            counter: TokenCounter = (
                HfTokenCounter(self.tokenizer)
                if self.tokenizer is not None
                else ServerTokenCounter(endpoint.base_url, endpoint.model)
            )
            try:
                return await self._run(endpoint, workload, prompts, on_progress, counter)
            finally:
                await counter.aclose()
        if self.tokenizer is not None:
            key = (workload.input_tokens, workload.seed)
            if key not in self._builders:
                self._builders[key] = PromptBuilder.from_tokenizer(
                    self.tokenizer, workload.input_tokens, seed=workload.seed
                )
            builder = self._builders[key]
            return await self._run(endpoint, workload, builder, on_progress, builder.counter)
        builder = PromptBuilder.from_server(
            endpoint.base_url, workload.input_tokens, model=endpoint.model, seed=workload.seed
        )
        try:
            return await self._run(endpoint, workload, builder, on_progress, builder.counter)
        finally:
            await builder.aclose()

    async def _run(
        self,
        endpoint: Endpoint,
        workload: Workload,
        prompts: PromptBuilder | Sequence[Prompt],
        on_progress: ProgressCallback | None,
        counter: TokenCounter,
    ) -> list[tuple[LoadLevel, list[RequestRecord]]]:
        if isinstance(prompts, PromptBuilder) and prompts.input_tokens != workload.input_tokens:
            raise BenchmarkError(
                f"prompt builder makes {prompts.input_tokens}-token prompts but the workload "
                f"asks for {workload.input_tokens}"
            )
        if not isinstance(prompts, PromptBuilder) and not prompts:
            raise BenchmarkError("no prompts given")
        pool = _PromptPool(prompts)
        path = "/v1/chat/completions" if workload.api == "chat" else "/v1/completions"
        url = _request_url(endpoint.base_url, path)
        async with _client(url, workload, self.api_key) as client:
            sender = _Sender(client, url, endpoint.model, workload, self.max_retries)
            results = []
            for index, level in enumerate(workload.levels()):
                log.info("benchmark level %s: %s", index, level.label)
                records = await self._level(index, level, workload, pool, sender, on_progress)
                results.append((level, await count_output_tokens(records, counter)))
        return results

    async def _level(
        self,
        index: int,
        level: LoadLevel,
        workload: Workload,
        pool: _PromptPool,
        sender: _Sender,
        on_progress: ProgressCallback | None,
    ) -> list[RequestRecord]:
        warm_n = workload.warmup_requests
        if workload.num_requests is not None:
            await pool.prebuild(warm_n + workload.num_requests)
        elif level.request_rate_per_s is not None and workload.duration_s is not None:
            expected = math.ceil(level.request_rate_per_s * workload.duration_s * 1.3) + 8
            await pool.prebuild(warm_n + min(expected, MAX_PREBUILT_PROMPTS))
        else:
            await pool.prebuild(warm_n + 4 * (level.concurrency or 1))

        warm_concurrency = level.concurrency or 1
        warm = await _closed_loop(
            min(warm_concurrency, max(warm_n, 1)),
            warm_n,
            None,
            pool,
            lambda p: sender.send(p, warmup=True),
            _progress(on_progress, level, "warmup", warm_n),
        )
        if workload.duration_s is not None and level.concurrency is not None:
            # Enough prompts for the expected request count, estimated from the warm-up latency.
            lat = [r.done_s - r.sent_s for r in warm if r.ok and r.done_s is not None]
            if lat:
                expected = math.ceil(
                    level.concurrency * workload.duration_s / (sum(lat) / len(lat)) * 1.2
                )
                await pool.prebuild(min(expected, MAX_PREBUILT_PROMPTS))

        report = _progress(on_progress, level, "measure", workload.num_requests)
        deadline = (
            None if workload.duration_s is None else time.perf_counter() + workload.duration_s
        )
        measured: list[RequestRecord]
        if level.concurrency is not None:
            measured = await _closed_loop(
                level.concurrency,
                workload.num_requests,
                deadline,
                pool,
                lambda p: sender.send(p, warmup=False),
                report,
            )
        else:
            assert level.request_rate_per_s is not None
            rng = random.Random(f"servetune-arrivals:{workload.seed}:{index}")
            measured = await _open_loop(
                level.request_rate_per_s,
                rng,
                workload.num_requests,
                deadline,
                pool,
                lambda p: sender.send(p, warmup=False),
                report,
            )
        return warm + measured


def _progress(
    cb: ProgressCallback | None,
    level: LoadLevel,
    phase: Literal["warmup", "measure"],
    total: int | None,
) -> Callable[[RequestRecord], None]:
    counts = [0, 0]

    def done(record: RequestRecord) -> None:
        counts[0] += 1
        counts[1] += 0 if record.ok else 1
        if cb is not None:
            cb(
                BenchProgress(
                    level=level, phase=phase, done=counts[0], failed=counts[1], total=total
                )
            )

    return done


async def _closed_loop(
    concurrency: int,
    total: int | None,
    deadline: float | None,
    pool: _PromptPool,
    send: Callable[[Prompt], Awaitable[RequestRecord]],
    done: Callable[[RequestRecord], None],
) -> list[RequestRecord]:
    """Keep ``concurrency`` requests in flight until ``total`` were issued or ``deadline`` passed.

    Returns the records in issue order.
    """
    slots: list[RequestRecord | None] = []

    async def worker() -> None:
        while True:
            if total is not None and len(slots) >= total:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            i = len(slots)
            slots.append(None)
            prompt = await pool.get(pool.take())
            record = await send(prompt)
            slots[i] = record
            done(record)

    if total == 0:
        return []
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return [r for r in slots if r is not None]


async def _open_loop(
    rate_per_s: float,
    rng: random.Random,
    total: int | None,
    deadline: float | None,
    pool: _PromptPool,
    send: Callable[[Prompt], Awaitable[RequestRecord]],
    done: Callable[[RequestRecord], None],
) -> list[RequestRecord]:
    """Issue requests at Poisson arrival times, with no cap on how many are in flight.

    The first goes at once, the next after exponential gaps of mean ``1 / rate_per_s``, on an
    absolute schedule (a late send does not delay the ones after it). Records in issue order.
    """
    tasks: list[asyncio.Task[RequestRecord]] = []

    async def one(prompt: Prompt) -> RequestRecord:
        record = await send(prompt)
        done(record)
        return record

    async with asyncio.TaskGroup() as tg:
        t_next = time.perf_counter()
        for n in itertools.count():
            if total is not None and n >= total:
                break
            if deadline is not None and t_next >= deadline:
                break
            delay = t_next - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            prompt = await pool.get(pool.take())
            tasks.append(tg.create_task(one(prompt)))
            t_next += rng.expovariate(rate_per_s)
    return [t.result() for t in tasks]


def _request_url(base_url: str, path: str) -> httpx.URL:
    """``base_url`` (any path prefix kept, query dropped) joined with ``path``.

    Raises BenchmarkError unless ``base_url`` is ``http(s)://host[:port][/prefix]``.
    """
    try:
        u = httpx.URL(base_url)
    except httpx.InvalidURL as e:
        raise BenchmarkError(f"endpoint URL {base_url!r} is not valid: {e}") from e
    if u.scheme not in ("http", "https") or not u.host:
        raise BenchmarkError(
            f"endpoint URL must be http(s)://host[:port][/prefix], got {base_url!r}"
        )
    return u.copy_with(path=u.path.rstrip("/") + path, query=None, fragment=None)


def _client(url: httpx.URL, workload: Workload, api_key: str | None) -> httpx.AsyncClient:
    """The one HTTP client of a run, for requests to ``url`` only.

    HTTP/1.1. ``max_keepalive_connections=0`` and ``Connection: close``: a fresh connection per
    request (see ``BuiltinClient``); ``max_connections=None``: no pool cap, so the client never
    queues a request (rate mode has no cap on requests in flight). ``trust_env=False``: no
    proxies from the environment (a benchmark must reach the endpoint directly). Cookies are
    never stored or sent: each request stands for a new user (a load balancer's sticky cookie
    would otherwise pin them all to one replica). ``Accept-Encoding: identity``: a compressed
    stream would be buffered. TLS verifies against the system's trust store, as
    ``ssl.create_default_context()`` does; for ``http`` a bare context is passed instead (it is
    never used, and loading a trust store costs ~20 ms per run).
    """
    headers = {
        "User-Agent": "servetune",
        "Accept": "text/event-stream",
        "Accept-Encoding": "identity",
        "Content-Type": "application/json",
        "Connection": "close",
    }
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return httpx.AsyncClient(
        headers=headers,
        cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
        timeout=httpx.Timeout(workload.request_timeout_s),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
        http1=True,
        http2=False,
        trust_env=False,
        verify=(
            ssl.create_default_context()
            if url.scheme == "https"
            else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ),
    )


# What httpx says when the peer closed the connection early: before the response (httpcore's
# message) or inside the body (h11's). Any other RemoteProtocolError is a malformed response.
# The drop tests in tests/integration/test_bench_client.py pin these messages down.
_CLOSED_EARLY = ("Server disconnected", "peer closed connection")


def _closed_early(e: httpx.RemoteProtocolError) -> bool:
    return str(e).startswith(_CLOSED_EARLY)


class _Sender:
    """Sends one streaming request (with its retry) and turns what happened into a RequestRecord."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: httpx.URL,
        model: str,
        workload: Workload,
        max_retries: int,
    ) -> None:
        self.client = client
        self.url = url
        self.chat = workload.api == "chat"
        self.max_tokens = workload.output_tokens
        self.timeout_s = workload.request_timeout_s
        self.max_retries = max_retries
        self.base: dict[str, Any] = {
            "model": model,
            "max_tokens": workload.output_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    def body(self, prompt: Prompt) -> bytes:
        if self.chat:
            doc = {**self.base, "messages": [{"role": "user", "content": prompt.text}]}
        else:
            doc = {**self.base, "prompt": prompt.text}
        return json.dumps(doc).encode()

    async def send(self, prompt: Prompt, *, warmup: bool) -> RequestRecord:
        body = self.body(prompt)
        retries = 0
        while True:
            state = _Stream()
            state.sent_s = time.perf_counter()
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._attempt(body, state)
            except _BeforeFirstByte as e:
                if retries < self.max_retries:
                    retries += 1
                    log.debug("re-sending after %s before the first byte: %s", e.kind, e.message)
                    continue
                state.fail(e.kind, e.message)
            except (TimeoutError, httpx.TimeoutException):
                # asyncio.timeout bounds the whole attempt; httpx's own timeouts (the same value
                # for each connect / read / write) are a backstop that cannot fire earlier.
                state.fail("timeout", f"no complete response within {self.timeout_s:g} s")
            return state.record(
                expected_prompt_tokens=None if self.chat else prompt.token_count,
                max_tokens=self.max_tokens,
                retries=retries,
                warmup=warmup,
            )

    async def _attempt(self, body: bytes, state: _Stream) -> None:
        """One attempt; the adapter from httpx errors to error kinds.

        Raises ``_BeforeFirstByte`` when the attempt may be re-sent, httpx.TimeoutException on
        a timeout; every other failure is recorded in ``state``.
        """
        try:
            response = await self.client.send(
                self.client.build_request("POST", self.url, content=body), stream=True
            )
        except httpx.TimeoutException:
            raise
        except httpx.ConnectError as e:
            raise _BeforeFirstByte("connect", _describe(e)) from e
        except httpx.RemoteProtocolError as e:
            if not _closed_early(e):  # a malformed response: bytes came, it is not re-sent
                state.fail("protocol", _describe(e))
                return
            raise _BeforeFirstByte("read", _describe(e)) from e
        except (httpx.ReadError, httpx.WriteError) as e:  # reset before the response
            raise _BeforeFirstByte("read", _describe(e)) from e
        except httpx.TransportError as e:
            state.fail("protocol", _describe(e))
            return
        try:
            await self._read(response, state)
        except httpx.TimeoutException:
            raise
        except httpx.RemoteProtocolError as e:
            state.fail("read" if _closed_early(e) else "protocol", _describe(e))
        except httpx.TransportError as e:  # reset mid-stream
            state.fail("read", _describe(e))
        except httpx.DecodingError as e:
            state.fail("protocol", _describe(e))
        except _Protocol as e:
            state.fail("protocol", str(e))
        finally:
            await response.aclose()

    async def _read(self, response: httpx.Response, state: _Stream) -> None:
        status = response.status_code
        ctype = response.headers.get("content-type", "")
        if status >= 300 or "json" in ctype:
            text = (await _read_body(response)).decode("utf-8", "replace")
            if status >= 300:
                state.fail(f"http_{status}", text[:500])
                return
            raise _Protocol(f"expected an SSE stream, got {ctype}: {text[:300]}")
        parser = SseParser()
        # Closed at [DONE] at once, not later by the loop's async-generator hook (a task each).
        # aiter_bytes is an async generator, typed only as an AsyncIterator.
        stream = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
        async with contextlib.aclosing(stream) as chunks:
            async for data in chunks:
                now = time.perf_counter()  # as soon as httpx hands the bytes over, before parsing
                for sse in parser.feed(data):
                    if state.on_event(sse, now):
                        return
        now = time.perf_counter()
        for sse in parser.flush():
            if state.on_event(sse, now):
                return
        state.done_s = now


async def _read_body(response: httpx.Response, limit: int = 65536) -> bytes:
    """The rest of a (short) response body, at most ``limit`` bytes kept."""
    out = bytearray()
    async for data in response.aiter_bytes():
        out += data[: max(0, limit - len(out))]
    return bytes(out)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class _Stream:
    """What one attempt saw so far."""

    __slots__ = (
        "chunk_times",
        "done_s",
        "error",
        "error_kind",
        "finish_reason",
        "sent_s",
        "texts",
        "usage",
    )

    def __init__(self) -> None:
        self.sent_s = 0.0
        self.chunk_times: list[float] = []
        self.texts: list[str] = []
        self.done_s: float | None = None
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.error_kind: str | None = None
        self.error: str | None = None

    def fail(self, kind: str, message: str) -> None:
        if self.error_kind is None:
            self.error_kind, self.error = kind, message
        if self.done_s is None:
            self.done_s = time.perf_counter()

    def on_event(self, event: SseEvent, now: float) -> bool:
        """Account one SSE event that arrived at ``now``; True at ``[DONE]``."""
        data = event.data
        if data == "[DONE]":
            self.done_s = now
            return True
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise _Protocol(f"event data is not JSON: {data[:200]!r}") from e
        if not isinstance(obj, dict):
            raise _Protocol(f"event data is not a JSON object: {data[:200]!r}")
        if obj.get("error"):
            raise _Protocol(f"error in stream: {json.dumps(obj['error'])[:300]}")
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        text = ""
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                raise _Protocol(f"choice is not an object: {data[:200]!r}")
            delta = choice.get("delta")
            parts = [choice.get("text")]
            if isinstance(delta, dict):
                parts += [delta.get(k) for k in ("reasoning_content", "reasoning", "content")]
            text += "".join(p for p in parts if isinstance(p, str))
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if text:
            self.chunk_times.append(now)
            self.texts.append(text)
        return False

    def record(
        self, *, expected_prompt_tokens: int | None, max_tokens: int, retries: int, warmup: bool
    ) -> RequestRecord:
        usage = self.usage or {}
        completion = usage.get("completion_tokens")
        prompt_tokens = usage.get("prompt_tokens")
        # Without usage: one token per event until _count_outputs counts the text (estimated).
        estimated = not isinstance(completion, int)
        output_tokens = len(self.chunk_times) if estimated else completion
        if self.error_kind is None:
            if not self.chunk_times:
                self.fail("no_output", "the stream carried no content")
            elif isinstance(completion, int) and completion < max_tokens:
                self.fail(
                    "short_output",
                    f"usage.completion_tokens={completion} < max_tokens={max_tokens}",
                )
            elif completion is None and self.finish_reason == "stop":
                self.fail(
                    "short_output", f"finish_reason=stop after {len(self.chunk_times)} chunks"
                )
        return RequestRecord(
            sent_s=self.sent_s,
            chunk_times_s=tuple(self.chunk_times),
            done_s=self.done_s,
            prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
            output_tokens=output_tokens,
            output_tokens_estimated=estimated,
            max_tokens=max_tokens,
            event_texts=tuple(self.texts),
            expected_prompt_tokens=expected_prompt_tokens,
            error_kind=self.error_kind,
            error=self.error,
            retries=retries,
            warmup=warmup,
        )


async def count_output_tokens(
    records: Sequence[RequestRecord], counter: TokenCounter | None
) -> list[RequestRecord]:
    """Count, with the model's tokenizer, the output tokens the server did not report; same order.

    Run after a level, never while it is measured. For a record without ``usage``
    (``output_tokens_estimated``) ``output_tokens`` becomes the token count of its whole
    streamed text. For any record with more tokens than events (several tokens per event),
    ``event_tokens`` becomes the count of each event's text. Counts exclude the special tokens
    the counter adds (its count of the empty string, e.g. BOS). Every record leaves without
    ``event_texts``. When ``counter`` is None or cannot count (BenchmarkError, e.g. no
    ``/tokenize``), estimated records keep one token per event and stay marked estimated.
    """
    if counter is None:
        return [r.model_copy(update={"event_texts": None}) for r in records]
    try:
        whole = {
            "".join(r.event_texts) for r in records if r.event_texts and r.output_tokens_estimated
        }
        totals = await _counts(counter, whole)
        out: list[RequestRecord] = []
        per_event: set[str] = set()
        for r in records:
            if r.event_texts and r.output_tokens_estimated:
                r = r.model_copy(update={"output_tokens": totals["".join(r.event_texts)]})
            if r.event_texts and (r.output_tokens or 0) > len(r.event_texts):
                per_event.update(r.event_texts)
            out.append(r)
        events = await _counts(counter, per_event)
    except BenchmarkError as e:
        log.warning("cannot count output tokens (kept one per event, estimated): %s", e)
        return [r.model_copy(update={"event_texts": None}) for r in records]
    update: dict[str, Any]
    for i, r in enumerate(out):
        update = {"event_texts": None}
        if r.event_texts and (r.output_tokens or 0) > len(r.event_texts):
            update["event_tokens"] = tuple(events[t] for t in r.event_texts)
        out[i] = r.model_copy(update=update)
    return out


async def _counts(counter: TokenCounter, texts: set[str]) -> dict[str, int]:
    """Token count of each text, without the special tokens the counter adds (BOS…)."""
    if not texts:
        return {}
    order = ["", *sorted(texts - {""})]
    n = await counter.count(order)
    return {t: max(0, k - n[0]) for t, k in zip(order, n, strict=True)}


async def served_model(base_url: str, *, timeout_s: float = 10.0) -> str:
    """The first model id ``GET /v1/models`` lists. Raises BenchmarkError if there is none."""
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            r = await client.get(base_url.rstrip("/") + "/v1/models")
            r.raise_for_status()
            return str(r.json()["data"][0]["id"])
    except httpx.HTTPError as e:
        raise BenchmarkError(f"cannot list models at {base_url}/v1/models: {e}") from e
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchmarkError(f"{base_url}/v1/models lists no model: {e!r}") from e


async def bench_endpoint(
    url: str,
    model: str | None,
    workload: Workload,
    tokenizer: str | None,
    *,
    on_progress: ProgressCallback | None = None,
) -> list[ServingMetrics]:
    """Benchmark a running OpenAI-compatible server (``servetune bench URL``): metrics per level.

    ``model`` None = the first id of ``GET /v1/models``; ``tokenizer`` None = count prompt
    tokens through the server's ``/tokenize``. Raises BenchmarkError if the server cannot be
    asked for its model or the prompts cannot be built.
    """
    url = url.rstrip("/")
    if model is None:
        model = await served_model(url)
    client = BuiltinClient(tokenizer=tokenizer)
    results = await client.run(Endpoint(url, model), workload, on_progress=on_progress)
    return [
        summarize(level, records, prompt_token_tolerance=workload.prompt_token_tolerance)
        for level, records in results
    ]
