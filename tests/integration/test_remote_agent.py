"""The remote agent run exactly the way ssh runs it, without ssh: ``<python> -I -c BOOTSTRAP``
with the request line (and the tar stream) on stdin, under real interpreters of several versions.

Real parts only: tmpfs mounts (root) for read-only and full disks, a real redis-server, real
processes for the worker (a small script standing in for venv/bin/servetune).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from servetune.remote.agent import BOOTSTRAP, parse_reply, request_line
from servetune.remote.models import Category, RemoteFacts
from tests.redis_server import RedisServer, free_port
from tests.sshd import SshServer, ssh_server

pytestmark = pytest.mark.integration

SYSTEM_PYTHON = "/usr/bin/python3"
PY39 = "/root/.pyenv/versions/3.9.18/bin/python3"
PY36 = "/root/.pyenv/versions/3.6.15/bin/python3"

needs_py36 = pytest.mark.skipif(not os.path.exists(PY36), reason=f"{PY36} is not installed")
needs_py39 = pytest.mark.skipif(not os.path.exists(PY39), reason=f"{PY39} is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

INTERPRETERS = [
    pytest.param(SYSTEM_PYTHON, id="py311"),
    pytest.param(PY36, id="py36", marks=needs_py36),
]


def run_agent(
    action: str,
    params: dict[str, Any],
    *,
    python: str = SYSTEM_PYTHON,
    stdin_tail: bytes = b"",
    timeout_s: float = 60,
) -> dict[str, Any]:
    """Run one agent action as ssh would and return its reply; checks the exit status."""
    proc = subprocess.run(  # noqa: S603
        [python, "-I", "-c", BOOTSTRAP],
        input=request_line(action, params) + stdin_tail,
        capture_output=True,
        timeout=timeout_s,
        check=False,
    )
    reply = parse_reply(proc.stdout.decode())
    assert proc.returncode == (0 if reply["ok"] else 1), proc.stderr.decode()
    return reply


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["ok"], reply
    result: dict[str, Any] = reply["result"]
    return result


def error(reply: dict[str, Any], kind: Category) -> dict[str, Any]:
    assert not reply["ok"], reply
    err: dict[str, Any] = reply["error"]
    assert err["kind"] == kind.value, err
    return err


@contextlib.contextmanager
def tmpfs(path: Path, *, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (read-only when asked), unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)  # noqa: S603
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)  # noqa: S603


# --- protocol -------------------------------------------------------------------------------


def test_the_module_imports_without_running_an_action() -> None:
    # importing defined things only (we got here); the source BOOTSTRAP ships is this module's
    import servetune.remote.agent as agent

    assert agent.agent_source() == Path(agent.__file__).read_text(encoding="utf-8")
    assert "\n" not in BOOTSTRAP
    line = request_line("probe", {"install_dir": "/x\n; rm -rf /"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1


def test_parse_reply_takes_the_last_marker_line_and_rejects_garbage() -> None:
    out = 'motd\nSERVETUNE-AGENT {"ok": true, "result": {"a": 1}}\n'
    assert parse_reply(out) == {"ok": True, "result": {"a": 1}}
    with pytest.raises(ValueError, match="SERVETUNE-AGENT"):
        parse_reply("bash: python3: command not found\n")
    with pytest.raises(ValueError, match="not JSON"):
        parse_reply("SERVETUNE-AGENT {oops\n")
    with pytest.raises(ValueError, match="kind"):
        parse_reply('SERVETUNE-AGENT {"ok": false}\n')


def test_an_unknown_action_or_a_missing_parameter_is_a_clear_error() -> None:
    err = error(run_agent("format_disk", {}), Category.UNKNOWN)
    assert "format_disk" in err["message"]
    err = error(run_agent("prepare", {}), Category.UNKNOWN)
    assert "install_dir" in err["message"]


# --- probe ----------------------------------------------------------------------------------


class _Index(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/simple/pip/" else 404
        if self.headers.get("Authorization") not in (None, "Basic dG9rOnMzY3IzdA=="):  # tok:s3cr3t
            code = 401
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"<html></html>")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def index_url() -> Iterator[str]:
    """A local HTTP server answering /simple/pip/ like a package index."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("python", INTERPRETERS)
