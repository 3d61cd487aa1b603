"""An instant fake OpenAI-compatible streaming server, for tests and client benchmarks.

Raw asyncio streams speaking HTTP/1.1 (chunked SSE); in-process (``async with FakeServer()``) or -m.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

log = logging.getLogger(__name__)

LineEnding = Literal["lf", "crlf", "cr"]
_EOLS: dict[str, str] = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}
_WORD = re.compile(r"\w+|[^\w\s]")
# Streamed token texts, cycled; multi-byte characters so split writes can cut inside one.
TOKENS = (" hello", " wörld", " 🙂", " token", " €", " x")
CHAT_TEMPLATE_TOKENS_PER_MESSAGE = 4
"""Prompt tokens the fake chat template adds per message (plus one BOS per request)."""


def count_tokens(text: str) -> int:
    """The fake tokenizer: one token per word and per punctuation mark (no special tokens)."""
    return len(_WORD.findall(text))


@dataclass(frozen=True)
class FakeServerOptions:
    """How the fake server behaves.

    Delays are measured from the moment the request body has been read; token ``i`` (0-based) is
    written at ``first_token_delay_ms + i * inter_token_delay_ms`` on that clock. The ``*_requests``
    sets hold 1-based ordinals of generation requests (``/v1/completions`` and
    ``/v1/chat/completions``, in arrival order, retries included): ``fail_requests`` are answered
    HTTP 500, ``drop_requests`` are closed before the first response byte, ``drop_mid_requests``
    are closed after the first token, ``short_requests`` stop at half of ``max_tokens`` with
    ``finish_reason: "stop"``. ``split_events`` writes each SSE event as several HTTP chunks cut
    at awkward points (after the first byte, inside a multi-byte character, between CR and LF).
    ``send_usage=False`` never sends a usage chunk (as servers without ``include_usage`` do).
    ``tokens_per_event`` tokens go in each SSE event (speculative decoding, delta batching; the
    last event may carry fewer), written when its last token is due. A buggy length: each
    request generates ``round(max_tokens * output_tokens_scale) + output_tokens_offset`` tokens
    (at least 1), ``finish_reason: "length"`` unless fewer than ``max_tokens``, and ``usage``
    tells the truth about the count.
    ``record_timings`` keeps a ``RequestTiming`` per streamed request (served by ``GET /stats``).
    ``max_requests_per_connection``: after that many requests on one connection, the next one
    is read and the connection closed without a response byte, though every response said
    ``keep-alive`` (as a server whose idle or request limit closes a connection the client was
    about to reuse). ``tokenize=False`` answers ``/tokenize`` with 404 (a server without it).
    ``close_after_done`` closes the connection right after ``data: [DONE]``, without the end of
    the chunked body.
    """

    model: str = "fake-model"
    first_token_delay_ms: float = 0.0
    inter_token_delay_ms: float = 0.0
    split_events: bool = False
    line_ending: LineEnding = "lf"
    fail_requests: frozenset[int] = frozenset()
    drop_requests: frozenset[int] = frozenset()
    drop_mid_requests: frozenset[int] = frozenset()
    short_requests: frozenset[int] = frozenset()
    send_usage: bool = True
    record_timings: bool = False
    tokens_per_event: int = 1
    output_tokens_scale: float = 1.0
    output_tokens_offset: int = 0
    max_requests_per_connection: int | None = None
    tokenize: bool = True
    close_after_done: bool = False


@dataclass(frozen=True)
class RequestTiming:
    """When the server had read a request and when it wrote its first token.

    ``time.perf_counter`` seconds: on Linux that is CLOCK_MONOTONIC, one clock for every process
    on the machine, so a client can set these against its own timestamps.
    """

    prompt_start: str
    received_s: float
    first_token_s: float


@dataclass
class FakeServerStats:
    """What the fake server has seen.

    Connections accepted; generation requests received, in flight now and most in flight at
    once; requests by path; how often each prompt start (first 64 characters of the prompt or
    of the last chat message) was seen; requests dropped by ``max_requests_per_connection``;
    the headers of the last generation request (names lower-cased).
    """

    connections: int = 0
    generation_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    prompt_starts: Counter[str] = field(default_factory=Counter)
    timings: list[RequestTiming] = field(default_factory=list)
    dropped_on_reuse: int = 0
    last_generation_headers: dict[str, str] = field(default_factory=dict)


class FakeServer:
    """The fake server as an async context manager: ``async with FakeServer(opts) as url: ...``.

    Binds ``host`` on ``port`` (0 = a free port; ``reuse_port``: SO_REUSEPORT, so several
    processes can serve one port) and yields ``http://host:port``. Routes:
    ``GET /health``, ``GET /v1/models``, ``POST /tokenize`` (llama.cpp form: ``{"content",
    "add_special"}`` → ``{"tokens"}``), ``POST /v1/completions`` and ``POST /v1/chat/completions``
    (``stream: true`` only; ``max_tokens`` tokens, usage in a final chunk when
    ``stream_options.include_usage`` and ``options.send_usage``), ``GET /stats`` (request count
    and the recorded timings, which it then forgets). Completions prompts count one BOS plus
    ``count_tokens``; chat prompts one BOS plus ``CHAT_TEMPLATE_TOKENS_PER_MESSAGE`` per
    message plus the contents. Keep-alive is honoured unless the client sends
    ``Connection: close``.
    """

    def __init__(
        self,
        options: FakeServerOptions | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        reuse_port: bool = False,
    ):
        self.options = options or FakeServerOptions()
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
        self.stats = FakeServerStats()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ordinal = itertools.count(1)

    @property
    def base_url(self) -> str:
        """``http://host:port`` once started."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        """Start listening; return the base URL."""
        # A deep accept queue: a burst of new connections beyond asyncio's default (100) would be
        # dropped and retried by TCP a second later, which is not the delay a test configured.
        self._server = await asyncio.start_server(
            self._on_connect, self.host, self.port, backlog=4096, reuse_port=self.reuse_port or None
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.debug("fake server listening on %s", self.base_url)
        return self.base_url

    async def stop(self) -> None:
        """Stop listening and cancel every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        limit = self.options.max_requests_per_connection
        try:
            while await self._one_request(
                reader, writer, drop=limit is not None and served >= limit
            ):
                served += 1
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, drop: bool = False
    ) -> bool:
        """Serve one request; True when the connection stays open for another.

        ``drop``: read the request, then close the connection without answering.
        """
        line = await reader.readline()
        if not line.strip():
            return False
        method, path, version = line.decode("latin-1").split()
        headers: dict[str, str] = {}
        while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if drop:
            self.stats.dropped_on_reuse += 1
            return False
        path = path.split("?", 1)[0]
        self.stats.by_path[path] = self.stats.by_path.get(path, 0) + 1
        try:
            payload: Any = json.loads(body) if body else {}
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError:
            await _send_json(writer, 400, {"error": {"message": "body is not JSON"}}, keep)
            return keep
        if method == "GET" and path == "/health":
            await _send_json(writer, 200, {"status": "ok"}, keep)
        elif method == "GET" and path == "/stats":
            timings = [vars(t) for t in self.stats.timings]
            self.stats.timings.clear()
            doc = {"generation_requests": self.stats.generation_requests, "timings": timings}
            await _send_json(writer, 200, doc, keep)
        elif method == "GET" and path == "/v1/models":
            await _send_json(
                writer,
                200,
                {
                    "object": "list",
                    "data": [{"id": self.options.model, "object": "model", "owned_by": "fake"}],
                },
                keep,
            )
        elif method == "POST" and path == "/tokenize":
            if not self.options.tokenize:
                await _send_json(writer, 404, {"error": {"message": "no /tokenize"}}, keep)
            elif not isinstance(payload.get("content"), str):
                await _send_json(writer, 400, {"error": {"message": "content is required"}}, keep)
            else:
                n = count_tokens(payload["content"]) + (1 if payload.get("add_special") else 0)
                await _send_json(writer, 200, {"tokens": list(range(1, n + 1))}, keep)
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            stats = self.stats
            stats.last_generation_headers = headers
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            try:
                return await self._generate(
                    writer, payload, chat=path.endswith("chat/completions"), keep=keep
                )
            finally:
                stats.in_flight -= 1
        else:
            await _send_json(writer, 404, {"error": {"message": f"no route {method} {path}"}}, keep)
        return keep

    async def _generate(
        self, writer: asyncio.StreamWriter, req: dict[str, Any], *, chat: bool, keep: bool
    ) -> bool:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        received_s = time.perf_counter()
        opts = self.options
        ordinal = next(self._ordinal)
        self.stats.generation_requests += 1
        if ordinal in opts.drop_requests:
            return False  # closed by _serve without a byte written
        if not req.get("stream"):
            await _send_json(
                writer, 400, {"error": {"message": "only stream: true is served"}}, keep
            )
            return keep
        if ordinal in opts.fail_requests:
            await _send_json(
                writer, 500, {"error": {"message": f"fake failure of request {ordinal}"}}, keep
            )
            return keep
        if chat:
            messages = req.get("messages") or []
            prompt_tokens = 1 + sum(
                CHAT_TEMPLATE_TOKENS_PER_MESSAGE + count_tokens(str(m.get("content", "")))
                for m in messages
            )
            prompt = str(messages[-1].get("content", "")) if messages else ""
        else:
            prompt = str(req.get("prompt", ""))
            prompt_tokens = 1 + count_tokens(prompt)
        self.stats.prompt_starts[prompt[:64]] += 1
        max_tokens = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
        n_out = max(1, round(max_tokens * opts.output_tokens_scale) + opts.output_tokens_offset)
        if ordinal in opts.short_requests:
            n_out = max(1, max_tokens // 2)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{ordinal}"
        created = int(time.time())
        model = json.dumps(str(req.get("model") or opts.model))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n_out,
            "total_tokens": prompt_tokens + n_out,
        }
        eol = _EOLS[opts.line_ending]
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = (
            f'data: {{"id":"{rid}","object":"{obj}","created":{created},"model":{model},"choices":['
        )
        tail = "]}" + eol + eol

        def event(token: str | None, finish: str | None = None) -> bytes:
            fin = "null" if finish is None else f'"{finish}"'
            if chat:
                delta = (
                    "{}"
                    if token is None
                    else '{"content":' + json.dumps(token, ensure_ascii=False) + "}"
                )
                body = f'{{"index":0,"delta":{delta},"finish_reason":{fin}}}'
            else:
                text = json.dumps(token or "", ensure_ascii=False)
                body = f'{{"index":0,"text":{text},"finish_reason":{fin}}}'
            return (head + body + tail).encode()

        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n"
            + (b"Connection: keep-alive\r\n\r\n" if keep else b"Connection: close\r\n\r\n")
        )
        if chat:  # like vLLM and OpenAI: a first chunk carrying only the role, no content
            await self._write(
                writer,
                (
                    head + '{"index":0,"delta":{"role":"assistant","content":""},'
                    '"finish_reason":null}' + tail
                ).encode(),
            )
        delayed = opts.first_token_delay_ms > 0 or opts.inter_token_delay_ms > 0
        per = max(1, opts.tokens_per_event)
        for first in range(0, n_out, per):
            last = min(first + per, n_out) - 1
            if delayed:
                await self._sleep_until(
                    t0 + (opts.first_token_delay_ms + last * opts.inter_token_delay_ms) / 1e3
                )
            if first == 0 and opts.record_timings:
                timing = RequestTiming(prompt[:64], received_s, time.perf_counter())
                self.stats.timings.append(timing)
            text = "".join(TOKENS[i % len(TOKENS)] for i in range(first, last + 1))
            await self._write(writer, event(text))
            if first == 0 and ordinal in opts.drop_mid_requests:
                await writer.drain()
                return False
        await self._write(writer, event(None, "stop" if n_out < max_tokens else "length"))
        if opts.send_usage and (req.get("stream_options") or {}).get("include_usage"):
            await self._write(
                writer,
                (
                    f'data: {{"id":"{rid}","object":"{obj}","created":{created},'
                    f'"model":{model},"choices":[],"usage":{json.dumps(usage)}}}' + eol + eol
                ).encode(),
            )
        await self._write(writer, f"data: [DONE]{eol}{eol}".encode())
        if opts.close_after_done:
            await writer.drain()
            return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return keep

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write ``data`` as one HTTP chunk, or as several cut at awkward points in split mode."""
        if not self.options.split_events:
            writer.write(b"%x\r\n%b\r\n" % (len(data), data))
            if writer.transport.get_write_buffer_size() > 65536:
                await writer.drain()
            return
        for piece in _awkward_pieces(data):
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0)

    @staticmethod
    async def _sleep_until(deadline: float) -> None:
        delay = deadline - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)


