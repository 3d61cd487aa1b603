"""Helpers for tests that start the real llama.cpp server (xllamacpp) through LocalDeployment.

``running_engine`` always stops the engine's whole process group, even when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from servetune.core.spec import LlamaCppEngineSpec
from servetune.core.study import Params
from servetune.deploy.local import LocalDeployment, LocalRunningEngine
from servetune.engines.base import Endpoint
from servetune.engines.llamacpp import LlamaCppEngine
from servetune.engines.readiness import wait_ready


def tiny_engine(model: Path | str, **kw: Any) -> LlamaCppEngine:
    """The wheel-backed engine on ``model``, two threads, fit off (fast failures on 2 cores)."""
    flags = {"threads": 2, "fit": "off", **kw.pop("flags", {})}
    kw.setdefault("binary", "xllamacpp")
    return LlamaCppEngine(LlamaCppEngineSpec(kind="llamacpp", model=str(model), flags=flags, **kw))


@dataclass
class Started:
    """A started engine: its process, where it answers, and seconds until it was ready."""

    running: LocalRunningEngine
    endpoint: Endpoint
    ready_s: float


@asynccontextmanager
async def running_engine(
    engine: LlamaCppEngine,
    params: Params,
    log_path: Path,
    *,
    timeout_s: float = 60.0,
    port: int | None = None,
) -> AsyncIterator[Started]:
    """Start ``engine`` with ``params``, wait until ready, yield, then stop it (always)."""
    deployment = LocalDeployment(stop_timeout_s=5.0)
    host, reserved = deployment.reserve_port()
    port = reserved if port is None else port
    command = engine.launch_command(params, host=host, port=port)
    running = await deployment.start(command, log_path)
    try:
        endpoint = engine.endpoint(host, port)
        ready_s = await wait_ready(endpoint, running, engine, timeout_s, params=params)
        yield Started(running, endpoint, ready_s)
    finally:
        await running.stop()


async def stream_completion(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int
) -> tuple[int, dict[str, Any]]:
    """(content chunks received, usage) of one greedy streamed /v1/completions request, sent as
    the benchmark client sends it (``ignore_eos``, usage in the last chunk) on ``client``."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    chunks, usage = 0, dict[str, Any]()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if event.get("choices") and event["choices"][0].get("text"):
                chunks += 1
            usage = event.get("usage") or usage
    return chunks, usage


@contextmanager
def server_process(model: Path | str, log_path: Path, params: Params) -> Iterator[str]:
    """The wheel-backed llama.cpp server on ``model`` as a plain subprocess (served as ``tiny``),
    launched with servetune's own command for ``params``; yields its base URL once ``/health``
    answers, and stops its whole process group afterwards (SIGTERM, then SIGKILL)."""
    engine = tiny_engine(model, served_model_name="tiny")
    host, port = LocalDeployment().reserve_port()
    argv = engine.launch_command(params, host=host, port=port).argv
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(  # noqa: S603 - servetune's own argv
            argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "llama.cpp server not ready in 60 s"
            time.sleep(0.1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
