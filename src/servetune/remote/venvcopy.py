"""The last resort of an offline deploy: copying the manager's own venv to a host that matches it.

Used only when the host cannot reach the package index AND the manager cannot build the offline
wheelhouse either (``wheelhouse.build_bundle`` fails for want of the index or of a wheel). The
copy is safe only when the host's interpreter is the manager's own kind: ``copy_refusal`` says
whether it is (a pure rule); ``plan`` measures what would be sent. The agent action
``adopt_venv`` fixes the copy on the host (pyvenv.cfg, python links, shebangs) and replaces the
manager's servetune (often an editable install) by servetune's wheel.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from servetune.errors import DeployFailed
from servetune.remote import wheelhouse
from servetune.remote.models import Category, RemoteFacts
from servetune.remote.ssh import excluded
from servetune.settings import Settings

__all__ = [
    "SPACE_FACTOR",
    "Interpreter",
    "VenvCopy",
    "copy_refusal",
    "excludes",
    "manager_interpreter",
    "plan",
    "wheels_unavailable",
]

SPACE_FACTOR = 2.0
"""A venv copy needs this many times the venv's size free on the host (the copy + the venv it
replaces until it is deleted, pip's temporary files)."""

ALWAYS_EXCLUDED = ("__pycache__", "*.pyc")
"""Never sent: byte code the host's python rewrites as needed."""


@dataclass(frozen=True)
class Interpreter:
    """One Python interpreter as the venv copy compares them: ``implementation``
    (``sys.implementation.name``: cpython), ``version`` (X.Y.Z), ``arch`` (platform.machine()),
    ``libc`` ('glibc', 'musl', '' when unknown) and ``libc_version`` (e.g. 2.36, '' when
    unknown)."""

    implementation: str
    version: str
    arch: str
    libc: str
    libc_version: str

    @classmethod
    def of(cls, facts: RemoteFacts) -> Interpreter:
        """The remote's interpreter as the pre-flight probed it."""
        return cls(
            facts.implementation, facts.python_version, facts.arch, facts.libc, facts.libc_version
        )


def manager_interpreter() -> Interpreter:
    """The interpreter running this manager (glibc's own version from confstr, else
    ``platform.libc_ver()``)."""
    arch, family = wheelhouse.manager_platform()
    libc_version = ""
    try:
        confstr = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        confstr = ""
    if confstr.startswith("glibc "):
        family, libc_version = "glibc", confstr.split(" ", 1)[1]
    else:
        libc_version = platform.libc_ver()[1]
    return Interpreter(
        sys.implementation.name, platform.python_version(), arch, family, libc_version
    )


def _numbers(version: str) -> tuple[int, ...] | None:
    found = re.fullmatch(r"(\d+(?:\.\d+)*)", version.strip())
    return tuple(int(p) for p in found.group(1).split(".")) if found else None


def copy_refusal(manager: Interpreter, host: Interpreter, *, manager_in_venv: bool) -> str | None:
    """Why the manager's venv cannot be copied to ``host``, or None when it can. Pure.

    The copy runs the manager's compiled extensions and scripts on the host's interpreter, so
    everything they were built for must hold there: the manager runs from a venv
    (``manager_in_venv``: ``sys.prefix != sys.base_prefix``); both are CPython; the same full
    version X.Y.Z; the same architecture (``amd64`` is ``x86_64``, ``arm64`` is ``aarch64``);
    the same libc family, known on both; the host's libc version >= the manager's (a binary
    linked against glibc 2.36 may need its symbols).

    Returns one clause for a message, naming both sides, e.g. ``"Python 3.11.7 here, 3.12.1 on
    the host"`` (the first difference found, in the order above).
    """
    if not manager_in_venv:
        return "the manager does not run from a venv (sys.prefix is its base interpreter's)"
    impls = (manager.implementation.lower(), host.implementation.lower())
    if impls != ("cpython", "cpython"):
        return f"{manager.implementation} here, {host.implementation} on the host (CPython only)"
    if manager.version.strip() != host.version.strip():
        return f"Python {manager.version} here, {host.version} on the host"
    arch_here = wheelhouse.canonical_arch(manager.arch)
    arch_there = wheelhouse.canonical_arch(host.arch)
    if arch_here != arch_there:
        return f"{arch_here} here, {arch_there} on the host"
    if not host.libc or not manager.libc:
        side = "the host's" if not host.libc else "the manager's"
        return f"{side} C library is unknown"
    if manager.libc != host.libc:
        return f"{manager.libc} here, {host.libc} on the host"
    here, there = _numbers(manager.libc_version), _numbers(host.libc_version)
    if here is None or there is None:
        side = "the host's" if there is None else "the manager's"
        return f"{side} {manager.libc} version is unknown"
    if there < here:
        return f"{manager.libc} {manager.libc_version} here, older {host.libc_version} on the host"
    return None