def _awkward_pieces(data: bytes) -> list[bytes]:
    """Cut after byte 1, mid-way, inside the first multi-byte character and between CR and LF."""
    cuts = {1, len(data) // 2}
    for i, b in enumerate(data):
        if b >= 0xC0:  # a UTF-8 lead byte: cut right after it
            cuts.add(i + 1)
            break
    cuts.update(i + 1 for i in range(len(data) - 1) if data[i : i + 2] == b"\r\n")
    edges = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


async def _send_json(writer: asyncio.StreamWriter, status: int, obj: Any, keep: bool) -> None:
    body = json.dumps(obj).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}.get(
        status, "Error"
    )
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode()
        + body
    )
    await writer.drain()


def _ordinals(text: str) -> frozenset[int]:
    return frozenset(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> None:
    """``python -m servetune.testing.fake_server``: serve until SIGINT/SIGTERM.

    Prints ``listening on http://HOST:PORT`` (one line, flushed) once it accepts connections.
    """
    p = argparse.ArgumentParser(prog="python -m servetune.testing.fake_server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = a free port (printed)")
    p.add_argument(
        "--reuse-port",
        action="store_true",
        help="SO_REUSEPORT: several server processes share one port (the kernel spreads connects)",
    )
    p.add_argument("--model", default="fake-model")
    p.add_argument("--first-token-delay-ms", type=float, default=0.0)
    p.add_argument("--inter-token-delay-ms", type=float, default=0.0)
    p.add_argument("--split-events", action="store_true")
    p.add_argument("--line-ending", choices=sorted(_EOLS), default="lf")
    p.add_argument(
        "--fail", type=_ordinals, default=frozenset(), help="ordinals answered 500, e.g. 2,5"
    )
    p.add_argument(
        "--drop", type=_ordinals, default=frozenset(), help="ordinals closed before the first byte"
    )
    p.add_argument(
        "--drop-mid", type=_ordinals, default=frozenset(), help="ordinals closed after one token"
    )
    p.add_argument(
        "--short", type=_ordinals, default=frozenset(), help="ordinals given half max_tokens"
    )
    p.add_argument("--no-usage", action="store_true", help="never send a usage chunk")
    p.add_argument(
        "--record-timings", action="store_true", help="keep per-request timings for GET /stats"
    )
    p.add_argument("--tokens-per-event", type=int, default=1, help="tokens in each SSE event")
    p.add_argument(
        "--output-tokens-scale", type=float, default=1.0, help="generate max_tokens × this"
    )
    p.add_argument(
        "--output-tokens-offset", type=int, default=0, help="… plus this many tokens (may be < 0)"
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    options = FakeServerOptions(
        model=a.model,
        first_token_delay_ms=a.first_token_delay_ms,
        inter_token_delay_ms=a.inter_token_delay_ms,
        split_events=a.split_events,
        line_ending=a.line_ending,
        fail_requests=a.fail,
        drop_requests=a.drop,
        drop_mid_requests=a.drop_mid,
        short_requests=a.short,
        send_usage=not a.no_usage,
        record_timings=a.record_timings,
        tokens_per_event=a.tokens_per_event,
        output_tokens_scale=a.output_tokens_scale,
        output_tokens_offset=a.output_tokens_offset,
    )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with FakeServer(options, host=a.host, port=a.port, reuse_port=a.reuse_port) as url:
            print(f"listening on {url}", flush=True)
            await stop.wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
