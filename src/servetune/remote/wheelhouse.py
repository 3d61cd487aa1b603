"""What a deploy ships to a remote host so it can install servetune: an ``InstallBundle``.

A bundle is a directory on the manager, cached under ``settings.wheelhouse_dir/<key>``::

    servetune-<version>-py3-none-any.whl   servetune's own wheel (built from the manager's tree)
    constraints.txt                        the manager's exact versions of its dependencies
    uv  |  uv-<version>-py3-none-<platform>.whl   uv for the remote's platform
    wheelhouse/                            offline only: every dependency as a wheel for the
                                           remote's exact Python version and platform

The key holds servetune's version and a hash of its source (an edited tree rebuilds), the remote's
Python version and platform, and online/offline. The remote installs with
``uv pip install [-c constraints.txt] [--offline --no-index --find-links wheelhouse] <wheel>``
(agent action ``install``).

Offline resolution uses ``uv pip compile --python-version X.Y.Z --python-platform <triple>`` so
environment markers are evaluated for the remote's exact interpreter (``pip download
--python-version`` evaluates them for the manager's); each pin is then fetched with ``pip download
--no-deps --only-binary=:all:`` for the remote's platform tags.

Every command is an argv list run with a timeout that kills its process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import servetune
from servetune.errors import DeployFailed
from servetune.redact import redact
from servetune.remote.models import Category, CommandResult, RemoteFacts
from servetune.remote.ssh import run_command
from servetune.settings import Settings

WHEEL_ENV = "SERVETUNE_WHEEL"
"""Environment variable naming servetune's wheel when the manager does not run from a source tree
(an installed servetune): the wheel file of the same version, e.g. the one it was installed from."""

BUNDLE_FILE = "bundle.json"
"""Written last into a finished bundle directory: a bundle without it is incomplete."""

_UV_TRIPLE_GLIBC = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)
"""The glibc minor versions uv knows as ``<arch>-manylinux_2_<minor>`` (uv 0.13)."""

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def canonical_arch(arch: str) -> str:
    """``platform.machine()`` as the packaging tools name it: lower case, ``amd64``/``x64`` →
    ``x86_64``, ``arm64``/``armv8`` → ``aarch64``. Pure."""
    return _ARCH_ALIASES.get(arch.lower(), arch.lower())


_NETWORK_ERRORS = (
    "Could not fetch URL",
    "Failed to establish a new connection",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "No route to host",
    "ConnectTimeoutError",
    "Read timed out",
    "Failed to fetch",
    "error sending request",
    "dns error",
    "tcp connect error",
    "operation timed out",
)
"""Text in pip's or uv's output that says the package index could not be reached."""


# ---- platforms ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlatformTarget:
    """A remote platform as the packaging tools name it.

    ``triple`` is what ``uv pip compile --python-platform`` takes (``x86_64-manylinux_2_36``,
    ``x86_64-unknown-linux-musl``); ``pip_platforms`` the wheel platform tags it can install, most
    specific first, each given to ``pip download --platform``.
    """

    arch: str
    libc: str
    libc_version: str
    triple: str
    pip_platforms: tuple[str, ...]


def platform_target(arch: str, libc: str, libc_version: str) -> PlatformTarget:
    """Map a remote's facts (``platform.machine()``, ``'glibc'``/``'musl'``, e.g. ``'2.36'``) to
    its uv triple and pip platform tags. Pure.

    glibc 2.N gives ``<arch>-manylinux_2_<M>`` with M the highest version uv knows that is <= N
    (2.36 → manylinux_2_36; 2.30 → manylinux_2_28; 2.41 → manylinux_2_40) and the tags
    manylinux_2_N … manylinux_2_17 (x86_64: down to 2_5) plus the legacy manylinux2014/2010/1
    names; musl 1.N gives ``<arch>-unknown-linux-musl`` and musllinux_1_N … musllinux_1_1.

    Raises DeployFailed(INSTALL_FAILED) for an architecture other than x86_64/aarch64, an unknown
    libc, or a glibc older than 2.17, naming what was found.
    """
    machine = canonical_arch(arch)
    if machine not in ("x86_64", "aarch64"):
        raise _failed(
            f"no wheelhouse can be built for the remote's architecture {arch!r}",
            "servetune ships wheels for x86_64 and aarch64 Linux hosts only; use such a host",
        )
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", libc_version.strip())
    if libc not in ("glibc", "musl") or match is None:
        raise _failed(
            f"the remote's C library is unknown (libc={libc!r}, version={libc_version!r})",
            "servetune needs a Linux host with glibc >= 2.17 or musl >= 1.1 (check with "
            "`ldd --version` on the host)",
        )
    major, minor = int(match.group(1)), int(match.group(2))
    if libc == "musl":
        if major != 1 or minor < 1:
            raise _failed(
                f"the remote's musl {libc_version} is too old",
                "use a host with musl >= 1.1",
            )
        musl = tuple(f"musllinux_1_{m}_{machine}" for m in range(minor, 0, -1))
        return PlatformTarget(machine, libc, libc_version, f"{machine}-unknown-linux-musl", musl)
    if major != 2 or minor < 17:
        raise _failed(
            f"the remote's glibc {libc_version} is older than 2.17 (manylinux2014)",
            "use a host with glibc >= 2.17 (e.g. Debian 9, Ubuntu 18.04, RHEL 7 or newer)",
        )
    uv_minor = max(m for m in _UV_TRIPLE_GLIBC if m <= minor)
    lowest = 5 if machine == "x86_64" else 17
    tags = [f"manylinux_2_{m}_{machine}" for m in range(minor, lowest - 1, -1)]
    tags.append(f"manylinux2014_{machine}")
    if machine == "x86_64":
        tags += [f"manylinux2010_{machine}", f"manylinux1_{machine}"]
    return PlatformTarget(
        machine, libc, libc_version, f"{machine}-manylinux_2_{uv_minor}", tuple(tags)
    )


def python_release(facts: RemoteFacts) -> tuple[str, str]:
    """``(X.Y.Z, X.Y)`` of the remote's CPython; raises DeployFailed(INSTALL_FAILED) for another
    implementation or a version that is not ``X.Y.Z`` (an offline wheelhouse is per CPython
    release)."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", facts.python_version)
    if facts.implementation.lower() not in ("cpython", "cp") or match is None:
        raise _failed(
            f"an offline wheelhouse needs CPython X.Y.Z; the remote has "
            f"{facts.implementation} {facts.python_version}",
            "point the slot's python at a CPython >= 3.11 on the host",
        )
    return match.group(0), f"{match.group(1)}.{match.group(2)}"