def test_probe_reports_the_facts_of_the_host(python: str, tmp_path: Path, index_url: str) -> None:
    install_dir = tmp_path / "not-yet" / "servetune"
    params = {"install_dir": str(install_dir), "index_url": index_url, "index_timeout_s": 5}
    facts = RemoteFacts.model_validate(
        ok(run_agent("probe", {**params, "min_python": [3, 6]}, python=python))
    )
    version = subprocess.run(  # noqa: S603
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert facts.python_version == version
    assert facts.python_executable == python
    assert facts.implementation == "cpython"
    assert facts.arch == platform.machine()
    assert (facts.libc, facts.libc_version) == (
        "glibc",
        (os.confstr("CS_GNU_LIBC_VERSION") or "? ?").split()[1],
    )
    assert facts.install_dir == str(install_dir)
    assert facts.install_dir_writable
    free_gib = shutil.disk_usage(tmp_path).free / 1024**3
    assert abs(facts.free_disk_gib - free_gib) < 1
    assert facts.has_rsync == (shutil.which("rsync") is not None)
    assert facts.has_tar == (shutil.which("tar") is not None)
    assert facts.index_reachable is True and facts.index_error is None


def test_probe_reports_an_unreachable_index_without_failing(tmp_path: Path) -> None:
    port = free_port()
    params = {"install_dir": str(tmp_path), "index_url": f"http://127.0.0.1:{port}/simple"}
    facts = ok(run_agent("probe", {**params, "index_timeout_s": 3, "min_python": [3, 11]}))
    assert facts["index_reachable"] is False
    assert f"127.0.0.1:{port}/simple/pip/" in facts["index_error"]
    assert "refused" in facts["index_error"].lower()


def test_probe_sends_the_index_credentials_as_basic_auth_and_never_names_them(
    tmp_path: Path, index_url: str
) -> None:
    """``https://user:token@host/simple``: urllib alone reads ``user:token@host`` as the host."""
    with_token = index_url.replace("http://", "http://tok:s3cr3t@")
    params = {"install_dir": str(tmp_path), "index_url": with_token, "index_timeout_s": 5}
    facts = ok(run_agent("probe", {**params, "min_python": [3, 11]}))
    assert facts["index_reachable"] is True, facts
    wrong = index_url.replace("http://", "http://tok:wrong@")
    facts = ok(run_agent("probe", {**params, "index_url": wrong, "min_python": [3, 11]}))
    assert facts["index_reachable"] is False and "401" in facts["index_error"]
    assert "wrong" not in facts["index_error"] and "tok" not in facts["index_error"]


def test_the_system_python_is_not_too_old_for_3_11() -> None:
    ok(run_agent("probe", {"install_dir": "~/.servetune", "min_python": [3, 11]}))


@needs_py39
def test_probe_on_python_3_9_is_python_too_old_naming_both_versions() -> None:
    err = error(
        run_agent("probe", {"install_dir": "~/.servetune", "min_python": [3, 11]}, python=PY39),
        Category.PYTHON_TOO_OLD,
    )
    assert "3.9.18" in err["message"] and "3.11" in err["message"] and PY39 in err["message"]


@needs_py36
def test_probe_on_python_3_6_is_python_too_old() -> None:
    # the agent's own syntax must run on 3.6 for it to say so
    err = error(
        run_agent("probe", {"install_dir": "~/.servetune", "min_python": [3, 11]}, python=PY36),
        Category.PYTHON_TOO_OLD,
    )
    assert "3.6.15" in err["message"]


# --- prepare --------------------------------------------------------------------------------


def test_prepare_makes_the_install_folders_private(tmp_path: Path) -> None:
    install_dir = tmp_path / "a" / "servetune"
    result = ok(run_agent("prepare", {"install_dir": str(install_dir), "min_free_gib": 0.001}))
    assert result["install_dir"] == str(install_dir)
    for sub in ("", "data", "logs", "ssh", "incoming"):
        mode = stat.S_IMODE((install_dir / sub).stat().st_mode)
        assert mode == 0o700, (sub, oct(mode))
    assert list((install_dir / "incoming").iterdir()) == []  # its write test left nothing


def test_prepare_leaves_an_existing_directory_s_mode_and_refuses_a_shared_one(
    tmp_path: Path,
) -> None:
    """An install_dir that exists keeps its mode (servetune did not make it); one others may
    write to (a /tmp-like directory) is refused, untouched."""
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    own.chmod(0o755)
    ok(run_agent("prepare", {"install_dir": str(own)}))
    assert stat.S_IMODE(own.stat().st_mode) == 0o755
    assert stat.S_IMODE((own / "ssh").stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    err = error(run_agent("prepare", {"install_dir": str(shared)}), Category.PERMISSION_DENIED)
    assert "shared directory" in err["message"] and str(shared) in err["message"]
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777 and list(shared.iterdir()) == []


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        ("foreign", "not empty and servetune did not prepare it"),
        ("other-slot", "holds the worker of slot w1"),
        ("link-to-proc", "a system directory"),
    ],
)
def test_prepare_takes_over_only_a_directory_servetune_may(
    setup: str, says: str, tmp_path: Path
) -> None:
    """A directory with someone else's files, another slot's install, or a link into a system
    tree is refused before anything is written; existing files keep their modes."""
    target = tmp_path / "dir"
    if setup == "foreign":
        target.mkdir()
        (target / "ssh").mkdir(mode=0o755)
        (target / "ssh").chmod(0o755)
    elif setup == "other-slot":
        target.mkdir()
        (target / "incoming").mkdir()
        (target / "worker.json").write_text(json.dumps({"name": "w1"}))
    else:
        target.symlink_to("/proc/self")
    params = {"install_dir": str(target), "name": "w2"}
    err = error(run_agent("prepare", params), Category.PERMISSION_DENIED)
    assert says in err["message"], err
    if setup == "foreign":
        assert stat.S_IMODE((target / "ssh").stat().st_mode) == 0o755
        assert sorted(p.name for p in target.iterdir()) == ["ssh"]


