"""The built-in benchmark client: streams requests at each load level and times every token.

httpx (one client per run, keep-alive connections opened before the clock starts, optionally
spread over several processes); one ``RequestRecord`` per request, failures included, per level.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib.metadata
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import ssl
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpcore
import httpx

from servetune.bench.http_errors import describe
from servetune.bench.prompts import (
    HfTokenCounter,
    Prompt,
    PromptBuilder,
    ServerTokenCounter,
    TokenCounter,
)
from servetune.bench.sse import SseEvent, SseParser
from servetune.bench.transport import Http11Connection, Http11Response
from servetune.core.metrics import LoadLevel, RequestRecord, ServingMetrics, percentile, summarize
from servetune.core.slo import Slo, request_bounds
from servetune.core.spec import StudySpec, Workload
from servetune.engines.base import Endpoint
from servetune.errors import BenchmarkError

log = logging.getLogger(__name__)


@functools.cache
def servetune_version() -> str:
    """servetune's installed version (``unknown`` when run from a tree that is not installed)."""
    try:
        return importlib.metadata.version("servetune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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


CLIENT_CPU_SATURATED = 0.9
"""Client CPU seconds per wall second at or above which the client, not the server, set the pace."""

CLIENT_LAG_SATURATED_MS = 10.0
"""Event-loop lag p99 (ms) at or above which responses waited unread in the client's buffers."""

LAG_PROBE_INTERVAL_S = 0.01
"""How often the event-loop lag probe asks to wake up during a measured phase."""

FAIL_FAST_AFTER = 3
"""A level stops issuing requests once this many finished in a row, all failing the same way."""

AUTO_CONCURRENCY_PER_PROCESS = 128
"""``processes=None`` uses one client process per this many requests in flight (up to the cores).

At 256 in flight the previous client saturated its one core on the fake server (issue 5, item 9);
``make bench`` reports the current client's rate per core."""

AUTO_RATE_PER_PROCESS = 400.0
"""``processes=None`` uses one client process per this many requests/s of a rate level."""

WARM_CONNECT_TIMEOUT_S = 10.0
"""Longest wait for the unmeasured requests that open the keep-alive connections of a level."""


@dataclass(frozen=True)
class ClientLoad:
    """How hard the client itself worked in one level's measured phase: was it the bottleneck?

    ``loop_lag_p99_ms`` / ``loop_lag_max_ms``: how late a probe task that sleeps
    ``LAG_PROBE_INTERVAL_S`` at a time woke up (p99 and max over the phase; the worst process
    when there are several). Every ms of lag is a ms a response sat unread, added to TTFT and
    ITL. ``cpu_fraction``: CPU seconds of the client process / wall seconds of the phase (the
    busiest process); near 1.0 the client's core, not the server, set the pace. ``processes``:
    client processes used. ``stopped_early``: why the level stopped issuing requests before its
    planned count or duration (None when it did not). ``cpu_s``: CPU seconds of every client
    process in the measured phase (requests / ``cpu_s`` = the rate one core can drive).
    """

    loop_lag_p99_ms: float
    loop_lag_max_ms: float
    cpu_fraction: float
    processes: int = 1
    stopped_early: str | None = None
    cpu_s: float = 0.0

    @property
    def saturated(self) -> bool:
        """True when the client was the bottleneck (CPU or event-loop lag over its threshold)."""
        return (
            self.cpu_fraction >= CLIENT_CPU_SATURATED
            or self.loop_lag_p99_ms >= CLIENT_LAG_SATURATED_MS
        )

    def metrics_fields(self) -> dict[str, float]:
        """The fields ``ServingMetrics`` carries: ``client_loop_lag_p99_ms``, ``client_cpu_fraction``."""
        return {
            "client_loop_lag_p99_ms": self.loop_lag_p99_ms,
            "client_cpu_fraction": self.cpu_fraction,
        }

    @staticmethod
    def merge(loads: Sequence[ClientLoad]) -> ClientLoad:
        """One load for several processes: the worst lag and CPU, the first early-stop reason."""
        return ClientLoad(
            loop_lag_p99_ms=max(x.loop_lag_p99_ms for x in loads),
            loop_lag_max_ms=max(x.loop_lag_max_ms for x in loads),
            cpu_fraction=max(x.cpu_fraction for x in loads),
            processes=sum(x.processes for x in loads),
            stopped_early=next((x.stopped_early for x in loads if x.stopped_early), None),
            cpu_s=sum(x.cpu_s for x in loads),
        )


class _LoadProbe:
    """Measures the event-loop lag (a task that sleeps and notes how late it woke) and CPU use."""

    def __init__(self) -> None:
        self.lags_s: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._cpu0 = 0.0
        self._wall0 = 0.0

    def start(self) -> None:
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(LAG_PROBE_INTERVAL_S)
            self.lags_s.append(max(0.0, time.perf_counter() - t - LAG_PROBE_INTERVAL_S))

    async def stop(self, stopped_early: str | None) -> ClientLoad:
        wall = time.perf_counter() - self._wall0
        cpu = time.process_time() - self._cpu0
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        lags = sorted(self.lags_s) or [0.0]
        return ClientLoad(
            loop_lag_p99_ms=percentile(lags, 99) * 1e3,
            loop_lag_max_ms=lags[-1] * 1e3,
            cpu_fraction=cpu / wall if wall > 0 else 0.0,
            stopped_early=stopped_early,
            cpu_s=cpu,
        )


class _FailFast:
    """Trips when the first ``FAIL_FAST_AFTER`` finished requests of a level (warm-ups included)
    all failed with the same error kind; a success or a second kind disarms it for the level."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.kind: str | None = None
        self.count = 0
        self.armed = True
        self.reason: str | None = None

    def see(self, record: RequestRecord) -> None:
        if not self.armed or self.reason is not None:
            return
        if record.ok:
            self.armed = False
            return
        if self.kind is None:
            self.kind = record.error_kind
        elif record.error_kind != self.kind:
            self.armed = False
            return
        self.count += 1
        if self.count >= FAIL_FAST_AFTER:
            why = f": {' '.join((record.error or '').split())[:200]}" if record.error else ""
            self.reason = (
                f"{self.label}: stopped early, the first {self.count} requests all failed with "
                f"{self.kind}{why}"
            )

    @property
    def tripped(self) -> bool:
        return self.reason is not None


class BuiltinClient:
    """Drives an OpenAI-compatible endpoint with streaming requests and records every one.

    Requests: ``POST /v1/completions`` (``prompt``) or ``/v1/chat/completions`` (one user
    message) with ``stream: true``, ``stream_options.include_usage``, ``max_tokens`` =
    ``workload.output_tokens``, ``ignore_eos: true`` (accepted by llama.cpp, vLLM and SGLang;
    ``min_tokens`` is not sent because llama.cpp has no such parameter), ``temperature: 0``.

    Connections: HTTP/1.1 keep-alive, a pool as large as the level's concurrency. Before each
    level's measured phase the client opens that many connections with unmeasured
    ``GET /v1/models`` requests sent at once, so no measured request pays a TCP connect (nor
    queues behind other connects) inside its TTFT. A request that fails before its first
    response byte (a pooled connection the server had closed, a reset, a refused connect) is
    re-sent once on a *new* connection (a second client that never reuses one); its record
    counts once, with ``retries`` = 1. In rate mode the pool is not capped: a request finding no
    idle connection opens one inside its TTFT (rate levels warm ``min(rate, 256)`` connections).

    Processes: ``processes`` client processes (None: one per ``AUTO_CONCURRENCY_PER_PROCESS``
    in flight or ``AUTO_RATE_PER_PROCESS`` requests/s, up to the usable cores) share each level:
    the concurrency (or rate) and the request count are split between them, prompts are built
    in this process, and records are merged in send order. Timestamps are
    ``time.perf_counter`` (CLOCK_MONOTONIC on Linux: one clock for every process), so merged
    records are on one time line. Progress is then reported when the level ends.

    HTTP goes through httpcore's HTTP/1.1 connections (httpx's own transport) handed out by
    ``_Pool`` (why not httpx's pool: see there). ``https`` endpoints use TLS verified against
    the system's trust store; ``api_key`` is sent as ``Authorization: Bearer``; ``headers`` are
    added to every request (they win over the defaults, see ``_headers``); no proxy from the
    environment is used and no cookie is ever stored. ``bench/bench_client.py`` measures the
    client's capacity and its TTFT error.

    What TTFT includes: ``sent_s`` is taken just before httpx is handed the request on an
    already-open connection, so TTFT = writing the request + the server's queueing, prefill and
    first token + the first chunk's way back + httpx handing the bytes over; it never includes a
    TCP/TLS connect, except for a re-send after a failure (on a new connection) and rate-mode
    requests beyond the warmed connections. ``ClientLoad`` says when the client was the
    bottleneck (its lag adds to every TTFT).

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

    Early stop: a level whose first ``FAIL_FAST_AFTER`` finished requests (warm-ups included)
    all failed with the same error kind issues no more; requests in flight finish (each within
    ``workload.request_timeout_s``), and ``client_load[i].stopped_early`` says why.

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

    After ``run``, ``client_load`` holds one ``ClientLoad`` per level, in order.
    """

    def __init__(
        self,
        *,
        tokenizer: str | Path | None = None,
        max_retries: int = 1,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        processes: int | None = None,
    ) -> None:
        if processes is not None and processes < 1:
            raise ValueError(f"processes must be ≥ 1 (or None for automatic), got {processes}")
        self.tokenizer = tokenizer
        self.max_retries = max_retries
        self.api_key = api_key
        self.headers = dict(headers or {})
        self.processes = processes
        self.client_load: list[ClientLoad] = []
        self._builders: dict[tuple[int, int], PromptBuilder] = {}

    @classmethod
    def for_spec(cls, spec: StudySpec) -> BuiltinClient:
        """A client for a study: prompts from the engine's tokenizer, else from /tokenize."""
        return cls(tokenizer=spec.engine.tokenizer)

    def processes_for(self, workload: Workload) -> int:
        """Client processes a run of ``workload`` uses (``processes``, or chosen by load)."""
        if self.processes is not None:
            return self.processes
        need = max(
            [math.ceil(c / AUTO_CONCURRENCY_PER_PROCESS) for c in workload.concurrency or ()]
            + [math.ceil(r / AUTO_RATE_PER_PROCESS) for r in workload.request_rates_per_s or ()]
        )
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(need, cores or 1))

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
            # a tokenizer loads off the event loop (a real tokenizer.json takes 0.1-1 s to parse)
            counter: TokenCounter = (
                await asyncio.to_thread(HfTokenCounter, self.tokenizer)
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
                self._builders[key] = await asyncio.to_thread(
                    PromptBuilder.from_tokenizer,
                    self.tokenizer,
                    workload.input_tokens,
                    seed=workload.seed,
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
        conn = _Connection(str(url), endpoint.model, self.api_key, self.headers, self.max_retries)
        self.client_load = []
        results = []
        n_proc = self.processes_for(workload)
        if n_proc > 1:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(n_proc, mp_context=ctx) as executor:
                for index, level in enumerate(workload.levels()):
                    log.info("benchmark level %s: %s (%d processes)", index, level.label, n_proc)
                    records, load = await _level_in_processes(
                        executor, n_proc, index, level, workload, pool, conn, on_progress
                    )
                    results.append((level, await count_output_tokens(records, counter)))
                    self.client_load.append(load)
            return results
        async with conn.open(workload) as sender:
            for index, level in enumerate(workload.levels()):
                log.info("benchmark level %s: %s", index, level.label)
                records, load = await _level(f"{index}", level, workload, pool, sender, on_progress)
                results.append((level, await count_output_tokens(records, counter)))
                self.client_load.append(load)
        return results


@dataclass(frozen=True)
class _Connection:
    """What a (child) process needs to open its own HTTP clients to the endpoint (picklable)."""

    url: str
    model: str
    api_key: str | None
    headers: dict[str, str]
    max_retries: int

    @contextlib.asynccontextmanager
    async def open(self, workload: Workload) -> AsyncIterator[_Sender]:
        """A sender over a keep-alive pool of its own (closed on exit)."""
        url = httpx.URL(self.url)
        pool = _Pool(url)
        headers = _headers(self.api_key, self.headers)
        try:
            yield _Sender(pool, url, self.model, workload, self.max_retries, headers)
        finally:
            await pool.aclose()


async def _level(
    key: str,
    level: LoadLevel,
    workload: Workload,
    pool: _PromptPool,
    sender: _Sender,
    on_progress: ProgressCallback | None,
) -> tuple[list[RequestRecord], ClientLoad]:
    """Warm-up, connections, then the measured phase of one level (in this process)."""
    warm_n = workload.warmup_requests
    if workload.num_requests is not None:
        await pool.prebuild(warm_n + workload.num_requests)
    elif level.request_rate_per_s is not None and workload.duration_s is not None:
        expected = math.ceil(level.request_rate_per_s * workload.duration_s * 1.3) + 8
        await pool.prebuild(warm_n + min(expected, MAX_PREBUILT_PROMPTS))
    else:
        await pool.prebuild(warm_n + 4 * (level.concurrency or 1))

    fail_fast = _FailFast(level.label)
    warm_concurrency = level.concurrency or 1
    warm = await _closed_loop(
        min(warm_concurrency, max(warm_n, 1)),
        warm_n,
        None,
        pool,
        lambda p: sender.send(p, warmup=True),
        _progress(on_progress, level, "warmup", warm_n),
        fail_fast,
    )
    if workload.duration_s is not None and level.concurrency is not None:
        # Enough prompts for the expected request count, estimated from the warm-up latency.
        lat = [r.done_s - r.sent_s for r in warm if r.ok and r.done_s is not None]
        if lat:
            expected = math.ceil(
                level.concurrency * workload.duration_s / (sum(lat) / len(lat)) * 1.2
            )
            await pool.prebuild(min(expected, MAX_PREBUILT_PROMPTS))
    if level.concurrency is not None:
        await sender.connect(level.concurrency)
    elif level.request_rate_per_s is not None:
        await sender.connect(min(256, math.ceil(level.request_rate_per_s)))

    report = _progress(on_progress, level, "measure", workload.num_requests)
    with _no_full_collections():
        measured, load = await _measure(level, workload, key, pool, sender, report, fail_fast)
    if fail_fast.reason:
        log.warning("%s", fail_fast.reason)
    return warm + measured, load


@contextlib.contextmanager
def _no_full_collections() -> Iterator[None]:
    """Collect now, then freeze every object that exists (``gc.freeze``) until the phase ends.

    Why: the garbage collector's full (generation 2) collections stop the event loop for as long
    as it takes to traverse every tracked object; measured against the fake server fragmenting
    its SSE events finely at 16 in flight (gc.callbacks timing each collection, on a shared
    2-core machine with load average ~8), the previous client's full collections took 165-208 ms
    and every request sent just before one showed it in its TTFT (the p99 spikes of 100-250 ms);
    this client made 4x fewer collections and, frozen, no full one inside a measured phase.
    Frozen objects are never traversed again, so a collection during the phase only looks at
    what the phase itself allocated. ``gc.unfreeze`` afterwards returns them to collection.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _measure(
    level: LoadLevel,
    workload: Workload,
    key: str,
    pool: _PromptPool,
    sender: _Sender,
    report: Callable[[RequestRecord], None],
    fail_fast: _FailFast,
) -> tuple[list[RequestRecord], ClientLoad]:
    """The measured phase of one level, with the client's own load probed alongside."""
    probe = _LoadProbe()
    probe.start()
    deadline = None if workload.duration_s is None else time.perf_counter() + workload.duration_s
    measured: list[RequestRecord]
    if level.concurrency is not None:
        measured = await _closed_loop(
            level.concurrency,
            workload.num_requests,
            deadline,
            pool,
            lambda p: sender.send(p, warmup=False),
            report,
            fail_fast,
        )
    else:
        assert level.request_rate_per_s is not None
        rng = random.Random(f"servetune-arrivals:{workload.seed}:{key}")
        measured = await _open_loop(
            level.request_rate_per_s,
            rng,
            workload.num_requests,
            deadline,
            pool,
            lambda p: sender.send(p, warmup=False),
            report,
            fail_fast,
        )
    return measured, await probe.stop(fail_fast.reason)


def _split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal whole shares, larger ones first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _level_in_processes(
    executor: ProcessPoolExecutor,
    n_proc: int,
    index: int,
    level: LoadLevel,
    workload: Workload,
    pool: _PromptPool,
    conn: _Connection,
    on_progress: ProgressCallback | None,
) -> tuple[list[RequestRecord], ClientLoad]:
    """One level shared by ``n_proc`` client processes: split, run, merge (records by send time).

    Concurrency and request counts are split in near-equal whole shares (fewer processes when
    the concurrency is smaller than ``n_proc``); a rate is split evenly (the sum of independent
    Poisson processes is a Poisson process of the summed rate).
    """
    if level.concurrency is not None:
        conc = [c for c in _split(level.concurrency, n_proc) if c > 0]
        levels = [LoadLevel(concurrency=c) for c in conc]
        weights = conc
    else:
        assert level.request_rate_per_s is not None
        levels = [LoadLevel(request_rate_per_s=level.request_rate_per_s / n_proc)] * n_proc
        weights = [1] * n_proc
    k = len(levels)
    warm_shares = _split(workload.warmup_requests, k)
    if workload.num_requests is not None:
        total = workload.num_requests
        shares = [total * w // sum(weights) for w in weights]
        for i in range(total - sum(shares)):
            shares[i % k] += 1
        sizes = [w + n for w, n in zip(warm_shares, shares, strict=True)]
    else:
        assert workload.duration_s is not None
        shares = [0] * k
        if level.request_rate_per_s is not None:
            each = math.ceil(level.request_rate_per_s / k * workload.duration_s * 1.3) + 8
        else:
            each = 64 * max(weights)
        sizes = [w + min(each, MAX_PREBUILT_PROMPTS) for w in warm_shares]
    await pool.prebuild(sum(sizes))
    jobs = []
    for i in range(k):
        prompts = [await pool.get(pool.take()) for _ in range(sizes[i])]
        child_wl = workload.model_copy(
            update={
                "warmup_requests": warm_shares[i],
                "num_requests": shares[i] if workload.num_requests is not None else None,
            }
        )
        jobs.append(_ChildJob(conn, f"{index}:{i}", levels[i], child_wl, prompts))
    loop = asyncio.get_running_loop()
    outcomes = await asyncio.gather(*(loop.run_in_executor(executor, _child, j) for j in jobs))
    records = [r for rs, _ in outcomes for r in rs]
    warm = sorted((r for r in records if r.warmup), key=lambda r: r.sent_s)
    measured = sorted((r for r in records if not r.warmup), key=lambda r: r.sent_s)
    warm_report = _progress(on_progress, level, "warmup", workload.warmup_requests)
    for r in warm:
        warm_report(r)
    report = _progress(on_progress, level, "measure", workload.num_requests)
    for r in measured:
        report(r)
    return warm + measured, ClientLoad.merge([load for _, load in outcomes])


@dataclass(frozen=True)
class _ChildJob:
    """One process's share of a level (picklable: it crosses to a spawned process)."""

    conn: _Connection
    key: str
    level: LoadLevel
    workload: Workload
    prompts: list[Prompt]


def _child(job: _ChildJob) -> tuple[list[RequestRecord], ClientLoad]:
    """Entry point of a client process: run its share of one level on its own event loop."""

    async def go() -> tuple[list[RequestRecord], ClientLoad]:
        async with job.conn.open(job.workload) as sender:
            return await _level(
                job.key, job.level, job.workload, _PromptPool(job.prompts), sender, None
            )

    return asyncio.run(go())


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
    fail_fast: _FailFast,
) -> list[RequestRecord]:
    """Keep ``concurrency`` requests in flight until ``total`` were issued or ``deadline`` passed.

    Issues no more once ``fail_fast`` tripped (after at least one request of this loop).
    Returns the records in issue order.
    """
    slots: list[RequestRecord | None] = []

    async def worker() -> None:
        while True:
            if total is not None and len(slots) >= total:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            if fail_fast.tripped and slots:
                return
            i = len(slots)
            slots.append(None)
            prompt = await pool.get(pool.take())
            record = await send(prompt)
            slots[i] = record
            fail_fast.see(record)
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
    fail_fast: _FailFast,
) -> list[RequestRecord]:
    """Issue requests at Poisson arrival times, with no cap on how many are in flight.

    The first goes at once, the next after exponential gaps of mean ``1 / rate_per_s``, on an
    absolute schedule (a late send does not delay the ones after it); none once ``fail_fast``
    tripped. Records in issue order.
    """
    tasks: list[asyncio.Task[RequestRecord]] = []

    async def one(prompt: Prompt) -> RequestRecord:
        record = await send(prompt)
        fail_fast.see(record)
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
            if fail_fast.tripped and tasks:
                break
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


class _Pool:
    """Keep-alive HTTP/1.1 connections to one origin, handed out from a free list.

    Why not httpx's pool: httpcore 1.0's ``AsyncConnectionPool`` rescans every connection (and
    polls every idle socket for readability) each time a request starts or ends, so its cost
    per request grows with the connections open. Measured with keep-alive through httpx's pool,
    a 200 requests/s Poisson level of 300 requests (≈200 connections) took 2.41 s to issue
    instead of the scheduled 1.62 s (tests/integration/test_bench_client.py's high-rate test
    failed); through this pool it keeps the schedule. Why not httpcore's connection either: see
    ``servetune.bench.transport.Http11Connection`` (its locks delay each request's bytes). On
    one core, against the fake server with 32 in flight, requests per CPU-second went from 2268
    (httpcore connections) through 3167 (httpcore over a plain asyncio stream) to 4371 (this
    connection) with 1-token answers, and 1442 → 1691 → 1990 with 16 tokens. A request takes the
    most recently returned connection (the server closed it if bytes or EOF arrived while it was
    idle) or opens a new one; a connection goes back only when its response was read to the end.
    """

    def __init__(self, url: httpx.URL) -> None:
        self.host = url.host
        self.port = url.port or _PORTS[url.scheme]
        # TLS verified against the system's trust store, as ssl.create_default_context() does.
        self.ssl_context = ssl.create_default_context() if url.scheme == "https" else None
        self.idle: list[Http11Connection] = []
        self.opened = 0

    def new(self) -> Http11Connection:
        """A connection that connects on its first request."""
        self.opened += 1
        return Http11Connection(self.host, self.port, self.ssl_context)

    async def take(self) -> Http11Connection:
        """An idle connection the server has not closed, else a new one."""
        while self.idle:
            conn = self.idle.pop()
            if conn.is_idle() and not conn.has_expired():
                return conn
            await conn.aclose()
        return self.new()

    async def give(self, conn: Http11Connection) -> None:
        """Back to the free list if it can carry another request, else closed."""
        if conn.is_idle() and not conn.has_expired():
            self.idle.append(conn)
        else:
            await conn.aclose()

    async def aclose(self) -> None:
        """Close every idle connection."""
        idle, self.idle = self.idle, []
        for conn in idle:
            await conn.aclose()


_PORTS = {"http": 80, "https": 443}


def _headers(api_key: str | None, headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Every request's headers; the user's ``headers`` win over these defaults (by name).

    ``Accept-Encoding: identity``: a compressed stream would be buffered. No cookies are ever
    stored or sent: each request stands for a new user (a load balancer's sticky cookie would
    otherwise pin them all to one replica). ``_Sender`` adds ``Host`` and ``Content-Length``.
    """
    base = {
        "User-Agent": f"servetune/{servetune_version()}",
        "Accept": "text/event-stream",
        "Accept-Encoding": "identity",
        "Content-Type": "application/json",
    }
    if api_key:
        base["Authorization"] = f"Bearer {api_key}"
    merged = {k.lower(): (k, v) for k, v in base.items()}
    merged |= {k.lower(): (k, v) for k, v in headers.items()}
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in merged.values()]


# What httpcore says when the peer closed the connection early: before the response (httpcore's
# message) or inside the body (h11's). Any other RemoteProtocolError is a malformed response.
# The drop tests in tests/integration/test_bench_client.py pin these messages down.
_CLOSED_EARLY = ("Server disconnected", "peer closed connection")


def _closed_early(e: httpcore.RemoteProtocolError) -> bool:
    return str(e).startswith(_CLOSED_EARLY)


class _Sender:
    """Sends one streaming request (with its retry) and turns what happened into a RequestRecord."""

    def __init__(
        self,
        pool: _Pool,
        url: httpx.URL,
        model: str,
        workload: Workload,
        max_retries: int,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.pool = pool
        self.target = url.raw_path
        self.models_target = url.copy_with(
            path=url.path.rsplit("/v1/", 1)[0] + "/v1/models", query=None
        ).raw_path
        self.headers = [(b"Host", url.netloc), *headers]
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

    async def connect(self, n: int) -> None:
        """Have ``n`` keep-alive connections open: one unmeasured ``GET /v1/models`` on each.

        Idle connections are reused first; the rest are new, all sent at once. Failures are
        only logged: the measured requests will show them (and open their own connections).
        """
        conns = [await self.pool.take() for _ in range(n)]

        async def one(conn: Http11Connection) -> None:
            try:
                async with asyncio.timeout(min(self.timeout_s, WARM_CONNECT_TIMEOUT_S)):
                    response = await conn.request(b"GET", self.models_target, self.headers, b"")
                    try:
                        await _read_body(response)
                    finally:
                        await response.aclose()
            except (httpcore.NetworkError, httpcore.TimeoutException, TimeoutError) as e:
                log.debug("opening a keep-alive connection: %s", _describe(e))
            except (httpcore.ProtocolError, httpcore.UnsupportedProtocol) as e:
                log.debug("opening a keep-alive connection: %s", _describe(e))
            await self.pool.give(conn)

        await asyncio.gather(*(one(c) for c in conns))

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
            # A re-send goes on a new connection: the pooled one may be what failed.
            conn = self.pool.new() if retries else await self.pool.take()
            state.sent_s = time.perf_counter()
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._attempt(conn, body, state)
            except _BeforeFirstByte as e:
                if retries < self.max_retries:
                    await self.pool.give(conn)
                    retries += 1
                    log.debug("re-sending after %s before the first byte: %s", e.kind, e.message)
                    continue
                state.fail(e.kind, e.message)
            except (TimeoutError, httpcore.TimeoutException):
                # asyncio.timeout bounds the whole attempt (the connection has no timeouts).
                state.fail("timeout", f"no complete response within {self.timeout_s:g} s")
            await self.pool.give(conn)
            return state.record(
                expected_prompt_tokens=None if self.chat else prompt.token_count,
                max_tokens=self.max_tokens,
                retries=retries,
                warmup=warmup,
            )

    async def _attempt(self, conn: Http11Connection, body: bytes, state: _Stream) -> None:
        """One attempt; the adapter from httpcore errors to error kinds.

        Raises ``_BeforeFirstByte`` when the attempt may be re-sent, httpcore.TimeoutException
        on a timeout; every other failure is recorded in ``state``.
        """
        try:
            response = await conn.request(b"POST", self.target, self.headers, body)
        except httpcore.TimeoutException:
            raise
        except httpcore.ConnectError as e:
            raise _BeforeFirstByte("connect", _describe(e)) from e
        except httpcore.RemoteProtocolError as e:
            if not _closed_early(e):  # a malformed response: bytes came, it is not re-sent
                state.fail("protocol", _describe(e))
                return
            raise _BeforeFirstByte("read", _describe(e)) from e
        except (httpcore.ReadError, httpcore.WriteError) as e:  # reset before the response
            raise _BeforeFirstByte("read", _describe(e)) from e
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as e:
            state.fail("protocol", _describe(e))
            return
        try:
            await self._read(response, state)
        except httpcore.TimeoutException:
            raise
        except httpcore.RemoteProtocolError as e:
            state.fail("read" if _closed_early(e) else "protocol", _describe(e))
        except httpcore.NetworkError as e:  # reset mid-stream
            state.fail("read", _describe(e))
        except httpcore.ProtocolError as e:
            state.fail("protocol", _describe(e))
        except _Protocol as e:
            state.fail("protocol", str(e))
        finally:
            await response.aclose()

    async def _read(self, response: Http11Response, state: _Stream) -> None:
        status = response.status
        ctype = next(
            (v.decode("latin-1") for k, v in response.headers if k.lower() == b"content-type"), ""
        )
        if status >= 300 or "json" in ctype:
            text = (await _read_body(response)).decode("utf-8", "replace")
            if status >= 300:
                state.fail(f"http_{status}", text[:500])
                return
            raise _Protocol(f"expected an SSE stream, got {ctype}: {text[:300]}")
        parser = SseParser()
        async with contextlib.aclosing(response.aiter_stream()) as chunks:
            async for data in chunks:
                now = time.perf_counter()  # as soon as h11 hands the bytes over, before parsing
                for sse in parser.feed(data):
                    if state.on_event(sse, now):
                        await _drain(chunks)
                        return
        now = time.perf_counter()
        for sse in parser.flush():
            if state.on_event(sse, now):
                return
        state.done_s = now


DRAIN_TIMEOUT_S = 1.0
"""Longest wait, after ``[DONE]``, for the rest of the HTTP body (so the connection is reused)."""


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows ``[DONE]`` (unmeasured) so the connection ends idle and is reused.

    The request is already complete: a server that keeps the body open, closes the connection
    early or breaks the framing here only costs the connection (closed instead of pooled).
    """
    with contextlib.suppress(TimeoutError, httpcore.NetworkError, httpcore.ProtocolError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for _ in chunks:
                pass


async def _read_body(response: Http11Response, limit: int = 65536) -> bytes:
    """The rest of a (short) response body, at most ``limit`` bytes kept."""
    out = bytearray()
    async for data in response.aiter_stream():
        out += data[: max(0, limit - len(out))]
    return bytes(out)


def _describe(e: BaseException) -> str:
    return describe(e)


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


async def served_model(
    base_url: str,
    *,
    timeout_s: float = 10.0,
    api_key: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """The first model id ``GET /v1/models`` lists.

    Raises BenchmarkError naming the reason (never an empty one): no connection, connected but
    no answer within ``timeout_s`` seconds, an HTTP error status (with a hint for 401/403), or
    an answer that lists no model.
    """
    url = base_url.rstrip("/") + "/v1/models"
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(
            timeout=timeout_s, headers={**auth, **(headers or {})}, trust_env=False
        ) as client:
            r = await client.get(url)  # connect, write, each read: ≤ timeout_s
    except (httpx.HTTPError, TimeoutError) as e:
        if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
            # nothing to benchmark: --model would only move the same failure to the next request
            hint = "; nothing answers at this address: is the server running, and is the URL right?"
        elif isinstance(e, httpx.ReadTimeout | TimeoutError):
            hint = "; the server accepts connections but does not answer (is it still loading?)"
        else:
            hint = "; give --model to skip this request"
        raise BenchmarkError(f"cannot list models at {url}: {describe(e, timeout_s)}{hint}") from e
    if r.status_code >= 400:
        hint = " (give --api-key or --header)" if r.status_code in (401, 403) else ""
        body = " ".join(r.text.split())[:200]
        raise BenchmarkError(f"cannot list models at {url}: HTTP {r.status_code}{hint}: {body}")
    try:
        return str(r.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchmarkError(f"{url} lists no model ({e!r}); give --model") from e


class EstimatedTokenCounter:
    """A rough token count (one per word or punctuation mark, plus one BOS) for servers without a
    ``/tokenize`` endpoint when no tokenizer is given: prompts are then only about
    ``input_tokens`` long, and the server's ``usage.prompt_tokens`` says how long they were."""

    async def count(self, texts: Sequence[str]) -> list[int]:
        """Estimated token counts, BOS included."""
        return [1 + len(_WORD.findall(t)) for t in texts]

    async def aclose(self) -> None:
        """Nothing to release."""


_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class LevelResult:
    """One load level of ``bench_endpoint``: its records, metrics and the client's own load."""

    level: LoadLevel
    records: list[RequestRecord]
    metrics: ServingMetrics
    client_load: ClientLoad


@dataclass(frozen=True)
class BenchRun:
    """What ``bench_endpoint`` measured: the model asked, how prompts were counted, each level.

    ``prompt_counting``: ``tokenizer`` (the given one), ``server`` (its ``/tokenize``) or
    ``estimated`` (neither was available: ``EstimatedTokenCounter``).
    """

    model: str
    prompt_counting: Literal["tokenizer", "server", "estimated"]
    processes: int
    levels: list[LevelResult]


async def _server_counts_tokens(url: str, headers: Mapping[str, str], timeout_s: float) -> bool:
    """True when ``POST {url}/tokenize`` answers (llama.cpp's or vLLM's form); False on 404/405/501.

    Raises BenchmarkError for any other failure (no answer, a server error), naming it.
    """
    async with httpx.AsyncClient(timeout=timeout_s, headers=dict(headers), trust_env=False) as c:
        for body in ({"content": "a", "add_special": True}, {"prompt": "a"}):
            try:
                r = await c.post(url + "/tokenize", json=body)
            except (httpx.HTTPError, TimeoutError) as e:
                raise BenchmarkError(
                    f"cannot count tokens through {url}/tokenize: {describe(e, timeout_s)}"
                ) from e
            if r.status_code < 300:
                return True
            if r.status_code in (404, 405, 501):
                return False
    return True  # 4xx to both forms: let the counter report the server's own message


async def bench_endpoint(
    url: str,
    model: str | None,
    workload: Workload,
    tokenizer: str | None,
    *,
    slos: Sequence[Slo] = (),
    api_key: str | None = None,
    headers: Mapping[str, str] | None = None,
    processes: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> BenchRun:
    """Benchmark a running OpenAI-compatible server (``servetune bench URL``): every level.

    ``model`` None = the first id of ``GET /v1/models``. Prompts are counted with
    ``tokenizer``, else through the server's ``/tokenize``, else (the server has none)
    estimated, and the server's ``usage.prompt_tokens`` says how long they really were.
    Goodput counts requests meeting ``slos`` (``core.slo.request_bounds``). Each level's
    metrics carry the client's own load (``client_loop_lag_p99_ms``, ``client_cpu_fraction``).
    Raises BenchmarkError (naming the reason) if the server cannot be asked for its model or
    the prompts cannot be built.
    """
    url = url.rstrip("/")
    headers = dict(headers or {})
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout_s = min(workload.request_timeout_s, 30.0)
    if model is None:
        model = await served_model(url, timeout_s=timeout_s, api_key=api_key, headers=headers)
    client = BuiltinClient(
        tokenizer=tokenizer, api_key=api_key, headers=headers, processes=processes
    )
    endpoint = Endpoint(url, model)
    counting: Literal["tokenizer", "server", "estimated"] = "tokenizer"
    if tokenizer is not None:
        results = await client.run(endpoint, workload, on_progress=on_progress)
    else:
        if await _server_counts_tokens(url, {**auth, **headers}, timeout_s):
            counting = "server"
            counter: TokenCounter = ServerTokenCounter(
                url, model, timeout_s=timeout_s, headers={**auth, **headers}
            )
        else:
            counting = "estimated"
            log.warning("%s has no /tokenize and no tokenizer was given: estimating prompts", url)
            counter = EstimatedTokenCounter()
        builder = PromptBuilder(counter, workload.input_tokens, seed=workload.seed)
        try:
            results = await client.run(endpoint, workload, builder, on_progress=on_progress)
        finally:
            await builder.aclose()
    bounds = request_bounds(slos)
    levels = []
    for (level, records), load in zip(results, client.client_load, strict=True):
        m = summarize(level, records, bounds, workload.prompt_token_tolerance)
        levels.append(LevelResult(level, records, m.model_copy(update=load.metrics_fields()), load))
    return BenchRun(model, counting, client.processes_for(workload), levels)