# ---- the bundle --------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallBundle:
    """A built bundle: ``dir`` on the manager; the other names are relative to ``dir``.

    ``wheel`` is servetune's wheel; ``uv`` a uv binary or a uv wheel for the remote's platform;
    ``constraints`` the manager's exact dependency versions (``constraints.txt``; None when not
    used); ``wheelhouse`` the folder of dependency wheels (offline only, else None). ``cached``
    says it was found ready, ``build_s`` how long it took to build (s; the first time when
    cached), ``size_bytes`` its size on disk.
    """

    dir: Path
    wheel: str
    uv: str
    constraints: str | None
    wheelhouse: str | None
    offline: bool
    cached: bool = False
    build_s: float = 0.0
    size_bytes: int = 0


async def build_bundle(settings: Settings, facts: RemoteFacts, *, offline: bool) -> InstallBundle:
    """The bundle for a remote host with these facts: built once, then taken from the cache under
    ``settings.wheelhouse_dir/<key>`` (key: servetune version + source hash, the remote's Python
    version and platform, online/offline).

    Online: servetune's wheel, ``constraints.txt`` and uv (the manager's own binary when the
    remote's arch and libc match the manager's, else the uv wheel for the remote's platform).
    Offline: also ``wheelhouse/`` with every dependency resolved for the remote's exact Python
    version and platform, and the uv wheel for that platform. A new build removes the same
    target's bundle from an older servetune source, reusing its dependency wheels (hard links).
    Concurrent builds of one key (in this process or another) wait on a file lock.

    Raises DeployFailed: INSTALL_FAILED (no wheel for the platform: names the package; no way to
    build servetune's wheel; unsupported platform), INDEX_UNREACHABLE (the manager cannot reach
    ``settings.package_index_url``), STEP_TIMEOUT (a command ran past
    ``settings.deploy_install_timeout_s``).
    """
    target = platform_target(facts.arch, facts.libc, facts.libc_version)
    if offline:
        full_version, _ = python_release(facts)
    else:
        full_version = facts.python_version
    own = await servetune_wheel(settings)
    wheel = own.path
    suffix = "-".join(
        [f"py{_safe(full_version)}", target.triple, "offline" if offline else "online"]
    )
    key = f"{wheel.name.split('-')[1]}-{own.digest[:12]}-{suffix}"
    root = settings.wheelhouse_dir
    final = root / key
    async with _locked(root / f"{key}.lock"):
        found = _load_bundle(final)
        if found is not None:
            return found
        started = time.monotonic()
        work = root / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            shutil.copy2(wheel, work / wheel.name)
            (work / "constraints.txt").write_text(own.constraints)
            if offline:
                older = _older_bundle(root, keep=key, suffix=suffix)
                uv_name = await _offline_parts(
                    settings, work, wheel, full_version, target, reuse=older
                )
            else:
                uv_name = await _uv_for(settings, work, target, full_version)
            bundle = InstallBundle(
                dir=final,
                wheel=wheel.name,
                uv=uv_name,
                constraints="constraints.txt",
                wheelhouse="wheelhouse" if offline else None,
                offline=offline,
                cached=False,
                build_s=round(time.monotonic() - started + own.build_s, 3),
                size_bytes=_size(work),
            )
            record = asdict(bundle)
            record["dir"] = str(final)
            (work / BUNDLE_FILE).write_text(json.dumps(record, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _prune_older(root, keep=key, suffix=suffix)
        return bundle


def _prune_older(root: Path, *, keep: str, suffix: str) -> None:
    """Remove the finished bundles for the same target (``-<suffix>``) built from another
    servetune source (an offline one is ~100 MB; every edit of the tree makes a new one)."""
    for path in root.glob(f"*-{suffix}"):
        if path.name != keep and path.is_dir() and (path / BUNDLE_FILE).is_file():
            shutil.rmtree(path, ignore_errors=True)
            path.with_name(f"{path.name}.lock").unlink(missing_ok=True)


def _load_bundle(path: Path) -> InstallBundle | None:
    """The finished bundle at ``path`` (cached=True), or None when absent or incomplete."""
    try:
        record = json.loads((path / BUNDLE_FILE).read_text())
        record["dir"] = path
        record["cached"] = True
        bundle = InstallBundle(**record)
    except (OSError, ValueError, TypeError):
        return None
    needed = [bundle.wheel, bundle.uv, bundle.constraints, bundle.wheelhouse]
    if not all((path / name).exists() for name in needed if name):
        return None
    return bundle


# ---- servetune's wheel and the manager's versions ----------------------------------------


def source_tree() -> Path | None:
    """The project root (holding ``pyproject.toml`` of the ``servetune`` project) that the running
    servetune is imported from, or None when it is an installed package."""
    package = Path(servetune.__file__).resolve().parent
    for candidate in (package.parent.parent, package.parent):
        pyproject = candidate / "pyproject.toml"
        try:
            name = tomllib.loads(pyproject.read_text()).get("project", {}).get("name")
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if name == "servetune":
            return candidate
    return None


def source_hash(root: Path) -> str:
    """SHA-256 (hex) over the paths and contents of everything that goes into servetune's wheel
    from the tree at ``root``: ``src/servetune/**`` (no ``__pycache__``), ``pyproject.toml``,
    ``uv.lock`` and ``README.md``. Any edit changes it."""
    digest = hashlib.sha256()
    files = [root / name for name in ("pyproject.toml", "uv.lock", "README.md")]
    files += sorted(
        p
        for p in (root / "src" / "servetune").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    for path in files:
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class ServetuneWheel:
    """servetune's own wheel as shipped: ``path`` of the wheel, ``constraints`` the manager's exact
    dependency versions (requirements-file text, ``name==version[ ; marker]`` lines), ``digest``
    (hex) that changes with the source (or the wheel's bytes), ``build_s`` how long the wheel
    took to build (0 when cached or given)."""

    path: Path
    constraints: str
    digest: str
    build_s: float = 0.0


async def servetune_wheel(settings: Settings) -> ServetuneWheel:
    """servetune's own wheel and the manager's exact dependency versions.

    From a source tree: ``uv build --wheel`` (``--offline`` first: the build backend from uv's
    cache, no index needed; else from the index) and ``uv export --frozen`` (the lock's versions),
    cached under ``settings.wheelhouse_dir/servetune/<version>-<source hash>/`` so an edited tree
    rebuilds. Otherwise the wheel named by the environment variable SERVETUNE_WHEEL (same version
    as the running servetune) and the versions of the installed distributions
    (importlib.metadata). Raises DeployFailed: INSTALL_FAILED saying how to provide the wheel,
    INDEX_UNREACHABLE when the build cannot fetch its build backend, STEP_TIMEOUT.
    """
    version = importlib.metadata.version("servetune")
    root = source_tree()
    if root is None:
        wheel = _installed_wheel(version)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        return ServetuneWheel(wheel, _installed_constraints(), digest)
    digest = source_hash(root)
    cache = settings.wheelhouse_dir / "servetune" / f"{version}-{digest[:16]}"
    async with _locked(cache.parent / f"{cache.name}.lock"):
        wheels = sorted(cache.glob("servetune-*.whl"))
        constraints = cache / "constraints.txt"
        if wheels and constraints.is_file():
            return ServetuneWheel(wheels[0], constraints.read_text(), digest)
        started = time.monotonic()
        work = cache.parent / f"{cache.name}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            uv = _uv_binary()
            timeout_s = settings.deploy_install_timeout_s
            build = [uv, "build", "--wheel", "--out-dir", str(work), str(root)]
            # the build backend (hatchling) from uv's cache first, no index: it is there since
            # the manager's own install (`uv sync`) built servetune with it, and a manager that
            # cannot reach the index (an offline deploy's venv-copy fallback) still needs this
            # wheel; only a cache without it fetches it from the index
            built = await run_command([*build, "--offline"], timeout_s=timeout_s, cwd=root)
            if built.returncode != 0 and not built.timed_out:
                built = await run_command(build, timeout_s=timeout_s, cwd=root)
            _check(built, "building servetune's wheel")
            exported = await run_command(
                [
                    uv,
                    "export",
                    "--frozen",
                    "--no-dev",
                    "--no-emit-project",
                    "--no-hashes",
                    "--no-header",
                    "--no-annotate",
                    "--project",
                    str(root),
                ],
                timeout_s=timeout_s,
                cwd=root,
            )
            _check(exported, "exporting servetune's locked versions (uv.lock)")
            (work / "constraints.txt").write_text(exported.stdout)
            shutil.rmtree(cache, ignore_errors=True)
            work.rename(cache)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        wheel = sorted(cache.glob("servetune-*.whl"))[0]
        build_s = round(time.monotonic() - started, 3)
        return ServetuneWheel(wheel, (cache / "constraints.txt").read_text(), digest, build_s)


def _installed_wheel(version: str) -> Path:
    """The wheel named by SERVETUNE_WHEEL, checked to be servetune ``version``'s."""
    named = os.environ.get(WHEEL_ENV)
    if not named:
        raise _failed(
            "servetune is not running from its source tree, so its wheel cannot be built here",
            f"set {WHEEL_ENV}=/path/to/servetune-{version}-py3-none-any.whl (the wheel this "
            "servetune was installed from) in the manager's environment",
        )
    wheel = Path(named).expanduser()
    if not wheel.is_file() or not wheel.name.startswith(f"servetune-{version}-"):
        raise _failed(
            f"{WHEEL_ENV}={named} is not servetune {version}'s wheel (missing or another version)",
            f"set {WHEEL_ENV} to an existing servetune-{version}-*.whl",
        )
    return wheel


def _installed_constraints() -> str:
    """``name==version`` of every installed distribution servetune needs (its requirements and
    theirs, markers evaluated for this interpreter), one a line, sorted."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    todo = ["servetune"]
    while todo:
        name = todo.pop()
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in dist.requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep in pins or dep == "servetune":
                continue
            try:
                pins[dep] = importlib.metadata.version(dep)
            except importlib.metadata.PackageNotFoundError:
                continue
            todo.append(dep)
    return "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))


# ---- uv ----------------------------------------------------------------------------------


def _uv_binary() -> str:
    """The manager's uv: next to sys.executable (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("uv")
    if found is None:
        raise _failed(
            "uv is not installed on the manager (needed to build servetune's wheel and bundles)",
            f"install uv into the manager's environment: {sys.executable} -m pip install uv",
        )
    return found


async def _uv_version(uv: str) -> str:
    """The version of the uv binary ``uv`` (``uv 0.13.9 (…)`` → ``0.13.9``)."""
    result = await run_command([uv, "--version"], timeout_s=30)
    match = re.search(r"uv (\d+\.\d+\.\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise _failed(f"`{uv} --version` failed: {result.stderr.strip()[:200]}", "reinstall uv")
    return match.group(1)


def manager_platform() -> tuple[str, str]:
    """(arch, libc family) of the manager, as RemoteFacts spells them."""
    lib, _ = platform.libc_ver()
    family = "glibc" if lib == "glibc" else ("musl" if "musl" in lib else lib)
    return canonical_arch(platform.machine()), family


async def _uv_for(settings: Settings, work: Path, target: PlatformTarget, python: str) -> str:
    """Put uv for ``target`` into ``work``: a copy of the manager's binary when arch and libc
    match, else the uv wheel of the same version for that platform. Returns its name."""
    uv = _uv_binary()
    if (target.arch, target.libc) == manager_platform():
        shutil.copy2(uv, work / "uv")
        return "uv"
    return await _uv_wheel(settings, work, target, python)


async def _uv_wheel(settings: Settings, work: Path, target: PlatformTarget, python: str) -> str:
    """Download the uv wheel (the manager's uv version) for ``target`` into ``work``."""
    version = await _uv_version(_uv_binary())
    before = set(_wheels_in(work))
    await download_wheels(
        [f"uv=={version}"],
        dest=work,
        target=target,
        python_version=_minor(python),
        index_url=settings.package_index_url,
        timeout_s=settings.deploy_install_timeout_s,
    )
    new = sorted(p for p in set(_wheels_in(work)) - before if p.name.startswith("uv-"))
    if not new:
        raise _failed(
            f"pip download put no uv wheel for {target.triple} in {work}",
            "check that the package index serves uv wheels",
        )
    return new[0].name


# ---- offline: resolve for the remote, download wheels ------------------------------------


async def _offline_parts(
    settings: Settings,
    work: Path,
    wheel: Path,
    full_version: str,
    target: PlatformTarget,
    *,
    reuse: Path | None,
) -> str:
    """Fill ``work/wheelhouse`` with every dependency's wheel and ``work`` with the uv wheel.

    Wheels of the same name and version in ``reuse`` (the bundle this one replaces: same target,
    older servetune source) are hard-linked (or copied) instead of downloaded again."""
    pins = await resolve_pins(
        [f"servetune @ {_file_uri(wheel)}"],
        python_version=full_version,
        triple=target.triple,
        constraints=work / "constraints.txt",
        index_url=settings.package_index_url,
        timeout_s=settings.deploy_install_timeout_s,
    )
    house = work / "wheelhouse"
    house.mkdir()
    version = await _uv_version(_uv_binary())
    if reuse is not None:
        pins = _link_known(pins, reuse / "wheelhouse", house)
        if not _link_known([f"uv=={version}"], reuse, work):
            return next(p.name for p in _wheels_in(work) if p.name.startswith("uv-"))
    await download_wheels(
        pins,
        dest=house,
        target=target,
        python_version=_minor(full_version),
        index_url=settings.package_index_url,
        timeout_s=settings.deploy_install_timeout_s,
    )
    return await _uv_wheel(settings, work, target, full_version)


def _older_bundle(root: Path, *, keep: str, suffix: str) -> Path | None:
    """The newest finished bundle for the same target (``-<suffix>``) other than ``keep``."""
    found = [
        p
        for p in root.glob(f"*-{suffix}")
        if p.name != keep and p.is_dir() and (p / BUNDLE_FILE).is_file()
    ]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def _link_known(pins: list[str], source: Path, dest: Path) -> list[str]:
    """Hard-link (else copy) into ``dest`` the wheels in ``source`` that match a pin
    (``name==version``); returns the pins still to download."""
    have: dict[tuple[str, str], Path] = {}
    for path in _wheels_in(source):
        parts = path.name.split("-")
        if len(parts) >= 5:
            have[(_req_name(parts[0]), parts[1])] = path
    missing = []
    for pin in pins:
        name, _, version = pin.partition("==")
        found = have.get((_req_name(name), version.strip()))
        if found is None:
            missing.append(pin)
            continue
        try:
            os.link(found, dest / found.name)
        except OSError:
            shutil.copy2(found, dest / found.name)
    return missing


async def resolve_pins(
    requirements: list[str],
    *,
    python_version: str,
    triple: str,
    constraints: Path | None,
    index_url: str | None,
    timeout_s: float,
    find_links: Path | None = None,
) -> list[str]:
    """``name==version`` of every package ``requirements`` need on a remote with CPython
    ``python_version`` (X.Y.Z: markers such as ``python_full_version < '3.11.3'`` are evaluated
    for exactly that release) on ``triple`` (``x86_64-manylinux_2_36``), resolved by
    ``uv pip compile`` under ``constraints``; from ``index_url`` and/or ``find_links`` (no index
    when ``index_url`` is None). Requirements given as ``name @ url`` are left out of the result.

    Raises DeployFailed: INDEX_UNREACHABLE, INSTALL_FAILED (no solution: uv's explanation in
    logs), STEP_TIMEOUT.
    """
    uv = _uv_binary()
    with _temp_dir("servetune-resolve-") as tmp:
        infile = tmp / "requirements.in"
        infile.write_text("".join(f"{req}\n" for req in requirements))
        argv = [
            uv,
            "pip",
            "compile",
            str(infile),
            # the manager's interpreter runs the resolver (no search for a matching one);
            # markers and tags are those of --python-version and --python-platform
            "--python",
            sys.executable,
            "--python-version",
            python_version,
            "--python-platform",
            triple,
            "--only-binary",
            ":all:",
            "--no-header",
            "--no-annotate",
            "--quiet",
            "--output-file",
            str(tmp / "pins.txt"),
        ]
        if constraints is not None:
            argv += ["--constraint", str(constraints)]
        if not index_url:
            argv += ["--no-index"]
        if find_links is not None:
            argv += ["--find-links", str(find_links)]
        result = await run_command(argv, timeout_s=timeout_s, cwd=tmp, env=_index_env(index_url))
        unusable = re.search(
            r"Because (?:only )?([A-Za-z0-9._-]+)(?:==\S+)? "
            r"(?:has|have) no (?:usable wheels|wheels with a matching)",
            result.stderr,
        )
        if result.returncode != 0 and unusable and not _network_error(result):
            package = unusable.group(1)
            raise _failed(
                f"{package} has no wheel for CPython {python_version} on {triple}",
                f"{package} publishes no wheel for this platform; use a host with glibc (not "
                "musl), a newer glibc or another Python version, or install online",
                logs=_tail(result.stderr),
            )
        _check(
            result,
            f"resolving servetune's dependencies for Python {python_version} on {triple}",
            index_url=index_url,
        )
        lines = (tmp / "pins.txt").read_text().splitlines()
    skipped = {_req_name(req) for req in requirements if " @ " in req}
    pins = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-") or " @ " in line:
            continue
        if _req_name(line) in skipped:
            continue
        pins.append(line)
    return pins


async def download_wheels(
    pins: list[str],
    *,
    dest: Path,
    target: PlatformTarget,
    python_version: str,
    index_url: str | None,
    timeout_s: float,
    find_links: Path | None = None,
) -> list[Path]:
    """Download each pin (``name==version``) as a wheel for CPython ``python_version`` (X.Y) on
    ``target`` into ``dest`` (``pip download --no-deps --only-binary=:all:`` with the target's
    platform tags and ABIs cpXY, abi3, none). Returns the wheels now in ``dest``.

    Raises DeployFailed: INSTALL_FAILED naming the package that has no wheel for the platform,
    INDEX_UNREACHABLE, STEP_TIMEOUT.
    """
    if not pins:
        return _wheels_in(dest)
    abi = "cp" + python_version.replace(".", "")
    argv = [
        *_pip_argv(),
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "2",
        "--timeout",
        "30",
        "--dest",
        str(dest),
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "--abi",
        abi,
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for tag in target.pip_platforms:
        argv += ["--platform", tag]
    if not index_url:
        argv += ["--no-index"]
    if find_links is not None:
        argv += ["--find-links", str(find_links)]
    argv += pins
    result = await run_command(argv, timeout_s=timeout_s, env=_index_env(index_url))
    missing = re.search(r"No matching distribution found for (\S+)", result.stderr)
    if result.returncode != 0 and missing and not _network_error(result):
        package = missing.group(1)
        raise _failed(
            f"{package} has no wheel for CPython {python_version} on {target.triple}",
            f"{package} publishes no wheel for this platform (tags {target.pip_platforms[0]}…, "
            f"abi {abi}/abi3); use a host with a newer glibc or another Python version, or "
            "install online",
            logs=_tail(result.stderr),
        )
    _check(
        result,
        f"downloading wheels for CPython {python_version} on {target.triple}",
        index_url=index_url,
    )
    return _wheels_in(dest)


def _pip_argv() -> list[str]:
    """How to run pip on the manager: this interpreter's pip, else the base interpreter's."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    base = Path(sys.base_prefix) / "bin" / "python3"
    if base.is_file() and (base.parent.parent / "lib").is_dir():
        found = list((base.parent.parent / "lib").glob("python3*/site-packages/pip"))
        found += list((base.parent.parent / "lib").glob("python3/dist-packages/pip"))
        if found:
            return [str(base), "-m", "pip"]
    raise _failed(
        "pip is not available on the manager (needed to download wheels for an offline host)",
        f"install pip into the manager's environment: {_uv_binary()} pip install --python "
        f"{sys.executable} pip",
    )


# ---- small helpers -----------------------------------------------------------------------


def _index_env(index_url: str | None) -> dict[str, str] | None:
    """The environment giving uv (``UV_DEFAULT_INDEX``) and pip (``PIP_INDEX_URL``) the index:
    a token in its URL stays out of argv (``ps``); None (inherit) without one."""
    if not index_url:
        return None
    return {**os.environ, "UV_DEFAULT_INDEX": index_url, "PIP_INDEX_URL": index_url}


def _network_error(result: CommandResult) -> bool:
    text = result.stdout + result.stderr
    return any(marker in text for marker in _NETWORK_ERRORS)


def _check(result: CommandResult, doing: str, *, index_url: str | None = None) -> None:
    """Raise the DeployFailed that fits a failed ``result`` (nothing when it succeeded)."""
    if result.timed_out:
        raise DeployFailed(
            Category.STEP_TIMEOUT,
            f"{doing} ran past {result.duration_s:.0f} s and was stopped",
            "raise deploy_install_timeout_s (SERVETUNE_DEPLOY_INSTALL_TIMEOUT_S) or check the "
            "manager's network",
            step="bundle",
            logs=_tail(result.stderr),
        )
    if result.returncode == 0:
        return
    if _network_error(result):
        raise DeployFailed(
            Category.INDEX_UNREACHABLE,
            f"{doing} failed: the manager cannot reach the package index"
            + (f" {redact(index_url)}" if index_url else ""),
            "check the manager's network or proxy, or set package_index_url "
            "(SERVETUNE_PACKAGE_INDEX_URL) to an index the manager can reach",
            step="bundle",
            logs=_tail(result.stderr),
        )
    first = next((ln.strip() for ln in result.stderr.splitlines() if ln.strip()), "")
    raise _failed(
        f"{doing} failed (exit {result.returncode}): {first[:300]}",
        f"see the log lines of `{Path(result.argv[0]).name} {' '.join(result.argv[1:3])} …` "
        "on the manager; fix what they name and deploy again",
        logs=_tail(result.stderr or result.stdout),
    )


def _failed(message: str, suggestion: str, *, logs: list[str] | None = None) -> DeployFailed:
    return DeployFailed(Category.INSTALL_FAILED, message, suggestion, step="bundle", logs=logs)


def _tail(text: str, lines: int = 30) -> list[str]:
    return text.strip().splitlines()[-lines:]


def _req_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else requirement


def _minor(version: str) -> str:
    parts = version.split(".")
    return ".".join(parts[:2])


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text)


def _file_uri(path: Path) -> str:
    """``file://`` URI of ``path`` made absolute."""
    return path.absolute().as_uri()


def _wheels_in(folder: Path) -> list[Path]:
    """The wheels in ``folder`` (none when it does not exist), sorted."""
    return sorted(folder.glob("*.whl"))


def _open_lock(path: Path) -> IO[str]:
    """``path`` opened for appending (created with its parents): a file to flock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.asynccontextmanager
async def _locked(path: Path) -> AsyncIterator[None]:
    """An exclusive flock on ``path`` (created) for the block: one builder per cache entry, in
    this process or another (polled, so the event loop keeps running while it waits)."""
    handle = _open_lock(path)
    with handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                await asyncio.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _temp_dir(prefix: str) -> Iterator[Path]:
    """A fresh temporary directory (under TMPDIR), removed after the block."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