def test_prepare_over_a_file_is_permission_denied(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    err = error(
        run_agent("prepare", {"install_dir": str(tmp_path / "a-file")}), Category.PERMISSION_DENIED
    )
    assert "EEXIST" in err["message"]


def test_prepare_under_a_file_is_permission_denied_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    target = tmp_path / "a-file" / "servetune"
    err = error(run_agent("prepare", {"install_dir": str(target)}), Category.PERMISSION_DENIED)
    assert str(target) in err["message"] and "Not a directory" in err["message"]


@needs_root
def test_prepare_on_a_read_only_mount_is_permission_denied(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", size="1m", read_only=True) as mount:
        target = mount / "servetune"
        err = error(run_agent("prepare", {"install_dir": str(target)}), Category.PERMISSION_DENIED)
        assert str(target) in err["message"] and "EROFS" in err["message"]


@needs_root
def test_prepare_on_a_full_disk_is_disk_full(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", size="1m") as mount:
        # less free than asked for
        err = error(
            run_agent("prepare", {"install_dir": str(mount / "a"), "min_free_gib": 1}),
            Category.DISK_FULL,
        )
        assert "GiB free" in err["message"] and str(mount / "a") in err["message"]
        # really full: writing fails with ENOSPC
        with contextlib.suppress(OSError), (mount / "filler").open("wb") as filler:
            filler.write(b"\0" * 2 * 1024 * 1024)
        err = error(
            run_agent("prepare", {"install_dir": str(mount / "b"), "min_free_gib": 0}),
            Category.DISK_FULL,
        )
        assert "ENOSPC" in err["message"]


# --- untar ----------------------------------------------------------------------------------


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|gz") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = "") -> Any:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = link
    return info


@pytest.mark.parametrize("python", INTERPRETERS)
def test_untar_extracts_the_stream_after_the_request_line(python: str, tmp_path: Path) -> None:
    wheel = os.urandom(200_000)  # bigger than any read-ahead buffer
    stream = make_tar(
        [
            (entry("bundle", tarfile.DIRTYPE, 0o755), None),
            (entry("bundle/servetune-1.0-py3-none-any.whl"), wheel),
            (entry("bundle/bin/uv", mode=0o755), b"#!/bin/sh\n"),
            (
                entry("bundle/latest.whl", tarfile.SYMTYPE, link="servetune-1.0-py3-none-any.whl"),
                None,
            ),
        ]
    )
    dest = tmp_path / "incoming"
    result = ok(run_agent("untar", {"dest": str(dest)}, python=python, stdin_tail=stream))
    assert result == {"files": 2}
    assert (dest / "bundle/servetune-1.0-py3-none-any.whl").read_bytes() == wheel
    assert stat.S_IMODE((dest / "bundle/bin/uv").stat().st_mode) == 0o755
    assert (dest / "bundle/latest.whl").read_bytes() == wheel


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (entry("../evil"), "'..'"),
        (entry("a/../../evil"), "'..'"),
        (entry("/tmp/servetune-agent-evil"), "absolute"),
        (entry("link", tarfile.SYMTYPE, link="../../etc"), "outside"),
        (entry("link", tarfile.SYMTYPE, link="/etc"), "outside"),
        (entry("hard", tarfile.LNKTYPE, link="../evil"), "'..'"),
        (entry("dev", tarfile.CHRTYPE), "not a file"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink-out",
        "symlink-abs",
        "hardlink-out",
        "device",
    ],
)
def test_untar_refuses_a_hostile_member(member: Any, why: str, tmp_path: Path) -> None:
    dest = tmp_path / "deep" / "incoming"
    stream = make_tar([(member, b"pwned" if member.isreg() else None)])
    err = error(run_agent("untar", {"dest": str(dest)}, stdin_tail=stream), Category.UNKNOWN)
    assert why in err["message"] and member.name in err["message"]
    assert not (tmp_path / "deep" / "evil").exists()
    assert not (tmp_path / "evil").exists()
    assert not Path("/tmp/servetune-agent-evil").exists()
    assert not (dest / "link").exists() and not (dest / "dev").exists()


def test_untar_refuses_a_member_written_through_an_earlier_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "incoming"
    dest.mkdir()
    (dest / "sneaky").symlink_to(outside)  # left there before (or by a link test)
    stream = make_tar([(entry("sneaky/file"), b"pwned")])
    err = error(run_agent("untar", {"dest": str(dest)}, stdin_tail=stream), Category.UNKNOWN)
    assert "link" in err["message"]
    assert list(outside.iterdir()) == []


def test_untar_refuses_a_symlink_that_leads_out_through_an_earlier_one(tmp_path: Path) -> None:
    """``sub/up -> ..`` stays inside; ``esc -> sub/up/..`` reads as inside yet resolves to
    dest's parent."""
    dest = tmp_path / "deep" / "incoming"
    stream = make_tar(
        [
            (entry("sub", tarfile.DIRTYPE), None),
            (entry("sub/up", tarfile.SYMTYPE, link=".."), None),
            (entry("esc", tarfile.SYMTYPE, link="sub/up/.."), None),
        ]
    )
    err = error(run_agent("untar", {"dest": str(dest)}, stdin_tail=stream), Category.UNKNOWN)
    assert "outside" in err["message"] and "'esc'" in err["message"]
    assert not (dest / "esc").exists() and not (dest / "esc").is_symlink()


# --- keygen, write_file ---------------------------------------------------------------------


@pytest.mark.parametrize("python", INTERPRETERS)
def test_keygen_makes_one_key_and_reuses_it(python: str, tmp_path: Path) -> None:
    first = ok(run_agent("keygen", {"install_dir": str(tmp_path)}, python=python))
    second = ok(run_agent("keygen", {"install_dir": str(tmp_path)}, python=python))
    assert first == second
    assert first["public_key"].startswith("ssh-ed25519 ")
    private = Path(first["private_key"])
    assert private == tmp_path / "ssh" / "id_ed25519"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (tmp_path / "ssh" / "id_ed25519.pub").read_text().split()[:2] == first[
        "public_key"
    ].split()[:2]


@pytest.mark.parametrize("python", INTERPRETERS)
def test_write_file_is_created_with_its_mode(python: str, tmp_path: Path) -> None:
    path = tmp_path / "conf" / "worker.json"
    path.parent.mkdir()
    path.write_text("old")
    path.chmod(0o644)
    content = '{"redis_url": "redis://:s3cret@127.0.0.1:6379/0"}\n'
    params = {"path": str(path), "content": content, "mode": 0o600}
    result = ok(run_agent("write_file", params, python=python))
    assert result == {"path": str(path)}
    assert path.read_text() == content
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["worker.json"]  # no temp file left


# --- redis_probe, tunnel_check --------------------------------------------------------------


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password="pa ss;$(touch x)")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.parametrize("python", INTERPRETERS)
def test_redis_probe_authenticates_and_pings(python: str, redis_with_password: RedisServer) -> None:
    params = {"host": "127.0.0.1", "port": redis_with_password.port, "timeout_s": 5}
    password = redis_with_password.password
    reply = run_agent("redis_probe", {**params, "password": password}, python=python)
    assert ok(reply) == {"reply": "PONG"}
    err = error(
        run_agent("redis_probe", {**params, "password": "wrong"}), Category.REDIS_UNREACHABLE
    )
    assert "password" in err["message"]
    assert "wrong" not in err["message"]
    err = error(run_agent("redis_probe", params), Category.REDIS_UNREACHABLE)
    assert "NOAUTH" in err["message"]


def test_redis_probe_on_a_closed_port_is_redis_unreachable() -> None:
    port = free_port()
    reply = run_agent("redis_probe", {"host": "127.0.0.1", "port": port, "timeout_s": 3})
    err = error(reply, Category.REDIS_UNREACHABLE)
    assert f"127.0.0.1:{port}" in err["message"] and "refused" in err["message"].lower()


def test_tunnel_check_waits_for_redis_behind_the_command_then_stops_it(tmp_path: Path) -> None:
    # a redis-server listening on bind_port stands in for `ssh -N -L bind_port:...`
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary is not None
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--requirepass", "pw"]
    params = {"argv": argv, "bind_port": port, "password": "pw", "timeout_s": 20}
    result = ok(run_agent("tunnel_check", params))
    assert 0 < result["seconds"] < 20
    with pytest.raises(ConnectionRefusedError):  # stopped again
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_tunnel_check_reports_the_tunnels_stderr_when_it_exits() -> None:
    script = "import sys; sys.stderr.write('bind [127.0.0.1]:6390: Address already in use\\n'); sys.exit(255)"
    params = {"argv": [sys.executable, "-c", script], "bind_port": free_port(), "timeout_s": 10}
    err = error(run_agent("tunnel_check", params), Category.TUNNEL_FAILED)
    assert "255" in err["message"]
    assert "Address already in use" in err["detail"]


# --- start_worker, status, stop_worker ------------------------------------------------------

SLEEPER = """#!{python}
import os, subprocess, sys, time
# a child in the same process group, as an engine started by the worker would be
child = subprocess.Popen({child})
with open(os.path.join(os.path.dirname(__file__), "..", "..", "child.pid"), "w") as f:
    f.write(str(child.pid))
print("worker started", sys.argv[1:], flush=True)
{extra}
time.sleep(300)
"""

CRASHER = """#!{python}
import sys
sys.stderr.write("servetune: error: cannot read /nope/worker.json\\n")
sys.exit(2)
"""


def fake_install(root: Path, script: str, extra: str = "", child: list[str] | None = None) -> Path:
    """An install dir whose venv/bin/servetune is ``script`` (a python program); SLEEPER starts
    ``child`` (default ``sleep 300``) in its process group and runs ``extra`` before sleeping."""
    exe = root / "venv" / "bin" / "servetune"
    exe.parent.mkdir(parents=True)
    child = child or ["sleep", "300"]
    exe.write_text(script.format(python=SYSTEM_PYTHON, extra=extra, child=repr(child)))
    exe.chmod(0o755)
    (root / "worker.json").write_text("{}")
    return root


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def workers_of(install_dir: Path) -> list[int]:
    """Our own /proc scan: processes running this install's servetune worker."""
    exe = str(install_dir / "venv" / "bin" / "servetune")
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if exe.encode() in args and b"worker" in args:
                found.append(int(entry))
    return sorted(found)


@pytest.fixture
def installs(tmp_path: Path) -> Iterator[list[Path]]:
    """Install dirs made by the test; every process left under them is killed afterwards."""
    made: list[Path] = []
    yield made
    for install_dir in made:
        pids = workers_of(install_dir)
        child_pid = install_dir / "child.pid"
        if child_pid.exists():
            pids.append(int(child_pid.read_text()))
        for pid in pids:
            with contextlib.suppress(OSError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def start(install_dir: Path, python: str = SYSTEM_PYTHON, **extra: Any) -> dict[str, Any]:
    config = str(install_dir / "worker.json")
    params = {"install_dir": str(install_dir), "config_path": config, **extra}
    return run_agent("start_worker", params, python=python)


@pytest.mark.parametrize("python", INTERPRETERS)
def test_a_started_worker_outlives_the_agent_and_is_stopped_with_its_group(
    python: str, tmp_path: Path, installs: list[Path]
) -> None:
    install_dir = fake_install(tmp_path / "st", SLEEPER)
    installs.append(install_dir)
    began = time.monotonic()
    pid = ok(start(install_dir, wait_s=1, python=python))["pid"]
    # the agent returned (its stdout pipe closed) while the worker runs: nothing of the worker
    # holds the channel, so ssh would not wait for it either
    assert time.monotonic() - began < 10
    assert alive(pid)
    assert os.getsid(pid) == pid  # its own session: no SIGHUP when the ssh session ends
    assert (install_dir / "worker.pid").read_text().strip() == str(pid)
    assert "worker started" in (install_dir / "logs" / "worker.out").read_text()
    child = int((install_dir / "child.pid").read_text())
    assert alive(child)

    assert ok(run_agent("status", {"install_dir": str(install_dir)}, python=python)) == {
        "running": True,
        "pids": [pid],
    }
    params = {"install_dir": str(install_dir), "grace_s": 5}
    stopped = ok(run_agent("stop_worker", params, python=python))
    assert stopped == {"stopped": [pid]}
    assert not alive(pid) and not alive(child)  # the whole process group
    assert not (install_dir / "worker.pid").exists()
    assert ok(run_agent("status", {"install_dir": str(install_dir)})) == {
        "running": False,
        "pids": [],
    }


def test_starting_twice_leaves_one_worker(tmp_path: Path, installs: list[Path]) -> None:
    install_dir = fake_install(tmp_path / "st", SLEEPER)
    installs.append(install_dir)
    first = ok(start(install_dir, wait_s=0.5))["pid"]
    second = ok(start(install_dir, wait_s=0.5))["pid"]
    assert first != second
    assert not alive(first)
    assert workers_of(install_dir) == [second]
    assert ok(run_agent("status", {"install_dir": str(install_dir)}))["pids"] == [second]


def test_stop_kills_a_worker_that_ignores_sigterm(tmp_path: Path, installs: list[Path]) -> None:
    extra = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    install_dir = fake_install(tmp_path / "st", SLEEPER, extra)
    installs.append(install_dir)
    pid = ok(start(install_dir, wait_s=0.5))["pid"]
    began = time.monotonic()
    assert ok(run_agent("stop_worker", {"install_dir": str(install_dir), "grace_s": 1}))[
        "stopped"
    ] == [pid]
    assert time.monotonic() - began < 10
    assert not alive(pid)


def test_stop_also_kills_what_the_worker_left_in_its_group(
    tmp_path: Path, installs: list[Path]
) -> None:
    stubborn = [
        SYSTEM_PYTHON,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)",
    ]
    install_dir = fake_install(tmp_path / "st", SLEEPER, child=stubborn)
    installs.append(install_dir)
    pid = ok(start(install_dir, wait_s=1))["pid"]
    child = int((install_dir / "child.pid").read_text())
    ok(run_agent("stop_worker", {"install_dir": str(install_dir), "grace_s": 2}))
    assert not alive(pid)
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def test_stop_lets_the_worker_hand_back_before_its_group_is_killed(
    tmp_path: Path, installs: list[Path]
) -> None:
    """SIGTERM goes to the worker alone: the tunnel's ssh in its group must still carry the
    hand-back of its running trials; the group is SIGKILLed only once the worker is gone."""
    marker = tmp_path / "child-got-sigterm"
    child = [
        SYSTEM_PYTHON,
        "-c",
        "import signal, sys, time\n"
        "def term(*_):\n"
        f"    open({str(marker)!r}, 'w').close(); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "time.sleep(300)",
    ]
    install_dir = fake_install(tmp_path / "st", SLEEPER, child=child)
    installs.append(install_dir)
    pid = ok(start(install_dir, wait_s=1))["pid"]
    child_pid = int((install_dir / "child.pid").read_text())
    assert ok(run_agent("stop_worker", {"install_dir": str(install_dir), "grace_s": 5}))[
        "stopped"
    ] == [pid]
    deadline = time.monotonic() + 5
    while alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid) and not alive(child_pid)
    assert not marker.exists(), "the worker's group got the SIGTERM meant for the worker"


