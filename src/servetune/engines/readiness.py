"""Wait until a launched engine really serves: health check, then one real one-token generation.

A process that exits first, or a deadline that passes, becomes EngineStartFailed with a FailureKind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx

from servetune.core.study import FailureKind, Params
from servetune.deploy.base import RunningEngine
from servetune.engines.base import Endpoint, Engine
from servetune.errors import EngineStartFailed

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
"""Pause between health polls."""

Classifier = Callable[[str, int | None], tuple[FailureKind, str]]
"""``Engine.classify_failure`` with the trial's params bound."""

PROBE_PROMPT = "Hello"
"""Prompt of the one-token readiness generation."""


async def wait_ready(
    endpoint: Endpoint,
    running: RunningEngine,
    engine: Engine,
    timeout_s: float,
    *,
    poll_interval_s: float = POLL_INTERVAL_S,
    params: Params | None = None,
) -> float:
    """Seconds from the call until the engine answered its health path (200) and one generation.

    Polls ``endpoint.base_url + engine.health_path`` (llama.cpp answers 503 while loading) until
    200, then POSTs ``/v1/completions`` with ``max_tokens: 1`` until it returns a choice (503 and
    connection errors are retried). Raises EngineStartFailed: with ``engine.classify_failure(log,
    returncode)`` when the process exits first; STARTUP_TIMEOUT when ``timeout_s`` passes; the
    classified kind (UNKNOWN when nothing matches) when the generation gets a non-retryable error.
    ``params``: the trial's params, for advice that never repeats them.
    """
    classify = functools.partial(engine.classify_failure, params=params)
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    last = "no answer yet"
    # built off the event loop: its default TLS context loads the CA bundle (~0.1 s measured)
    client = await asyncio.to_thread(httpx.AsyncClient)
    async with client:
        health_url = endpoint.base_url + engine.health_path
        while True:
            _check_alive(running, classify)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timeout(timeout_s, last)
            try:
                r = await _unless_exited(
                    client.get(health_url, timeout=min(5.0, remaining)),
                    running,
                    classify,
                    poll_interval_s,
                )
            except httpx.HTTPError as e:
                last = f"GET {engine.health_path}: {type(e).__name__} {e}".strip()
            else:
                if r.status_code == 200:
                    break
                last = f"GET {engine.health_path} answered {r.status_code}"
            await asyncio.sleep(min(poll_interval_s, max(0.0, deadline - time.monotonic())))

        body = {
            "model": endpoint.model,
            "prompt": PROBE_PROMPT,
            "max_tokens": 1,
            "temperature": 0.0,
            "stream": False,
        }
        url = endpoint.base_url + "/v1/completions"
        while True:
            _check_alive(running, classify)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timeout(timeout_s, last)
            try:
                r = await _unless_exited(
                    client.post(url, json=body, timeout=remaining),
                    running,
                    classify,
                    poll_interval_s,
                )
            except httpx.HTTPError as e:
                last = f"POST /v1/completions: {type(e).__name__} {e}".strip()
            else:
                if r.status_code == 200 and _has_choice(r):
                    break
                last = f"POST /v1/completions answered {r.status_code}: {r.text[:300]}"
                if r.status_code != 503:
                    kind, reason = classify(running.log_text(), running.returncode())
                    if kind is FailureKind.UNKNOWN:
                        reason = last
                    raise EngineStartFailed(kind, reason)
            await asyncio.sleep(min(poll_interval_s, max(0.0, deadline - time.monotonic())))
    ready_s = time.monotonic() - t0
    logger.debug("engine at %s ready in %.2f s", endpoint.base_url, ready_s)
    return ready_s


async def _unless_exited(
    request: Coroutine[Any, Any, httpx.Response],
    running: RunningEngine,
    classify: Classifier,
    poll_interval_s: float,
) -> httpx.Response:
    """Await ``request``, but raise EngineStartFailed as soon as the process exits meanwhile
    (a socket that accepts but never answers must not hide a dead engine until the timeout)."""
    task = asyncio.ensure_future(request)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_interval_s)
            if done:
                return task.result()
            _check_alive(running, classify)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _check_alive(running: RunningEngine, classify: Classifier) -> None:
    rc = running.returncode()
    if rc is not None:
        kind, reason = classify(running.log_text(), rc)
        raise EngineStartFailed(kind, reason)


def _timeout(timeout_s: float, last: str) -> EngineStartFailed:
    return EngineStartFailed(
        FailureKind.STARTUP_TIMEOUT, f"not ready after {timeout_s:g} s (last: {last})"
    )


def _has_choice(r: httpx.Response) -> bool:
    try:
        data = r.json()
    except ValueError:
        return False
    return isinstance(data, dict) and bool(data.get("choices"))
