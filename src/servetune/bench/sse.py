"""Incremental Server-Sent Events parser: bytes in as they arrive, whole events out.

WHATWG "event stream interpretation" rules; events split anywhere across reads parse the same.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

_EOL = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event.

    ``event`` is the event type (``message`` when the stream named none), ``data`` the data lines
    joined with ``\\n``, ``id`` the last event id seen so far (it persists across events, as the
    spec says), ``retry`` the reconnection time in ms if this event set one.
    """

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SseParser:
    """Turns a byte stream into ``SseEvent``s, however the bytes are split.

    Rules (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
    UTF-8 with an optional leading BOM; lines end with ``\\r\\n``, ``\\n`` or ``\\r``; a blank
    line dispatches; ``:`` starts a comment; ``field: value`` (one leading space stripped);
    ``data`` lines accumulate; ``event``, ``id`` (ignored if it holds NUL) and ``retry`` (digits
    only) fields; unknown fields are ignored; an event with no data is not dispatched.

    A line ending in ``\\r`` is handled at once (a ``\\n`` that follows in the next read is
    skipped), so no event waits for the next read to be dispatched. Invalid UTF-8 is replaced
    with U+FFFD. One deviation from the spec, on purpose: ``flush()`` at end of stream dispatches
    a last event that lacks its closing blank line instead of discarding it.
    """

    __slots__ = (
        "_buf",
        "_data",
        "_decoder",
        "_event",
        "_last_id",
        "_retry",
        "_skip_lf",
        "_started",
    )

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._skip_lf = False
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None

    def feed(self, data: bytes) -> list[SseEvent]:
        """Consume the next bytes of the stream; return the events they complete (often none)."""
        text = self._decoder.decode(data)
        return self._feed_text(text)

    def flush(self) -> list[SseEvent]:
        """End of stream: finish a pending line, dispatch a pending event (see the class)."""
        events = self._feed_text(self._decoder.decode(b"", final=True))
        if self._buf:
            self._line(self._buf, events)
            self._buf = ""
        self._line("", events)
        return events

    def _feed_text(self, text: str) -> list[SseEvent]:
        events: list[SseEvent] = []
        if not text:
            return events
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        if self._skip_lf:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        buf = self._buf + text if self._buf else text
        pos = 0
        for m in _EOL.finditer(buf):
            self._line(buf[pos : m.start()], events)
            pos = m.end()
        self._buf = buf[pos:]
        # A trailing lone CR ended a line already; a LF at the start of the next read belongs to it.
        self._skip_lf = pos == len(buf) and buf.endswith("\r")
        return events

    def _line(self, line: str, events: list[SseEvent]) -> None:
        if not line:
            if self._data:
                events.append(
                    SseEvent(
                        data="\n".join(self._data),
                        event=self._event or "message",
                        id=self._last_id,
                        retry=self._retry,
                    )
                )
            self._data = []
            self._event = ""
            self._retry = None
            return
        if line[0] == ":":
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