def wheels_unavailable(error: DeployFailed) -> bool:
    """Whether a failed ``build_bundle(offline=True)`` means the manager cannot get the wheels
    itself (the venv copy's trigger): the index is unreachable from the manager, a package has
    no wheel for the host's platform, or uv for that platform cannot be had."""
    if error.category == Category.INDEX_UNREACHABLE:
        return True
    text = str(error)
    return error.category == Category.INSTALL_FAILED and (
        "has no wheel for" in text or "no uv wheel" in text
    )


def excludes(version: str) -> tuple[str, ...]:
    """What is left out of the copy of a venv of Python ``version`` (X.Y[.Z]), for
    ``SshSession.push_dir``: byte code and the python links (absolute links to the manager's
    interpreter, made again on the host by the agent)."""
    minor = ".".join(version.split(".")[:2])
    return (*ALWAYS_EXCLUDED, "/bin/python", "/bin/python3", f"/bin/python{minor}")


@dataclass(frozen=True)
class VenvCopy:
    """What a venv copy sends: the manager's venv at ``prefix`` (``sys.prefix``) less
    ``exclude``, ``size_bytes`` of it, and servetune's wheel at ``wheel`` (its folder is sent
    too). ``key`` (``venv-copy-<12 hex>``) changes with the venv's distributions, the
    interpreter and servetune's source: it names the folder on the host and the install
    marker's bundle, so a restore skips an install of the same copy."""

    prefix: Path
    wheel: Path
    key: str
    size_bytes: int
    exclude: tuple[str, ...]


def _measure(prefix: Path, exclude: tuple[str, ...]) -> tuple[int, list[str]]:
    """(bytes of the regular files under ``prefix`` not excluded, sorted names of its
    ``*.dist-info`` folders)."""
    total = 0
    infos: list[str] = []
    for folder, dirs, files in os.walk(prefix):
        relative = os.path.relpath(folder, prefix)
        base = "" if relative == "." else relative + "/"
        dirs[:] = [d for d in dirs if not excluded(base + d, exclude)]
        infos += [d for d in dirs if d.endswith(".dist-info")]
        for name in files:
            if excluded(base + name, exclude):
                continue
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            total += st.st_size
    return total, sorted(infos)


async def plan(settings: Settings) -> VenvCopy:
    """The copy of the manager's venv (``sys.prefix``): servetune's wheel (built or cached by
    ``wheelhouse.servetune_wheel``, from uv's cache with no index) and the venv measured.
    Raises DeployFailed as ``servetune_wheel`` does when the wheel cannot be had."""
    own = await wheelhouse.servetune_wheel(settings)
    prefix = Path(sys.prefix)
    exclude = excludes(platform.python_version())
    size, infos = await asyncio.to_thread(_measure, prefix, exclude)
    seed = "\0".join([str(prefix), sys.version, own.digest, *infos])
    key = "venv-copy-" + hashlib.sha256(seed.encode()).hexdigest()[:12]
    return VenvCopy(prefix, own.path, key, size, exclude)