def test_status_and_stop_touch_only_this_installs_worker(
    tmp_path: Path, installs: list[Path]
) -> None:
    mine = fake_install(tmp_path / "mine", SLEEPER)
    other = fake_install(tmp_path / "other", SLEEPER)
    installs.extend([mine, other])
    ok(start(mine, wait_s=0.5))
    other_pid = ok(start(other, wait_s=0.5))["pid"]
    (mine / "worker.pid").write_text(str(other_pid))  # a stale pidfile naming someone else
    assert ok(run_agent("status", {"install_dir": str(mine)}))["pids"] == workers_of(mine)
    ok(run_agent("stop_worker", {"install_dir": str(mine), "grace_s": 2}))
    assert workers_of(mine) == []
    assert alive(other_pid)


def test_stopping_a_slots_worker_leaves_another_slots_worker_in_a_shared_install_dir(
    tmp_path: Path, installs: list[Path]
) -> None:
    """Two slots given one host and install directory: removing the one never deployed must not
    stop the other's worker (worker.json says whose it is)."""
    shared = fake_install(tmp_path / "shared", SLEEPER)
    installs.append(shared)
    (shared / "worker.json").write_text(json.dumps({"name": "w1"}))
    pid = ok(start(shared, wait_s=0.5))["pid"]
    params = {"install_dir": str(shared), "grace_s": 2}
    assert ok(run_agent("stop_worker", {**params, "name": "dup1"})) == {
        "stopped": [],
        "owner": "w1",
    }
    assert alive(pid)
    assert ok(run_agent("stop_worker", {**params, "name": "w1"}))["stopped"] == [pid]
    assert not alive(pid)


