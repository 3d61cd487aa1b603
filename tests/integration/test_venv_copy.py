"""Issue #8's last resort for real: neither the host nor the manager reaches the package index, so
the manager's own venv is copied to a host whose Python matches it, and refused for one that does
not.

The index is a closed local port for both sides (``package_index_url``) and the wheelhouse cache
is a fresh empty one, so no cached offline bundle stands in. The loopback host runs the manager's
own interpreter (same machine, same binary: everything matches); the netns host's pyenv 3.12.1
does not.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servetune.remote.models import Category, OfflineMode, RedisVia, StepStatus
from servetune.settings import Settings
from tests.integration.deploy_helpers import (
    SHARED_WHEELHOUSE,
    assert_ok,
    deploy,
    describe,
    installs_killed,
    make_slot,
    manager_settings,
    step,
)
from tests.redis_server import free_port, redis_server
from tests.sshd import NetnsHost, SshServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MANAGER_PYTHON = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}"
"""The interpreter the manager's venv was made from (the loopback host's slot runs it)."""

PYENV_312 = Path("/root/.pyenv/versions/3.12.1/bin/python3")


@pytest.fixture(autouse=True)
def _no_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager's uv gives up on the closed index at once (not after 3 retries, ~3.6 s)."""
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")


def no_index_settings(folder: Path, **overrides: object) -> Settings:
    """Manager settings whose package index is a closed local port and whose wheelhouse cache
    holds no bundle (its own folder; only servetune's own wheel, keyed by its source hash, comes
    from the shared cache, built there once)."""
    (folder / "wheelhouse").mkdir(parents=True)
    (SHARED_WHEELHOUSE / "servetune").mkdir(parents=True, exist_ok=True)
    (folder / "wheelhouse" / "servetune").symlink_to(SHARED_WHEELHOUSE / "servetune")
    values: dict[str, object] = {
        "package_index_url": f"http://127.0.0.1:{free_port()}/simple",
        "ssh_connect_timeout_s": 5.0,
    }
    values.update(overrides)
    return manager_settings(folder, **values)


@contextlib.contextmanager
def tmpfs(where: Path) -> Iterator[Path]:
    """A tmpfs at ``where`` (unmounted after): the host's install directory, so that the copy's
    ~530 MiB of writes cost what the transfer costs, not what this machine's disk does that
    minute (a plain ``cp -a`` of the venv takes 2-10 s here)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", str(where)], check=True)  # noqa: S603
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)  # noqa: S603


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the tests do not run from a venv")
def test_no_index_anywhere_copies_the_managers_venv_to_a_matching_host(
    loopback_host: SshServer, client_key: Path, tmp_path: Path
) -> None:
    settings = no_index_settings(tmp_path / "manager", register_timeout_s=30.0)
    install = tmp_path / "host" / "install"
    with (
        tmpfs(tmp_path / "host"),
        redis_server(tmp_path / "redis") as redis,
        installs_killed(install),
    ):
        slot = make_slot(
            "venv-copy",
            loopback_host.ssh_command(client_key),
            str(install),
            python=str(MANAGER_PYTHON),
            redis_via=RedisVia.DIRECT,
            redis_address=f"127.0.0.1:{redis.port}",
            offline=OfflineMode.AUTO,
        )
        started = time.monotonic()
        report = deploy(settings, redis.url, slot)
        print(f"\n{describe(report)}\n(deploy took {time.monotonic() - started:.1f} s)")
        assert_ok(report)
        bundle = step(report, "bundle")
        assert bundle.status == StepStatus.WARNING, describe(report)
        assert bundle.category == Category.INDEX_UNREACHABLE
        assert f"copying the manager's venv {sys.prefix}" in bundle.detail
        assert "installed by copying the manager's venv" in step(report, "install").detail
        assert step(report, "register").status == StepStatus.OK
        venv = install / "venv"
        assert f"home = {MANAGER_PYTHON.resolve().parent}" in (venv / "pyvenv.cfg").read_text()
        assert (venv / "bin" / "servetune").read_text().startswith(f"#!{venv}/bin/python")
        site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
        assert not list(site.glob("*editable*servetune*")), "the manager's editable install is gone"
        imported = subprocess.run(  # noqa: S603
            [venv / "bin" / "python", "-I", "-c", "import servetune; print(servetune.__file__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert imported.startswith(f"{site}/servetune/"), "servetune from the wheel, not the tree"
        assert '"bundle": "venv-copy-' in (install / "installed.json").read_text()


@pytest.mark.skipif(not PYENV_312.exists(), reason=f"{PYENV_312} is not installed")
def test_a_host_with_another_python_gets_the_original_failure_saying_why_no_copy(
    netns_remote: tuple[NetnsHost, SshServer], client_key: Path, tmp_path: Path
) -> None:
    _, server = netns_remote
    settings = no_index_settings(tmp_path / "manager")
    slot = make_slot(
        "other-python",
        server.ssh_command(client_key),
        str(tmp_path / "install"),
        python=str(PYENV_312),
        redis_via=RedisVia.DIRECT,
        redis_address="127.0.0.1:6379",
        offline=OfflineMode.AUTO,
    )
    report = deploy(settings, "redis://127.0.0.1:1/0", slot)
    print(f"\n{describe(report)}")
    assert not report.success
    assert report.category == Category.INDEX_UNREACHABLE, describe(report)
    assert report.steps[-1].name == "bundle", describe(report)
    mine = ".".join(map(str, sys.version_info[:3]))
    clause = f"the manager's venv cannot be copied instead: Python {mine} here, 3.12.1 on the host"
    assert clause in report.message, describe(report)
    assert "cannot be copied instead" in (report.suggestion or ""), describe(report)
