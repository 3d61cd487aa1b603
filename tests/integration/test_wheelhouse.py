"""Install bundles built for real: resolved by uv for a remote's exact Python, downloaded for its
platform, installed with no index and an empty uv cache, then imported.

The offline wheelhouses are cached across runs under ~/.cache/servetune-tests/wheelhouse (a cache
miss builds them: about 15 s and 100 MB each from the package index).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from servetune.errors import DeployFailed
from servetune.remote import wheelhouse
from servetune.remote.models import Category, RemoteFacts
from servetune.remote.wheelhouse import (
    _uv_binary,
    build_bundle,
    download_wheels,
    platform_target,
    resolve_pins,
    servetune_wheel,
    source_tree,
)
from servetune.settings import Settings

pytestmark = pytest.mark.integration

TEST_CACHE = Path.home() / ".cache" / "servetune-tests"
"""data_dir of the cached bundles: they land in TEST_CACHE/wheelhouse."""

SYSTEM_PYTHON = Path("/usr/bin/python3")
PYENV_312 = Path("/root/.pyenv/versions/3.12.1/bin/python3")

FACTS_CODE = (
    "import json, platform, sys; lib = platform.libc_ver(); print(json.dumps({"
    "'python_version': platform.python_version(), 'implementation': sys.implementation.name, "
    "'arch': platform.machine(), 'libc': lib[0], 'libc_version': lib[1], "
    "'python_executable': sys.executable}))"
)


def run_argv(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """subprocess.run of an argv list (no shell), text mode."""
    return subprocess.run(argv, text=True, **kwargs)  # noqa: S603 - argv lists built here


def facts_of(python: Path) -> RemoteFacts:
    """What the agent's probe would report for this interpreter on this host."""
    found = json.loads(
        run_argv([str(python), "-c", FACTS_CODE], capture_output=True, check=True).stdout
    )
    return RemoteFacts(
        hostname="localhost",
        install_dir="/tmp/unused",
        install_dir_writable=True,
        free_disk_gib=10.0,
        has_rsync=True,
        has_tar=True,
        **found,
    )


def make_wheel(folder: Path, name: str, version: str, requires: list[str], tag: str) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD; one module) named ``name``."""
    dist = f"{name}-{version}"
    info = f"{dist}.dist-info"
    files = {
        f"{name}.py": "",
        f"{info}/METADATA": "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {req}\n" for req in requires),
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture
def local_index(tmp_path: Path) -> Path:
    """A find-links folder: ``app`` depends on ``always``, on ``oldonly`` for Python < 3.12 and on
    ``patchonly`` for Python < 3.11.3 (a marker only the patch version decides); ``native`` has a
    wheel for x86_64 glibc CPython 3.11 only."""
    folder = tmp_path / "links"
    folder.mkdir()
    make_wheel(
        folder,
        "app",
        "1.0",
        [
            "always>=1",
            'oldonly ; python_version < "3.12"',
            'patchonly ; python_full_version < "3.11.3"',
        ],
        "py3-none-any",
    )
    for name in ("always", "oldonly", "patchonly"):
        make_wheel(folder, name, "1.0", [], "py3-none-any")
    make_wheel(folder, "native", "2.0", [], "cp311-cp311-manylinux_2_17_x86_64")
    return folder


def _resolve(requirements: list[str], **kwargs: Any) -> list[str]:
    return asyncio.run(resolve_pins(requirements, **kwargs))


def _download(pins: list[str], **kwargs: Any) -> list[Path]:
    return asyncio.run(download_wheels(pins, **kwargs))


@pytest.mark.parametrize(
    ("python_version", "expected"),
    [
        ("3.11.2", {"app", "always", "oldonly", "patchonly"}),
        ("3.11.7", {"app", "always", "oldonly"}),
        ("3.12.1", {"app", "always"}),
    ],
)
def test_markers_are_evaluated_for_the_remotes_exact_python(
    local_index: Path, python_version: str, expected: set[str]
) -> None:
    pins = _resolve(
        ["app"],
        python_version=python_version,
        triple="x86_64-manylinux_2_36",
        constraints=None,
        index_url=None,
        find_links=local_index,
        timeout_s=60,
    )
    assert {pin.split("==")[0] for pin in pins} == expected
    assert all(re.fullmatch(r"[a-z]+==1\.0", pin) for pin in pins)


def test_requirements_given_as_a_file_url_are_not_pinned_again(local_index: Path) -> None:
    app = next(local_index.glob("app-*.whl"))
    pins = _resolve(
        [f"app @ {app.as_uri()}"],
        python_version="3.12.1",
        triple="x86_64-manylinux_2_36",
        constraints=None,
        index_url=None,
        find_links=local_index,
        timeout_s=60,
    )
    assert pins == ["always==1.0"]


def test_a_package_without_a_wheel_for_the_platform_is_named(
    local_index: Path, tmp_path: Path
) -> None:
    # the x86_64 wheel is found for x86_64 …
    wheels = _download(
        ["native==2.0"],
        dest=tmp_path / "x86",
        target=platform_target("x86_64", "glibc", "2.36"),
        python_version="3.11",
        index_url=None,
        find_links=local_index,
        timeout_s=60,
    )
    assert [w.name for w in wheels] == ["native-2.0-cp311-cp311-manylinux_2_17_x86_64.whl"]
    # … and refused, by name, for aarch64 and for another CPython
    for arch, python in (("aarch64", "3.11"), ("x86_64", "3.12")):
        with pytest.raises(DeployFailed) as caught:
            _download(
                ["always==1.0", "native==2.0"],
                dest=tmp_path / f"{arch}{python}",
                target=platform_target(arch, "glibc", "2.36"),
                python_version=python,
                index_url=None,
                find_links=local_index,
                timeout_s=60,
            )
        assert caught.value.category is Category.INSTALL_FAILED
        assert str(caught.value).startswith(f"native==2.0 has no wheel for CPython {python}")


def test_every_triple_we_map_to_is_one_uv_accepts() -> None:
    help_text = run_argv(
        [_uv_binary(), "pip", "compile", "--help"], capture_output=True, check=True
    ).stdout
    accepted = set(re.findall(r"[a-z0-9_]+-[a-z0-9_]+(?:-[a-z0-9_]+)*", help_text))
    for arch in ("x86_64", "aarch64"):
        for minor in range(17, 45):
            assert platform_target(arch, "glibc", f"2.{minor}").triple in accepted
        assert platform_target(arch, "musl", "1.2").triple in accepted


def _clean_env(uv_cache: Path) -> dict[str, str]:
    """The environment for the install: an empty uv cache, no uv/pip configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_", "VIRTUAL_ENV"))}
    env.update(UV_CACHE_DIR=str(uv_cache), UV_NO_CONFIG="1", UV_PYTHON_DOWNLOADS="never")
    return env


