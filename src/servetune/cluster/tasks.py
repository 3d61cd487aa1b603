"""Stopping asyncio tasks that talk to Redis: cancel until they end, and re-raise a lost cancel.

The retrying redis-py client can swallow a cancellation that lands mid-command (Python 3.11:
the call returns normally while ``Task.cancelling()`` stays > 0), so a task is cancelled again
until it ends, and loops around Redis calls check ``raise_if_cancelled``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

RECANCEL_EVERY_S = 0.2
"""How often ``cancel_and_wait`` cancels a task again, after its grace, that has not ended, s."""
GRACE_S = 5.0
"""How long ``cancel_and_wait`` lets a cancelled task clean up before cancelling it again, s."""


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], timeout_s: float, grace_s: float = GRACE_S
) -> bool:
    """Cancel ``tasks`` and wait up to ``timeout_s`` (s) for them to end; True when all ended.

    A task still running ``grace_s`` after the first cancel (its cancellation was swallowed, or
    its clean-up hangs) is cancelled again every ``RECANCEL_EVERY_S`` until the deadline; the
    grace keeps a task's own clean-up (recording its trials as cancelled, aborting jobs) from
    being cut short by a second cancel. Results and errors of the tasks are retrieved (an error
    raised while stopping is not worth a warning); tasks still running at the deadline are logged
    at WARNING and left running. Never raises (but for the caller's own cancellation)."""
    tasks = set(tasks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    if pending:
        _, pending = await asyncio.wait(pending, timeout=max(0.0, min(grace_s, timeout_s)))
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(
            pending, timeout=max(0.0, min(RECANCEL_EVERY_S, deadline - loop.time()))
        )
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()
    if pending:
        names = ", ".join(sorted(t.get_name() for t in pending))
        log.warning(
            "%d task(s) still running %.0f s after the stop: %s", len(pending), timeout_s, names
        )
    return not pending


def raise_if_cancelled() -> None:
    """Re-raise a cancellation of the current task that a Redis call swallowed (see the module
    docstring); call it after Redis calls in loops that must stop when cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
