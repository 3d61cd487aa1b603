"""When a study's lease holder counts as alive: expiry, another host, a gone or reused pid.

Reads /proc and signals only this test's own processes; no sockets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

from servetune.settings import Settings
from servetune.store.repo import StudyLease
from servetune.study_session import holder_alive


def lease(pid: int, host: str, acquired_s_ago: float = 1.0, ttl_s: float = 60) -> StudyLease:
    now = datetime.now(UTC)
    return StudyLease(
        owner_id="run-1",
        host=host,
        pid=pid,
        acquired_at=now - timedelta(seconds=acquired_s_ago),
        renewed_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
    )


def test_a_live_local_holder_is_alive_and_an_expired_one_is_not(tmp_path) -> None:
    here = Settings(data_dir=tmp_path, host_name="here")
    assert holder_alive(lease(os.getpid(), "here"), here)
    assert not holder_alive(lease(os.getpid(), "here", ttl_s=-1), here)


def test_a_holder_on_another_host_is_alive_until_its_lease_expires(tmp_path) -> None:
    here = Settings(data_dir=tmp_path, host_name="here")
    assert holder_alive(lease(999_999_999, "elsewhere"), here)  # no such pid here: unknowable
    assert not holder_alive(lease(999_999_999, "elsewhere", ttl_s=-1), here)


def test_a_gone_zombie_or_reused_local_pid_is_dead(tmp_path) -> None:
    here = Settings(data_dir=tmp_path, host_name="here")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # exited but not reaped: a zombie
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)
    assert not holder_alive(lease(child.pid, "here"), here)
    child.wait()
    assert not holder_alive(lease(child.pid, "here"), here)  # gone
    # this process started long after a lease taken an hour ago: its pid was reused
    assert not holder_alive(lease(os.getpid(), "here", acquired_s_ago=3600), here)
