"""The benchmark client's HTTP/1.1 connection: h11 over an asyncio protocol, nothing in between.

A request is written whole before its first ``await``; bytes that arrive are handed over at once.
"""

from __future__ import annotations

import asyncio
import collections
import typing

import h11
import httpcore


class _SocketProtocol(asyncio.Protocol):
    """Buffers what arrives and wakes the one reader; tracks write flow control and EOF."""

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None
        self.paused = False

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        d = self.drained
        if d is not None and not d.done():
            d.set_result(None)

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


_DISCONNECTED = "Server disconnected without sending a response."


class Http11Response:
    """A response whose body streams from its ``Http11Connection`` (``aiter_stream``)."""

    def __init__(self, conn: Http11Connection, status: int, headers: list[tuple[bytes, bytes]]):
        self.status = status
        self.headers = headers
        self._conn = conn

    async def aiter_stream(self) -> typing.AsyncGenerator[bytes, None]:
        """The body's bytes as they arrive (dechunked); ends with the message."""
        conn = self._conn
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                await conn.receive()
            elif isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:  # ConnectionClosed and anything else
                raise httpcore.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )

    async def aclose(self) -> None:
        """Nothing to release: an unfinished body leaves its connection unusable (closed)."""


class Http11Connection:
    """One keep-alive HTTP/1.1 connection: h11 over an asyncio protocol, no locks, no yields.

    ``request`` writes the whole request (head and body, one ``transport.write``) before its
    first ``await``, then waits for the response head. Why not httpcore's connection: it takes
    two anyio locks per request, and each acquisition gives way to every other ready task, so a
    request's bytes left only after every other request started in the same turn had taken its
    own steps (a burst of 256 requests each waited for all the others before being sent, inside
    its TTFT). Failures use httpcore's exception classes (the names the rest of the client maps
    to error kinds): ``ConnectError``, ``RemoteProtocolError`` ("Server disconnected …" before
    the response, "peer closed connection …" inside the body), ``ReadError`` / ``WriteError``
    (a reset), ``LocalProtocolError``. Timeouts belong to the caller (``asyncio.timeout``).
    """

    def __init__(
        self, host: str, port: int, ssl_context: typing.Any = None, server_hostname: str = ""
    ) -> None:
        self._host, self._port = host, port
        self._ssl, self._server_hostname = ssl_context, server_hostname or host
        self._h11 = h11.Connection(our_role=h11.CLIENT)
        self._transport: asyncio.Transport | None = None
        self._protocol: _SocketProtocol | None = None
        self._got_bytes = False

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.create_connection(
                _SocketProtocol,
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._server_hostname if self._ssl is not None else None,
            )
        except OSError as e:
            raise httpcore.ConnectError(f"{type(e).__name__}: {e}") from e
        self._transport, self._protocol = transport, protocol

    def is_idle(self) -> bool:
        """Open, and the last exchange ended cleanly with keep-alive (or none happened yet)."""
        h = self._h11
        if self._transport is None or self._transport.is_closing():
            return False
        return (h.our_state, h.their_state) in ((h11.IDLE, h11.IDLE), (h11.DONE, h11.DONE))

    def has_expired(self) -> bool:
        """True when the server sent bytes or closed while the connection was idle."""
        p = self._protocol
        return p is None or p.eof or bool(p.chunks)

    async def aclose(self) -> None:
        """Close the socket (at once; unsent bytes are dropped)."""
        if self._transport is not None:
            self._transport.close()

    def next_event(self) -> typing.Any:
        """h11's next event; its protocol errors as httpcore's."""
        try:
            return self._h11.next_event()
        except h11.RemoteProtocolError as e:
            raise httpcore.RemoteProtocolError(str(e)) from e

    async def receive(self) -> None:
        """Feed h11 the next bytes from the socket (b"" at EOF); a reset raises ReadError."""
        p = self._protocol
        assert p is not None
        while not p.chunks and not p.eof:
            p.waiter = asyncio.get_running_loop().create_future()
            try:
                await p.waiter
            finally:
                p.waiter = None
        if p.chunks:
            data = p.chunks.popleft()
            self._got_bytes = True
        elif p.error is not None:
            raise httpcore.ReadError(f"{type(p.error).__name__}: {p.error}")
        else:
            data = b""
        try:
            self._h11.receive_data(data)
        except h11.RemoteProtocolError as e:
            raise httpcore.RemoteProtocolError(str(e)) from e

    async def request(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Http11Response:
        """Send one request (written whole before the first ``await`` once connected) and
        return when the response head arrived. ``headers`` must include Host; Content-Length
        is added for a body."""
        if self._transport is None:
            await self._connect()
        assert self._transport is not None and self._protocol is not None
        h = self._h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
        if body:
            headers = [*headers, (b"Content-Length", b"%d" % len(body))]
        try:
            out = h.send(h11.Request(method=method, target=target, headers=headers))
            out = (out or b"") + (h.send(h11.Data(data=body)) or b"") if body else out
            out = (out or b"") + (h.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError as e:
            raise httpcore.LocalProtocolError(str(e)) from e
        p = self._protocol
        if self._transport.is_closing() or p.eof:
            if p.error is not None:
                raise httpcore.WriteError(f"{type(p.error).__name__}: {p.error}")
            raise httpcore.RemoteProtocolError(_DISCONNECTED)
        self._transport.write(out)
        self._got_bytes = False
        try:
            while True:
                event = self.next_event()
                if event is h11.NEED_DATA:
                    await self.receive()
                elif isinstance(event, h11.Response):
                    return Http11Response(self, event.status_code, list(event.headers))
                elif not isinstance(event, h11.InformationalResponse):
                    raise httpcore.RemoteProtocolError(_DISCONNECTED)  # closed, no response
        except httpcore.RemoteProtocolError:
            if not self._got_bytes:  # EOF before any byte of a response: may be re-sent
                raise httpcore.RemoteProtocolError(_DISCONNECTED) from None
            raise
