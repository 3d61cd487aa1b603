"""Unit tests of the incremental SSE parser: any split of a stream gives the same events."""

from __future__ import annotations

import random

import pytest

from servetune.bench.sse import SseEvent, SseParser

# A stream mixing every line ending, comments, fields, multi-line data, multi-byte UTF-8 (2, 3 and
# 4 bytes), a field without a colon, an event with no data, and a leading BOM.
SAMPLE = (
    "\ufeff: a comment first\n"
    'data: {"text": "héllo"}\n\n'
    "event: delta\r\n"
    "id: 7\r\n"
    "data: first line\r\n"
    "data:second line, no space\r\n"
    "data:  two spaces\r\n\r\n"
    ": comment between\r"
    "data: cr only 🙂\r\r"
    "retry: 1500\n"
    "data\n"
    "data: € sign\n\n"
    "event: empty-has-no-data\n\n"
    "unknown: ignored\n"
    "id: bad\0id\n"
    "data: after ignored fields\n\n"
    "data: [DONE]\n\n"
).encode()

EXPECTED = [
    SseEvent(data='{"text": "héllo"}'),
    SseEvent(data="first line\nsecond line, no space\n two spaces", event="delta", id="7"),
    SseEvent(data="cr only 🙂", id="7"),
    SseEvent(data="\n€ sign", id="7", retry=1500),
    SseEvent(data="after ignored fields", id="7"),
    SseEvent(data="[DONE]", id="7"),
]


def parse_chunks(chunks: list[bytes]) -> list[SseEvent]:
    parser = SseParser()
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.flush())
    return events


def test_whole_stream_gives_the_expected_events() -> None:
    assert parse_chunks([SAMPLE]) == EXPECTED


def test_every_single_split_point_gives_the_same_events() -> None:
    for i in range(len(SAMPLE) + 1):
        assert parse_chunks([SAMPLE[:i], SAMPLE[i:]]) == EXPECTED, f"split at byte {i}"


def test_every_pair_of_split_points_gives_the_same_events() -> None:
    n = len(SAMPLE)
    for i in range(n + 1):
        for j in range(i, n + 1, 3):
            assert parse_chunks([SAMPLE[:i], SAMPLE[i:j], SAMPLE[j:]]) == EXPECTED, (i, j)


def test_byte_by_byte_gives_the_same_events() -> None:
    assert parse_chunks([SAMPLE[i : i + 1] for i in range(len(SAMPLE))]) == EXPECTED


@pytest.mark.parametrize("seed", range(50))
def test_random_chunkings_give_the_same_events(seed: int) -> None:
    rng = random.Random(seed)
    chunks, pos = [], 0
    while pos < len(SAMPLE):
        step = rng.choice([0, 1, 1, 2, 3, 5, 8, 40])
        chunks.append(SAMPLE[pos : pos + step])
        pos += step
    assert parse_chunks(chunks) == EXPECTED


def test_events_are_dispatched_as_soon_as_their_blank_line_arrives() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\n") == [SseEvent(data="a")]
    # A CR-terminated blank line dispatches at once, without waiting to see whether LF follows.
    assert parser.feed(b"data: b\r\r") == [SseEvent(data="b")]
    assert parser.feed(b"\ndata: c\n\n") == [SseEvent(data="c")]


def test_crlf_split_between_cr_and_lf_is_one_line_ending() -> None:
    parser = SseParser()
    events = parser.feed(b"data: x\r") + parser.feed(b"\n") + parser.feed(b"data: y\r")
    events += parser.feed(b"\n\r") + parser.feed(b"\n")
    # "data: x\r\n data: y\r\n \r\n": one event with two data lines, no empty line in between.
    assert events == [SseEvent(data="x\ny")]


def test_flush_dispatches_a_last_event_without_its_blank_line() -> None:
    parser = SseParser()
    assert parser.feed(b"data: [DONE]") == []
    assert parser.flush() == [SseEvent(data="[DONE]")]


def test_flush_completes_a_truncated_utf8_character_with_a_replacement() -> None:
    parser = SseParser()
    assert parser.feed("data: é".encode()[:-1]) == []
    assert parser.flush() == [SseEvent(data="\ufffd")]


def test_bom_is_stripped_only_at_the_start() -> None:
    events = parse_chunks([b"\xef\xbb", b"\xbfdata: a\n\ndata: \xef\xbb\xbfb\n\n"])
    assert events == [SseEvent(data="a"), SseEvent(data="\ufeffb")]
