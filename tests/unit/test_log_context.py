"""log_context (contextvars, inherited by asyncio tasks), the source rules, and the engine-log tailer.

No sockets: the tailer is checked with a real logging handler that collects what it logs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from servetune.cluster.logs import (
    SOURCE_ATTR,
    EngineLogTailer,
    LogContext,
    current_log_context,
    log_context,
    source_of,
)
from servetune.cluster.models import LogSource


def _record(name: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, "m", None, None)
    record.__dict__.update(extra)
    return record


def test_contexts_nest_merge_and_reset() -> None:
    assert current_log_context() == LogContext()
    with log_context(study_id=1) as outer:
        assert outer == LogContext(study_id=1)
        with log_context(trial_id=9, trial_number=3) as inner:
            assert inner == LogContext(study_id=1, trial_id=9, trial_number=3)
            with log_context(study_id=2, source=LogSource.ENGINE):
                assert current_log_context() == LogContext(2, 9, 3, LogSource.ENGINE)
            assert current_log_context() == inner
        assert current_log_context() == outer
    assert current_log_context() == LogContext()


def test_asyncio_tasks_inherit_the_context_and_keep_it_to_themselves() -> None:
    async def trial(number: int) -> LogContext:
        with log_context(trial_id=100 + number, trial_number=number):
            await asyncio.sleep(0.01)  # the other trial runs meanwhile
            child = asyncio.create_task(asyncio.sleep(0, result=None))
            await child
            return await asyncio.create_task(_current_later())

    async def _current_later() -> LogContext:
        await asyncio.sleep(0)
        return current_log_context()

    async def main() -> list[LogContext]:
        with log_context(study_id=5):
            return list(await asyncio.gather(trial(0), trial(1)))

    assert asyncio.run(main()) == [LogContext(5, 100, 0), LogContext(5, 101, 1)]


@pytest.mark.parametrize(
    ("name", "context", "extra", "source"),
    [
        ("servetune.worker.main", LogContext(), {}, LogSource.WORKER),
        ("servetune.runner", LogContext(study_id=1, trial_id=2), {}, LogSource.TRIAL),
        ("servetune.bench.builtin", LogContext(trial_id=2), {}, LogSource.BENCHMARK),
        ("servetune.bench", LogContext(), {}, LogSource.BENCHMARK),
        ("servetune.benchmarks", LogContext(), {}, LogSource.WORKER),  # a prefix, not a package
        ("servetune.deploy.local", LogContext(trial_id=2), {}, LogSource.DEPLOYMENT),
        ("servetune.runner", LogContext(trial_id=2, source=LogSource.ENGINE), {}, LogSource.ENGINE),
        # the logger name wins over a context's source: the benchmark stays the benchmark
        ("servetune.bench.sse", LogContext(source=LogSource.ENGINE), {}, LogSource.BENCHMARK),
        # and the record's own source wins over everything
        ("servetune.deploy.local", LogContext(), {SOURCE_ATTR: "engine"}, LogSource.ENGINE),
    ],
)
def test_source_rules(
    name: str, context: LogContext, extra: dict[str, object], source: LogSource
) -> None:
    assert source_of(_record(name, **extra), context) == source


class _Collect(logging.Handler):
    """Keeps (message, source attribute, log context at emit) of each record."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, object, LogContext]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(
            (record.getMessage(), getattr(record, SOURCE_ATTR, None), current_log_context())
        )


@pytest.fixture
def engine_logger() -> Iterator[tuple[logging.Logger, _Collect]]:
    log = logging.getLogger("servetune.test_tailer")
    log.setLevel(logging.INFO)
    log.propagate = False
    collect = _Collect()
    log.addHandler(collect)
    yield log, collect
    log.removeHandler(collect)
    log.propagate = True


def test_tailer_follows_a_growing_file(
    tmp_path: Path, engine_logger: tuple[logging.Logger, _Collect]
) -> None:
    log, collect = engine_logger
    path = tmp_path / "engine.log"

    def messages() -> list[str]:
        return [m for m, _, _ in collect.seen]

    async def scenario() -> None:
        with log_context(study_id=1, trial_id=2, trial_number=0):
            tailer = EngineLogTailer(path, log, poll_s=0.01, max_line_bytes=30).start()
        await asyncio.sleep(0.05)
        assert messages() == []  # no file yet: waited for, no error
        with path.open("ab") as f:
            f.write(b"line one\r\n\nline tw")
        await asyncio.sleep(0.05)
        assert messages() == ["line one"]  # the partial line is held, the blank one skipped
        with path.open("ab") as f:
            f.write(b"o 100%% done {x}\n" + b"x" * 65 + b"\n\xff bad byte\n")
        await asyncio.sleep(0.05)
        assert messages()[1:] == [
            "line two 100%% done {x}",
            "x" * 30,
            "x" * 30,
            "x" * 5,
            "\ufffd bad byte",
        ]
        path.write_bytes(b"after truncation\n")  # the engine restarted its log
        await asyncio.sleep(0.05)
        with path.open("ab") as f:
            f.write(b"last words without newline")
        await tailer.stop()
        assert tailer.lines == 8

    asyncio.run(scenario())
    assert messages()[-2:] == ["after truncation", "last words without newline"]
    assert {(s, c) for _, s, c in collect.seen} == {
        (LogSource.ENGINE, LogContext(study_id=1, trial_id=2, trial_number=0))
    }


def test_tailer_stopped_before_the_file_exists_ends_quietly(
    tmp_path: Path, engine_logger: tuple[logging.Logger, _Collect]
) -> None:
    log, collect = engine_logger

    async def scenario() -> None:
        async with EngineLogTailer(tmp_path / "never.log", log, poll_s=0.01):
            await asyncio.sleep(0.03)

    asyncio.run(scenario())
    assert collect.seen == []
