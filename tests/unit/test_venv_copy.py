"""The venv copy, an offline deploy's last resort: when the manager's venv may be copied to a host,
what is left out of the copy, and the agent's fix-up of a copied venv (on a small fake venv)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from servetune.errors import DeployFailed
from servetune.remote import agent
from servetune.remote.deploy import ONLINE_MIN_FREE_GIB, free_space_needed_gib
from servetune.remote.models import Category
from servetune.remote.ssh import _tar_stream, excluded
from servetune.remote.venvcopy import Interpreter, copy_refusal, excludes, wheels_unavailable

MANAGER = Interpreter("cpython", "3.11.7", "x86_64", "glibc", "2.36")


def host(**changes: str) -> Interpreter:
    """The manager's interpreter with ``changes``."""
    values = {
        "implementation": MANAGER.implementation,
        "version": MANAGER.version,
        "arch": MANAGER.arch,
        "libc": MANAGER.libc,
        "libc_version": MANAGER.libc_version,
    }
    values.update(changes)
    return Interpreter(**values)


@pytest.mark.parametrize(
    "same",
    [host(), host(arch="amd64"), host(arch="X86_64"), host(libc_version="2.41")],
    ids=["identical", "amd64-alias", "upper-case", "newer-glibc"],
)
def test_a_host_with_the_managers_interpreter_may_get_the_venv(same: Interpreter) -> None:
    assert copy_refusal(MANAGER, same, manager_in_venv=True) is None


@pytest.mark.parametrize(
    ("other", "clause"),
    [
        (host(version="3.12.1"), "Python 3.11.7 here, 3.12.1 on the host"),
        (host(version="3.11.2"), "Python 3.11.7 here, 3.11.2 on the host"),
        (host(implementation="pypy"), "cpython here, pypy on the host (CPython only)"),
        (host(arch="aarch64"), "x86_64 here, aarch64 on the host"),
        (host(libc="musl", libc_version="1.2.4"), "glibc here, musl on the host"),
        (host(libc_version="2.31"), "glibc 2.36 here, older 2.31 on the host"),
        (host(libc="", libc_version=""), "the host's C library is unknown"),
        (host(libc_version="?"), "the host's glibc version is unknown"),
    ],
)
def test_any_difference_is_named_with_both_sides(other: Interpreter, clause: str) -> None:
    assert copy_refusal(MANAGER, other, manager_in_venv=True) == clause


def test_a_manager_outside_a_venv_has_no_venv_to_copy() -> None:
    found = copy_refusal(MANAGER, host(), manager_in_venv=False)
    assert found is not None and "does not run from a venv" in found


def test_only_wheels_the_manager_cannot_get_trigger_the_copy() -> None:
    def fails(category: Category, message: str) -> DeployFailed:
        return DeployFailed(category, message, "…", step="bundle")

    assert wheels_unavailable(fails(Category.INDEX_UNREACHABLE, "the manager cannot reach"))
    assert wheels_unavailable(
        fails(Category.INSTALL_FAILED, "numpy has no wheel for CPython 3.11.7 on x86_64-…")
    )
    assert wheels_unavailable(fails(Category.INSTALL_FAILED, "pip download put no uv wheel for"))
    assert not wheels_unavailable(fails(Category.INSTALL_FAILED, "uv is not installed"))
    assert not wheels_unavailable(fails(Category.STEP_TIMEOUT, "ran past 900 s"))


def test_the_copy_leaves_out_byte_code_and_the_python_links() -> None:
    patterns = excludes("3.11.7")
    for path in (
        "lib/python3.11/site-packages/x/__pycache__",
        "lib/python3.11/site-packages/x/__pycache__/y.cpython-311.pyc",
        "lib/python3.11/site-packages/x/y.pyc",
        "bin/python",
        "bin/python3",
        "bin/python3.11",
    ):
        assert excluded(path, patterns), path
    for path in ("bin/python3-config", "lib/python3.11/site-packages/python", "bin/pip", "lib"):
        assert not excluded(path, patterns), path