def test_a_worker_that_exits_at_once_is_worker_start_failed_with_its_log(
    tmp_path: Path, installs: list[Path]
) -> None:
    install_dir = fake_install(tmp_path / "crash", CRASHER)
    installs.append(install_dir)
    err = error(start(install_dir), Category.WORKER_START_FAILED)
    assert "status 2" in err["message"]
    assert "cannot read /nope/worker.json" in err["detail"]
    assert not (install_dir / "worker.pid").exists()


def test_start_without_an_install_is_worker_start_failed(tmp_path: Path) -> None:
    err = error(start(tmp_path), Category.WORKER_START_FAILED)
    assert "not installed" in err["message"]


# --- install (offline, with the manager's own uv; no network) -------------------------------


def make_wheel(
    folder: Path, name: str, version: str, files: dict[str, str], requires: str = ""
) -> Path:
    """A minimal valid pure-python wheel (METADATA, WHEEL, RECORD with hashes)."""
    import base64
    import hashlib
    import zipfile

    dist_info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    if requires:
        metadata += f"Requires-Dist: {requires}\n"
    contents = {
        **files,
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in contents.items():
        digest = hashlib.sha256(text.encode()).digest()
        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{path},sha256={b64},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    contents[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in contents.items():
            zf.writestr(path, text)
    return wheel


MANAGER_UV = shutil.which("uv") or str(Path(sys.executable).parent / "uv")


def install_params(install_dir: Path, wheel: Path, uv: str) -> dict[str, Any]:
    return {
        "install_dir": str(install_dir),
        "python": SYSTEM_PYTHON,
        "wheel": str(wheel),
        "uv": uv,
        "constraints": None,
        "wheelhouse": str(wheel.parent),
        "index_url": None,
        "timeout_s": 60,
    }


@pytest.mark.skipif(not os.access(MANAGER_UV, os.X_OK), reason="no uv next to the test's python")
def test_install_offline_from_a_wheelhouse_then_import(tmp_path: Path) -> None:
    files = {"servetune/__init__.py": "VERSION = 'test'\n"}
    wheel = make_wheel(tmp_path / "wheelhouse", "servetune", "0.0.1", files)
    install_dir = tmp_path / "install"
    result = ok(run_agent("install", install_params(install_dir, wheel, MANAGER_UV)))
    assert result["version"] == "0.0.1"
    assert 0 < result["seconds"] < 60
    venv_python = install_dir / "venv" / "bin" / "python"
    check = [str(venv_python), "-c", "import servetune; print(servetune.VERSION)"]
    assert subprocess.run(check, capture_output=True, text=True, check=True).stdout == "test\n"  # noqa: S603
    assert "--offline" in (install_dir / "logs" / "install.log").read_text()


@pytest.mark.skipif(not os.access(MANAGER_UV, os.X_OK), reason="no uv next to the test's python")
def test_install_with_a_uv_wheel_extracts_uv(tmp_path: Path) -> None:
    import zipfile

    uv_wheel = tmp_path / "uv-0.0.0-py3-none-manylinux_2_17_x86_64.whl"
    with zipfile.ZipFile(uv_wheel, "w") as zf:  # stored: the binary is big, the test fast
        zf.write(MANAGER_UV, "uv-0.0.0.data/scripts/uv")
    wheel = make_wheel(tmp_path / "wheelhouse", "servetune", "0.0.3", {"servetune/__init__.py": ""})
    install_dir = tmp_path / "install"
    result = ok(run_agent("install", install_params(install_dir, wheel, str(uv_wheel))))
    assert result["version"] == "0.0.3"
    assert os.access(install_dir / "bin" / "uv", os.X_OK)


@pytest.mark.skipif(not os.access(MANAGER_UV, os.X_OK), reason="no uv next to the test's python")
def test_install_missing_dependency_is_install_failed_with_the_log(tmp_path: Path) -> None:
    files = {"servetune/__init__.py": ""}
    wheel = make_wheel(
        tmp_path / "wheelhouse", "servetune", "0.0.1", files, "not-in-the-wheelhouse"
    )
    err = error(
        run_agent("install", install_params(tmp_path / "install", wheel, MANAGER_UV)),
        Category.INSTALL_FAILED,
    )
    assert "uv pip install" in err["message"]
    assert "not-in-the-wheelhouse" in err["detail"]


@pytest.mark.skipif(not os.access(MANAGER_UV, os.X_OK), reason="no uv next to the test's python")
def test_install_of_a_wheel_without_the_module_is_module_not_found(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "wheelhouse", "servetune", "0.0.2", {"other/__init__.py": ""})
    err = error(
        run_agent("install", install_params(tmp_path / "install", wheel, MANAGER_UV)),
        Category.MODULE_NOT_FOUND,
    )
    assert "ModuleNotFoundError" in err["detail"] and "servetune" in err["detail"]


@needs_root
@pytest.mark.skipif(not os.access(MANAGER_UV, os.X_OK), reason="no uv next to the test's python")
def test_install_on_a_full_disk_is_disk_full(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "wheelhouse", "servetune", "0.0.1", {"servetune/__init__.py": ""})
    with tmpfs(tmp_path / "small", size="1m") as mount:
        (mount / "install" / "logs").mkdir(parents=True)
        with contextlib.suppress(OSError), (mount / "filler").open("wb") as filler:
            filler.write(b"\0" * 2 * 1024 * 1024)
        err = error(
            run_agent("install", install_params(mount / "install", wheel, MANAGER_UV)),
            Category.DISK_FULL,
        )
        assert "no space left" in err["message"].lower()


# --- through a real sshd: the remote shell, the channel, the session's end ------------------


def ssh_argv(server: SshServer, key: Path, known_hosts: Path, remote_command: str) -> list[str]:
    return [
        "ssh",
        "-p",
        str(server.port),
        "-i",
        str(key),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "IdentitiesOnly=yes",
        f"root@{server.address}",
        remote_command,
    ]


@needs_root
def test_a_worker_started_over_ssh_survives_the_session_and_its_sshd(
    tmp_path: Path, installs: list[Path], client_key: Path
) -> None:
    install_dir = fake_install(tmp_path / "over ssh; $(touch pwned)", SLEEPER)  # travels as JSON
    installs.append(install_dir)
    remote_command = shlex.join([SYSTEM_PYTHON, "-I", "-c", BOOTSTRAP])  # all ssh ever sends
    params = {"install_dir": str(install_dir), "config_path": str(install_dir / "worker.json")}
    with ssh_server(tmp_path / "sshd") as server:
        server.authorize(Path(f"{client_key}.pub"))
        began = time.monotonic()
        proc = subprocess.run(  # noqa: S603
            ssh_argv(server, client_key, tmp_path / "known_hosts", remote_command),
            input=request_line("start_worker", {**params, "wait_s": 1}),
            capture_output=True,
            timeout=30,  # ssh would wait 300 s if the worker held the channel
            check=False,
        )
        assert time.monotonic() - began < 20
        pid = ok(parse_reply(proc.stdout.decode()))["pid"]
        assert proc.returncode == 0, proc.stderr.decode()
        time.sleep(0.5)
        assert alive(pid)  # no SIGHUP/SIGPIPE when the session closed
    assert alive(pid)  # nor when sshd and its sessions were stopped
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    assert ok(run_agent("stop_worker", {"install_dir": str(install_dir), "grace_s": 5}))[
        "stopped"
    ] == [pid]
