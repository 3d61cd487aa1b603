"""A private Docker engine for the tests, and the llama.cpp engine image built locally without a registry.

``private_dockerd`` starts Debian's dockerd as root with its own data root and socket;
``llamacpp_image`` builds a debootstrap minbase rootfs with python3 plus the xllamacpp wheel
(downloaded on the host with pip) and servetune's server module, caches the rootfs tarball and
imports it. Tests skip (with the reason) only when dockerd cannot be started here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

import servetune.engines.xllamacpp_server as server_module

SUITE = "bookworm"
"""Debian release of the image: its python3 is 3.11, which the abi3 xllamacpp wheel supports."""
MIRROR = os.environ.get("SERVETUNE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = "python3,libgomp1"
"""python3 for the server module; libgomp1 is the one library the xllamacpp wheel links beyond libc/libstdc++."""
SERVER_IN_IMAGE = "/opt/servetune/xllamacpp_server.py"
ENTRYPOINT = ["python3", SERVER_IN_IMAGE]
"""How the image starts llama.cpp's server: servetune's wheel server module run as a script."""
CACHE_DIR = Path(
    os.environ.get("SERVETUNE_TEST_CACHE", Path.home() / ".cache" / "servetune-tests")
).expanduser()


@contextlib.contextmanager
def private_dockerd() -> Iterator[str]:
    """Start dockerd on its own socket and data root; yield its ``unix://`` URL; stop it after.

    ``--iptables=false --bridge=none``: this sandbox has no netfilter, and trials use host
    networking. Skips the calling test when dockerd is missing or does not come up in 30 s.
    """
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        pytest.skip("dockerd not installed (apt-get install docker.io); .ci/run installs it")
    if os.geteuid() != 0:
        pytest.skip("dockerd needs root here (rootless Docker is not set up)")
    root = Path(tempfile.mkdtemp(prefix="st-dockerd-"))
    sock = root / "docker.sock"
    log = (root / "dockerd.log").open("wb")
    argv = [
        dockerd, "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
        "--host", f"unix://{sock}", "--pidfile", str(root / "docker.pid"),
        "--iptables=false", "--ip6tables=false", "--bridge=none",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # noqa: S603
    url = f"unix://{sock}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                tail = (root / "dockerd.log").read_text(errors="replace")[-1500:]
                pytest.skip(f"dockerd exited ({proc.returncode}) at start: {tail}")
            with contextlib.suppress(docker.errors.DockerException):
                if sock.exists() and docker.DockerClient(base_url=url).ping():
                    break
            if time.monotonic() > deadline:
                pytest.skip("dockerd did not answer within 30 s")
            time.sleep(0.1)
        yield url
    finally:
        with contextlib.suppress(docker.errors.DockerException):
            client = docker.DockerClient(base_url=url)
            for c in client.containers.list(all=True):
                c.remove(force=True)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)


def _unmount_under(root: Path) -> None:
    """Lazily unmount whatever dockerd left mounted below ``root`` (its netns file, overlays),
    deepest first, so the directory can be removed."""
    prefix = str(root.resolve()) + "/"
    mounts = [
        line.split()[1].encode().decode("unicode_escape")
        for line in Path("/proc/self/mounts").read_text().splitlines()
    ]
    for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)  # noqa: S603


def _recipe_key() -> str:
    """Changes whenever what goes into the image changes (wheel version, server module, recipe)."""
    h = hashlib.sha256()
    h.update(importlib.metadata.version("xllamacpp").encode())
    h.update(Path(server_module.__file__).read_bytes())
    h.update(f"{SUITE} {MIRROR} {PACKAGES} {SERVER_IN_IMAGE} v1".encode())
    return h.hexdigest()[:12]


def _run(argv: list[str], **kw: Any) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # noqa: S603
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {(r.stdout + r.stderr)[-2000:]}")


def build_rootfs_tar(dest: Path) -> None:
    """Build the image's root filesystem as a tarball at ``dest`` (about 40-60 s, ~300 MB).

    debootstrap --variant=minbase from the Debian mirror, python3 and libgomp1, the xllamacpp
    wheel (``pip download`` on the host, installed into dist-packages with ``--no-deps``; it has
    no required dependencies) and servetune's xllamacpp_server module at SERVER_IN_IMAGE.
    """
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap not installed (apt-get install debootstrap); .ci/run installs it")
    with tempfile.TemporaryDirectory(prefix="st-rootfs-") as tmp:
        root, wheels = Path(tmp) / "root", Path(tmp) / "wheels"
        _run(
            ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(root), MIRROR]
        )
        version = importlib.metadata.version("xllamacpp")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "--disable-pip-version-check", "-d", str(wheels), f"xllamacpp=={version}"])  # fmt: skip
        site = root / "usr/local/lib/python3.11/dist-packages"
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
              "--disable-pip-version-check", "--target", str(site), *map(str, wheels.glob("*.whl"))])  # fmt: skip
        target = root / SERVER_IN_IMAGE.lstrip("/")
        target.parent.mkdir(parents=True)
        shutil.copy(server_module.__file__, target)
        for junk in ("usr/share/doc", "usr/share/man", "usr/share/locale", "var/cache/apt",
                     "var/lib/apt/lists"):  # fmt: skip
            shutil.rmtree(root / junk, ignore_errors=True)
        part = dest.with_suffix(".part")
        _run(["tar", "-C", str(root), "-cf", str(part), "."])
        part.rename(dest)


def llamacpp_image(client: docker.DockerClient) -> str:
    """Tag of the llama.cpp engine image on ``client``'s daemon, imported from the cached rootfs
    tarball (built first when the cache lacks it; a lock file serialises concurrent builders)."""
    key = _recipe_key()
    tag = f"servetune-test/llamacpp:{key}"
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(tag)
        return tag
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tar = CACHE_DIR / f"llamacpp-rootfs-{key}.tar"
    with (CACHE_DIR / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not tar.exists():
            build_rootfs_tar(tar)
    client.api.import_image_from_file(str(tar), repository="servetune-test/llamacpp", tag=key)
    return tag