def _uv_from_wheel(wheel: Path, dest: Path) -> Path:
    """The ``uv`` executable inside a uv wheel (what the agent extracts on the remote)."""
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(".data/scripts/uv"))
        target = dest / "uv"
        target.write_bytes(archive.read(member))
    target.chmod(0o755)
    return target


@pytest.mark.slow
@pytest.mark.parametrize(
    "python", [SYSTEM_PYTHON, PYENV_312], ids=["debian-3.11.2", "pyenv-3.12.1"]
)
def test_offline_bundle_installs_with_no_index_and_imports(python: Path, tmp_path: Path) -> None:
    if not python.exists():
        pytest.skip(f"{python} is not installed on this machine")
    facts = facts_of(python)
    settings = Settings(data_dir=TEST_CACHE)

    started = time.monotonic()
    bundle = asyncio.run(build_bundle(settings, facts, offline=True))
    first_s = time.monotonic() - started
    started = time.monotonic()
    again = asyncio.run(build_bundle(settings, facts, offline=True))
    cached_s = time.monotonic() - started
    assert again.cached and again.dir == bundle.dir and cached_s < 5
    size_mib = bundle.size_bytes / 2**20
    print(
        f"\noffline bundle for {facts.python_version} ({bundle.dir.name}): "
        f"{'cached' if bundle.cached else 'built'} in {first_s:.1f} s "
        f"(first build {bundle.build_s:.1f} s), again {cached_s:.2f} s, {size_mib:.0f} MiB"
    )
    assert bundle.offline and bundle.wheelhouse == "wheelhouse" and bundle.constraints
    assert bundle.uv.startswith("uv-") and bundle.uv.endswith(".whl")
    house = bundle.dir / bundle.wheelhouse
    minor = facts.python_version.split(".")[1]
    compiled = [w.name for w in house.glob("*-cp3*.whl") if "abi3" not in w.name]
    assert compiled and all(f"-cp3{minor}-" in name for name in compiled), compiled
    # python_full_version < '3.11.3' (arq's async-timeout): kept for 3.11.2 only
    has_async_timeout = any(house.glob("async_timeout-*.whl"))
    assert has_async_timeout == (facts.python_version < "3.11.3")
    if python == PYENV_312:
        return  # tests/e2e/test_deploy.py's offline deploy installs this one on its no-route host

    uv = _uv_from_wheel(bundle.dir / bundle.uv, tmp_path)
    uv_cache = tmp_path / "uv-cache"
    uv_cache.mkdir()
    env = _clean_env(uv_cache)
    venv = tmp_path / "venv"
    run_argv(
        [str(uv), "venv", "--python", str(python), str(venv)], env=env, check=True, timeout=120
    )
    installed = run_argv(
        [
            str(uv),
            "pip",
            "install",
            "--python",
            str(venv / "bin" / "python"),
            "--offline",
            "--no-index",
            "--find-links",
            str(house),
            "-c",
            str(bundle.dir / bundle.constraints),
            str(bundle.dir / bundle.wheel),
        ],
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr
    probe = run_argv(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import platform, servetune, xllamacpp, optuna; "
            "print(platform.python_version(), optuna.__version__)",
        ],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    version, optuna_version = probe.stdout.split()
    assert version == facts.python_version
    assert f"optuna=={optuna_version}\n" in (bundle.dir / bundle.constraints).read_text()


def test_online_bundle_ships_the_managers_uv_and_exact_versions(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    facts = facts_of(SYSTEM_PYTHON)
    started = time.monotonic()
    bundle = asyncio.run(build_bundle(settings, facts, offline=False))
    print(
        f"\nonline bundle: {time.monotonic() - started:.1f} s, {bundle.size_bytes / 2**20:.0f} MiB"
    )
    assert not bundle.offline and bundle.wheelhouse is None and not bundle.cached
    assert bundle.wheel.startswith("servetune-") and (bundle.dir / bundle.wheel).is_file()
    # same arch and libc as the manager: its own uv binary, runnable
    assert bundle.uv == "uv"
    ran = run_argv([str(bundle.dir / "uv"), "--version"], capture_output=True)
    assert ran.stdout.startswith("uv ")
    constraints = (bundle.dir / bundle.constraints).read_text()  # type: ignore[operator]
    assert "xllamacpp==2026.10.11549" in constraints.splitlines()
    assert "servetune" not in constraints and "pytest" not in constraints  # no project, no dev

    again = asyncio.run(build_bundle(settings, facts, offline=False))
    assert again.cached and again.dir == bundle.dir
    # one built from an older source for the same target is removed by the next build; one for
    # another target is kept
    older = bundle.dir.with_name(
        re.sub(r"^([^-]+)-[0-9a-f]{12}-", r"\1-000000000000-", bundle.dir.name)
    )
    other = bundle.dir.with_name(bundle.dir.name.replace("-online", "-offline"))
    for copy in (older, other):
        shutil.copytree(bundle.dir, copy)
    (bundle.dir / "uv").unlink()  # an incomplete cache entry is rebuilt, not trusted
    rebuilt = asyncio.run(build_bundle(settings, facts, offline=False))
    assert not rebuilt.cached and (rebuilt.dir / "uv").is_file()
    assert not older.exists() and other.is_dir()


def test_online_bundle_for_another_arch_ships_the_uv_wheel_for_it(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    facts = facts_of(SYSTEM_PYTHON).model_copy(update={"arch": "aarch64", "libc_version": "2.28"})
    bundle = asyncio.run(build_bundle(settings, facts, offline=False))
    assert re.fullmatch(r"uv-[0-9.]+-py3-none-.*manylinux_2_\d+_aarch64.*\.whl", bundle.uv)
    assert "aarch64-manylinux_2_28" in bundle.dir.name


def test_manager_without_index_access_says_index_unreachable(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, package_index_url="http://127.0.0.1:9/simple")
    with pytest.raises(DeployFailed) as caught:
        asyncio.run(build_bundle(settings, facts_of(SYSTEM_PYTHON), offline=True))
    assert caught.value.category is Category.INDEX_UNREACHABLE
    assert "http://127.0.0.1:9/simple" in str(caught.value)
    assert "package_index_url" in caught.value.suggestion
    left = [p for p in tmp_path.glob("wheelhouse/*offline*") if p.is_dir()]
    assert not left, "no half-built bundle is left"


def test_musl_host_is_told_which_package_has_no_wheel(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    facts = facts_of(SYSTEM_PYTHON).model_copy(update={"libc": "musl", "libc_version": "1.2"})
    with pytest.raises(DeployFailed) as caught:
        asyncio.run(build_bundle(settings, facts, offline=True))
    assert caught.value.category is Category.INSTALL_FAILED
    assert str(caught.value).startswith("xllamacpp has no wheel for CPython 3.11.2")
    assert caught.value.logs


def test_an_edited_source_tree_rebuilds_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a copy of this project's tree stands in for the manager's source tree
    real = source_tree()
    assert real is not None, "the tests run from servetune's source tree"
    tree = tmp_path / "tree"
    shutil.copytree(
        real / "src" / "servetune",
        tree / "src" / "servetune",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy2(real / name, tree / name)
    monkeypatch.setattr(wheelhouse, "source_tree", lambda: tree)
    settings = Settings(data_dir=tmp_path / "data")

    first = asyncio.run(servetune_wheel(settings))
    assert first.build_s > 0
    assert asyncio.run(servetune_wheel(settings)).path == first.path  # cached: same wheel
    (tree / "src" / "servetune" / "edited_marker.py").write_text("EDITED = True\n")
    second = asyncio.run(servetune_wheel(settings))
    assert second.digest != first.digest and second.path != first.path and second.build_s > 0
    with zipfile.ZipFile(second.path) as archive:
        assert "servetune/edited_marker.py" in archive.namelist()
    with zipfile.ZipFile(first.path) as archive:
        assert "servetune/edited_marker.py" not in archive.namelist()


def test_an_installed_servetune_ships_the_wheel_named_by_servetune_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    built = asyncio.run(servetune_wheel(settings)).path  # the wheel a user would have installed
    monkeypatch.setattr(wheelhouse, "source_tree", lambda: None)  # as if installed from it
    monkeypatch.delenv(wheelhouse.WHEEL_ENV, raising=False)
    with pytest.raises(DeployFailed) as caught:
        asyncio.run(servetune_wheel(settings))
    assert caught.value.category is Category.INSTALL_FAILED
    assert f"set {wheelhouse.WHEEL_ENV}=/path/to/servetune-" in caught.value.suggestion

    wrong = tmp_path / "servetune-0.0.1-py3-none-any.whl"
    shutil.copy2(built, wrong)
    monkeypatch.setenv(wheelhouse.WHEEL_ENV, str(wrong))
    with pytest.raises(DeployFailed) as caught:
        asyncio.run(servetune_wheel(settings))
    assert str(wrong) in str(caught.value) and "another version" in str(caught.value)

    monkeypatch.setenv(wheelhouse.WHEEL_ENV, str(built))
    given = asyncio.run(servetune_wheel(settings))
    assert given.path == built
    pins = given.constraints.splitlines()
    # the versions installed here, for what servetune needs (not the dev tools)
    assert f"optuna=={importlib.metadata.version('optuna')}" in pins
    assert "xllamacpp==2026.10.11549" in pins
    assert not [pin for pin in pins if pin.startswith(("pytest==", "mypy==", "servetune=="))]


@pytest.mark.slow
def test_a_rebuild_after_a_source_edit_reuses_the_dependency_wheels(tmp_path: Path) -> None:
    facts = facts_of(SYSTEM_PYTHON)
    cached = asyncio.run(build_bundle(Settings(data_dir=TEST_CACHE), facts, offline=True))
    # the same target's bundle from an older servetune source, in a fresh data_dir
    settings = Settings(data_dir=tmp_path)
    name = re.sub(r"^([^-]+)-[0-9a-f]{12}-", r"\1-000000000000-", cached.dir.name)
    older = settings.wheelhouse_dir / name
    shutil.copytree(cached.dir, older)
    kept = {}
    for wheel in [*older.glob("wheelhouse/*.whl"), next(older.glob("uv-*.whl"))]:
        kept[wheel.name] = tmp_path / f"kept-{wheel.name}"
        os.link(wheel, kept[wheel.name])

    started = time.monotonic()
    bundle = asyncio.run(build_bundle(settings, facts, offline=True))
    print(f"\noffline rebuild after a source edit: {time.monotonic() - started:.1f} s")
    assert not bundle.cached and not older.exists()  # built anew; the older one is pruned
    shipped = [*bundle.dir.glob("wheelhouse/*.whl"), bundle.dir / bundle.uv]
    assert sorted(w.name for w in shipped) == sorted(kept)
    for wheel in shipped:  # the very same files: linked, not downloaded again
        assert wheel.stat().st_ino == kept[wheel.name].stat().st_ino, wheel.name