def test_the_tar_stream_leaves_out_what_rsync_would(tmp_path: Path) -> None:
    """The tar fallback of push_dir (no rsync on the host) excludes as rsync's --exclude does."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to("/usr/bin/python3")
    (tmp_path / "bin" / "pip").write_text("#!/x/bin/python\n")
    (tmp_path / "lib" / "m" / "__pycache__").mkdir(parents=True)
    (tmp_path / "lib" / "m" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "lib" / "m" / "a.py").write_text("")
    (tmp_path / "lib" / "m" / "old.pyc").write_bytes(b"\0")

    async def collect() -> bytes:
        return b"".join([c async for c in _tar_stream(tmp_path, excludes("3.11.7"))])

    with tarfile.open(fileobj=io.BytesIO(asyncio.run(collect()))) as archive:
        names = sorted(archive.getnames())
    assert names == ["bin", "bin/pip", "lib", "lib/m", "lib/m/a.py"]


def test_the_prepare_step_asks_for_room_for_the_venv_copy() -> None:
    gib = 2**30
    assert free_space_needed_gib(wheelhouse_bytes=None, venv_copy_bytes=None) == (
        ONLINE_MIN_FREE_GIB
    )
    assert free_space_needed_gib(wheelhouse_bytes=None, venv_copy_bytes=gib // 2) == (
        ONLINE_MIN_FREE_GIB
    )
    # a venv with torch: the copy and the venv it replaces
    assert free_space_needed_gib(wheelhouse_bytes=None, venv_copy_bytes=5 * gib) == 10.0
    assert free_space_needed_gib(wheelhouse_bytes=gib, venv_copy_bytes=None) == 3.0


# ---- the agent's fix-up --------------------------------------------------------------------------

OLD = "/work/manager/.venv"


def fake_venv(root: Path, outside: Path) -> Path:
    """A venv as ``python -m venv`` + uv make it at OLD, copied to ``root/staging``."""
    venv = root / "staging"
    bin_dir = venv / "bin"
    site = venv / "lib" / "python3.11" / "site-packages"
    bin_dir.mkdir(parents=True)
    site.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(
        "home = /root/.pyenv/versions/3.11.7/bin\n"
        "include-system-site-packages = false\n"
        "version = 3.11.7\n"
        "executable = /root/.pyenv/versions/3.11.7/bin/python3.11\n"
        f"command = /root/.pyenv/versions/3.11.7/bin/python3 -m venv {OLD}\n"
    )
    (bin_dir / "python3").symlink_to("/root/.pyenv/versions/3.11.7/bin/python3")
    (bin_dir / "python").symlink_to("python3")
    (bin_dir / "servetune").write_text(f"#!{OLD}/bin/python\nimport sys\n")
    (bin_dir / "pip").write_text(f"#!{OLD}/bin/python3.11 -E\n# {OLD}2 stays\n")
    (bin_dir / "activate").write_text(f"VIRTUAL_ENV='{OLD}'\nexport PATH=\"{OLD}/bin:$PATH\"\n")
    (bin_dir / "other").write_text(f"#!/usr/bin/env python3\nprint('{OLD}2')\n")
    (bin_dir / "uv").write_bytes(b"\x7fELF\0\0" + OLD.encode())
    (outside / "elsewhere").write_text(f"#!{OLD}/bin/python\n")
    (bin_dir / "linked").symlink_to(outside / "elsewhere")
    os.chmod(bin_dir / "servetune", 0o755)
    # servetune installed editable, as on a developer's manager
    info = site / "servetune-0.1.0.dist-info"
    info.mkdir()
    (info / "direct_url.json").write_text(
        json.dumps({"url": "file:///work/manager", "dir_info": {"editable": True}})
    )
    (site / "_editable_impl_servetune.pth").write_text("/work/manager/src\n")
    (info / "RECORD").write_text(
        "../../../bin/servetune,,\n"
        "_editable_impl_servetune.pth,,\n"
        "servetune-0.1.0.dist-info/RECORD,,\n"
        "../../../../../outside/elsewhere,,\n"
    )
    (site / "numpy").mkdir()
    return venv


def test_fix_venv_points_the_copy_at_its_new_place_and_the_hosts_python(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    venv = fake_venv(tmp_path, outside)
    python = tmp_path / "host-python" / "bin" / "python3.11"
    python.parent.mkdir(parents=True)
    python.write_text("")
    (python.parent / "python3").symlink_to("python3.11")
    new = "/opt/servetune/venv"

    found = agent.fix_venv(str(venv), OLD, new, str(python.parent / "python3"))

    cfg = (venv / "pyvenv.cfg").read_text().splitlines()
    assert f"home = {python.parent}" in cfg  # the resolved interpreter's folder
    assert f"executable = {python}" in cfg
    assert not any(line.startswith("command") for line in cfg)
    assert "version = 3.11.7" in cfg and "include-system-site-packages = false" in cfg
    for name in ("python", "python3", "python3.11"):
        link = venv / "bin" / name
        assert link.is_symlink() and os.readlink(link) == str(python), name
    assert (venv / "bin" / "servetune").read_text() == f"#!{new}/bin/python\nimport sys\n"
    assert os.stat(venv / "bin" / "servetune").st_mode & 0o777 == 0o755  # mode kept
    # the first line only: a longer path in the body is not the old prefix
    assert (venv / "bin" / "pip").read_text() == f"#!{new}/bin/python3.11 -E\n# {OLD}2 stays\n"
    assert (venv / "bin" / "activate").read_text() == (
        f"VIRTUAL_ENV='{new}'\nexport PATH=\"{new}/bin:$PATH\"\n"
    )
    assert f"'{OLD}2'" in (venv / "bin" / "other").read_text()
    assert (venv / "bin" / "uv").read_bytes().endswith(OLD.encode())  # a binary: untouched
    # a link out of the venv is neither followed nor rewritten
    assert (outside / "elsewhere").read_text() == f"#!{OLD}/bin/python\n"
    assert (venv / "bin" / "linked").is_symlink()
    assert found["scripts"] == 2 and found["texts"] == 1 and found["version"] == "3.11"


def test_fix_venv_refuses_a_copy_that_was_not_made_at_the_old_prefix(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    venv = fake_venv(tmp_path, outside)
    with pytest.raises(agent.AgentError) as caught:
        agent.fix_venv(str(venv), "/somewhere/else/.venv", "/opt/x/venv", "/usr/bin/python3")
    assert caught.value.kind == "install_failed"
    assert str(venv / "bin") in caught.value.message
    assert "/somewhere/else/.venv/bin/python" in caught.value.message


def test_fix_venv_refuses_a_folder_that_is_not_a_venv(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    with pytest.raises(agent.AgentError) as caught:
        agent.fix_venv(str(tmp_path), OLD, "/opt/x/venv", "/usr/bin/python3")
    assert caught.value.kind == "install_failed"
    assert str(tmp_path) in caught.value.message and "pyvenv.cfg" in caught.value.message


def test_the_managers_editable_servetune_is_removed_from_the_copy(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    venv = fake_venv(tmp_path, outside)
    site = venv / "lib" / "python3.11" / "site-packages"

    removed = agent.drop_installed(str(site), str(venv), "servetune")

    assert not (site / "servetune-0.1.0.dist-info").exists()
    assert not (site / "_editable_impl_servetune.pth").exists()
    assert not (venv / "bin" / "servetune").exists()
    assert (site / "numpy").is_dir()
    assert (outside / "elsewhere").exists(), "a RECORD entry outside the venv is never removed"
    assert str(venv / "bin" / "servetune") in removed
