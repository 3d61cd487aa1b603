"""Helpers of the deploy tests: worker slots, a Deployer run from a sync test, cleanup of what a
deployed worker left running.

The Deployer runs in the test process, as the manager's API would run it; the remote hosts are
real sshd servers (``tests/sshd.py``); the worker it starts is a real ``servetune worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio

from servetune.cluster.registry import Registry, WorkerStatus
from servetune.remote.deploy import Deployer
from servetune.remote.models import (
    DeployReport,
    OfflineMode,
    RedisVia,
    SlotStatus,
    StepStatus,
    WorkerSlot,
)
from servetune.settings import Settings

SHARED_WHEELHOUSE = Path(
    os.environ.get("SERVETUNE_TEST_WHEELHOUSE", "/tmp/servetune-test-wheelhouse")
)
"""Wheelhouse cache shared by the deploy tests of one machine (bundles are keyed by servetune's
version + source hash, Python version and platform, so a stale one is never reused)."""


def manager_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings of the manager side of a deploy: its data directory (ssh files) with the shared
    wheelhouse cache linked in, short ssh timeouts; ``overrides`` win (authorized_keys_path,
    manager_ssh, register_timeout_s, …)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    SHARED_WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    link = data_dir / "wheelhouse"
    if not link.exists():
        link.symlink_to(SHARED_WHEELHOUSE, target_is_directory=True)
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "ssh_connect_timeout_s": 5.0,
        "register_timeout_s": 90.0,
        "deploy_install_timeout_s": 900.0,
        "heartbeat_s": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


def make_slot(
    name: str,
    ssh_command: str,
    install_dir: str,
    *,
    python: str = "python3",
    redis_via: RedisVia = RedisVia.FORWARD,
    manager_ssh: str | None = None,
    redis_address: str | None = None,
    offline: OfflineMode = OfflineMode.AUTO,
) -> WorkerSlot:
    """A stored-looking worker slot (id 1, never seen), validated as the API would."""
    now = datetime.now(UTC)
    return WorkerSlot.model_validate(
        {
            "id": 1,
            "name": name,
            "ssh_command": ssh_command,
            "install_dir": install_dir,
            "python": python,
            "redis_via": redis_via,
            "manager_ssh": manager_ssh,
            "redis_address": redis_address,
            "offline": offline,
            "status": SlotStatus.NEVER_SEEN,
            "created_at": now,
            "updated_at": now,
        }
    )


async def _with_deployer(
    settings: Settings, redis_url: str, action: str, *args: Any, **kw: Any
) -> Any:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        deployer = Deployer(settings, redis_url, Registry(client, settings))
        return await getattr(deployer, action)(*args, **kw)
    finally:
        await client.aclose()


def deploy(
    settings: Settings, redis_url: str, slot: WorkerSlot, *, offline: OfflineMode | None = None
) -> DeployReport:
    """``Deployer.deploy(slot)`` run to its end from a synchronous test."""
    report: DeployReport = asyncio.run(
        _with_deployer(settings, redis_url, "deploy", slot, offline=offline)
    )
    return report


def restore(settings: Settings, redis_url: str, slot: WorkerSlot) -> DeployReport:
    """``Deployer.restore(slot)`` run to its end from a synchronous test."""
    report: DeployReport = asyncio.run(_with_deployer(settings, redis_url, "restore", slot))
    return report


def remove(settings: Settings, redis_url: str, slot: WorkerSlot) -> DeployReport:
    """``Deployer.remove(slot)`` (its worker stopped) from a synchronous test; the report."""
    report: DeployReport = asyncio.run(_with_deployer(settings, redis_url, "remove", slot))
    return report


def workers(settings: Settings, redis_url: str) -> list[WorkerStatus]:
    """The registry's workers now."""

    async def read() -> list[WorkerStatus]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await Registry(client, settings).workers()
        finally:
            await client.aclose()

    return asyncio.run(read())


def step(report: DeployReport, name: str) -> Any:
    """The report's step called ``name``; AssertionError listing the steps when absent."""
    for s in report.steps:
        if s.name == name:
            return s
    raise AssertionError(f"no step {name!r} in {[(s.name, s.status.value) for s in report.steps]}")


def describe(report: DeployReport) -> str:
    """The report in a few lines (what an assertion prints)."""
    lines = [
        f"success={report.success} category={report.category} message={report.message}",
        f"suggestion={report.suggestion}",
        *(
            f"  {s.name}: {s.status.value} {s.duration_s:.1f}s {s.category or ''} {s.detail}"
            for s in report.steps
        ),
        *(f"  | {line}" for line in report.logs[-30:]),
    ]
    return "\n".join(lines)


def assert_ok(report: DeployReport) -> None:
    """The deploy succeeded with no failed step; else AssertionError with the whole report."""
    assert report.success, describe(report)
    assert all(s.status != StepStatus.FAILED for s in report.steps), describe(report)


def worker_processes(install_dir: str | Path) -> list[psutil.Process]:
    """Live ``servetune worker`` processes of the install in ``install_dir`` (any namespace:
    netns hosts share the pid namespace)."""
    marker = f"{str(install_dir).rstrip('/')}/venv/bin/servetune"
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = p.info["cmdline"] or []
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in part for part in cmdline) and "worker" in cmdline:
                found.append(p)
        except psutil.Error:
            continue
    return found


def kill_install(install_dir: str | Path) -> None:
    """Kill every process started from ``install_dir`` (the worker, its process group: its
    tunnel and engines) and wait for them to go."""
    marker = str(install_dir).rstrip("/")
    victims = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and any(marker in part for part in p.info["cmdline"] or ()):
                victims.append(p)
    for p in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(victims, timeout=5)


def kill_installs(root: Path, pattern: str) -> None:
    """``kill_install`` of every directory under ``root`` matching the glob ``pattern``."""
    for d in root.glob(pattern):
        kill_install(d)


@contextlib.contextmanager
def installs_killed(*install_dirs: str | Path) -> Iterator[None]:
    """Kill whatever each install directory started when the block ends."""
    try:
        yield
    finally:
        for d in install_dirs:
            kill_install(d)


def wait_until(predicate: Any, timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` every 0.2 s until truthy; its value. AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {timeout_s} s (last {value!r})")
        time.sleep(0.2)
