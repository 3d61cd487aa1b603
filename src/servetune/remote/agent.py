# ruff: noqa: UP015, UP031
# (this file must stay valid Python 3.6: no ``X | None``, no ``list[str]`` at runtime, no walrus)
"""The agent: a stdlib-only script that the REMOTE host's python runs, fed JSON on stdin.

The manager never sends a user value on a command line. ssh runs ``<python> -I -c BOOTSTRAP``
(``python`` validated by PYTHON_PATTERN, both shlex-quoted); BOOTSTRAP reads ONE JSON line from
stdin, ``{"code": <this file>, "action": str, "params": {...}}``, and execs the code with
``REQUEST`` bound and ``__name__ == "servetune_agent"``. The rest of stdin stays readable (the tar
stream of ``untar``). Imported normally (by the manager) this module only defines things.

The LAST stdout line is ``SERVETUNE-AGENT {json}``: ``{"ok": true, "result": {...}}`` or
``{"ok": false, "error": {"kind": <Category value>, "message": str, "detail": str}}``; the exit
status is 0 on success and 1 on an error reply.

Runs on Python 3.6+ so that an old interpreter can still report ``python_too_old``. Every
subprocess it starts is an argv list with a timeout that kills its whole process group.
"""

import contextlib
import errno
import json
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

MARKER = "SERVETUNE-AGENT "
"""The prefix of the agent's reply line on stdout."""

GIB = 1024**3

BOOTSTRAP = (
    "import sys,json;"
    "R=json.loads(sys.stdin.buffer.readline().decode('utf-8'));"
    "v=sys.version_info;"
    "v<(3,6) and (sys.stdout.write('\\nSERVETUNE-AGENT '+json.dumps({'ok':False,'error':"
    "{'kind':'python_too_old','message':'Python %d.%d.%d at %s is too old to run the servetune "
    "agent (3.6+; servetune itself needs 3.11+)'%(v[0],v[1],v[2],sys.executable),'detail':''}})"
    "+'\\n'),sys.stdout.flush(),sys.exit(1));"
    "exec(compile(R['code'],'servetune_agent','exec'),"
    "{'__name__':'servetune_agent','REQUEST':R})"
)
"""The one-line program run as ``<python> -I -c BOOTSTRAP`` on the remote (it holds no user
value). It reads one JSON request line from stdin and execs the agent source it carries; an
interpreter older than 3.6 gets a ``python_too_old`` reply without compiling the agent. Python 2
never gets this far: it refuses ``-I`` ("Unknown option: -I", exit 2, no reply line), which the
manager must read as python_too_old too."""


def agent_source() -> str:
    """This module's own source text (what BOOTSTRAP execs on the remote), read from the
    installed package with importlib.resources. Manager side only."""
    from importlib import resources

    return resources.files("servetune.remote").joinpath("agent.py").read_text(encoding="utf-8")


def request_line(action: str, params: Dict[str, Any]) -> bytes:
    """The JSON request line for ``action`` (one line, UTF-8, ending with ``\\n``) to write first
    on the agent's stdin. ``params`` must be JSON-serialisable (TypeError otherwise)."""
    request = {"code": agent_source(), "action": action, "params": params}
    return (json.dumps(request, separators=(",", ":")) + "\n").encode("utf-8")


def parse_reply(stdout: str) -> Dict[str, Any]:
    """The agent's reply: the dict of the last ``SERVETUNE-AGENT {json}`` line of ``stdout``,
    ``{"ok": True, "result": {...}}`` or ``{"ok": False, "error": {kind, message, detail}}``.

    Raises ValueError when there is no such line or it is not a well-formed reply (the agent did
    not run: no python, a crash before replying, a shell printing instead).
    """
    for line in reversed(stdout.splitlines()):
        if not line.startswith(MARKER):
            continue
        try:
            reply = json.loads(line[len(MARKER) :])
        except ValueError as exc:
            raise ValueError("the agent's reply line is not JSON: %s" % exc) from None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise ValueError("the agent's reply has no boolean 'ok': %r" % line[:200])
        if reply["ok"] and not isinstance(reply.get("result"), dict):
            raise ValueError("the agent's reply has ok=true but no 'result' object")
        if not reply["ok"]:
            error = reply.get("error")
            if not isinstance(error, dict) or not isinstance(error.get("kind"), str):
                raise ValueError("the agent's reply has ok=false but no 'error' with a 'kind'")
        return reply
    tail = stdout.strip().splitlines()[-3:]
    raise ValueError("no %r line in the agent's output (last lines: %r)" % (MARKER.strip(), tail))


# --------------------------------------------------------------------------------------------
# Everything below runs on the remote (Python 3.6+, stdlib only).


class AgentError(Exception):
    """A failure reported as ``{"ok": false, "error": {kind, message, detail}}``; ``kind`` is a
    Category value (remote/models.py)."""

    def __init__(
        self, kind: str, message: str, detail: str = "", found: Optional[Dict[str, str]] = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.detail = detail
        self.found = found or {}


_PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _os_error(exc: OSError, doing: str, default_kind: str = "unknown") -> AgentError:
    """An AgentError for ``exc`` raised while ``doing`` (e.g. "creating /x"): permission_denied
    for EACCES/EPERM/EROFS/ENOTDIR (a part of the path is a file), disk_full for ENOSPC/EDQUOT, ``default_kind`` otherwise."""
    if exc.errno in _PERMISSION_ERRNOS:
        kind = "permission_denied"
    elif exc.errno in _DISK_FULL_ERRNOS:
        kind = "disk_full"
    else:
        kind = default_kind
    name = errno.errorcode.get(exc.errno or 0, "?")
    where = " (%s)" % exc.filename if exc.filename else ""
    message = "%s failed: %s%s [%s]" % (doing, exc.strerror or exc, where, name)
    return AgentError(kind, message, "")


def _param(params: Dict[str, Any], name: str, kind: Any, optional: bool = False) -> Any:
    """``params[name]`` checked against ``kind``; AgentError(unknown) naming the field if not."""
    if name not in params or params[name] is None:
        if optional:
            return None
        raise AgentError("unknown", "missing parameter %r" % name)
    value = params[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        # the type only, never the value: a password sent with the wrong type stays out of it
        raise AgentError(
            "unknown",
            "parameter %r must be %s, not %s"
            % (name, getattr(kind, "__name__", kind), type(value).__name__),
        )
    return value


def _number(params: Dict[str, Any], name: str, default: float) -> float:
    """``params[name]`` as a float >= 0 (``default`` when absent or null)."""
    value = _param(params, name, float, optional=True)
    if value is None:
        return default
    if value != value or value in (float("inf"), float("-inf")):
        raise AgentError("unknown", "parameter %r must be a finite number, got %r" % (name, value))
    if value < 0:
        raise AgentError("unknown", "parameter %r must be >= 0, got %r" % (name, value))
    return float(value)


def _path(params: Dict[str, Any], name: str) -> str:
    """An absolute path from ``params[name]`` (``~`` expanded by python, never by a shell)."""
    raw = _param(params, name, str)
    if not raw or "\x00" in raw or "\n" in raw:
        raise AgentError("unknown", "parameter %r is not a usable path: %r" % (name, raw))
    path = os.path.expanduser(str(raw))
    if not os.path.isabs(path):
        raise AgentError("unknown", "parameter %r must be absolute or under ~/: %r" % (name, raw))
    return os.path.normpath(path)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _kill_group(proc: "subprocess.Popen[Any]") -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _run(
    argv: List[str],
    timeout_s: float,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
) -> Tuple[int, str]:
    """Run ``argv`` (stdin closed, stderr merged into stdout) in its own process group;
    (returncode, output). On timeout the group is killed and returncode is 124."""
    proc = subprocess.Popen(  # noqa: S603 (argv list, no shell)
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out = proc.stdout.read() if proc.stdout else b""
        text = out.decode("utf-8", "replace")
        return 124, text + "\n(killed after %.0f s)" % timeout_s
    return proc.returncode, out.decode("utf-8", "replace")


def _existing_parent(path: str) -> str:
    """``path`` or its nearest existing ancestor."""
    current = path
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _elf_interpreter(executable: str) -> str:
    """The PT_INTERP path of an ELF binary ('' when it cannot be read)."""
    try:
        with open(executable, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF":
                return ""
            is64 = head[4] == 2
            little = head[5] == 1

            def num(data: bytes) -> int:
                return int.from_bytes(data, "little" if little else "big")

            if is64:
                phoff, phentsize, phnum = num(head[32:40]), num(head[54:56]), num(head[56:58])
            else:
                phoff, phentsize, phnum = num(head[28:32]), num(head[42:44]), num(head[44:46])
            for i in range(min(phnum, 256)):
                f.seek(phoff + i * phentsize)
                ph = f.read(phentsize)
                if num(ph[0:4]) != 3:  # PT_INTERP
                    continue
                if is64:
                    offset, size = num(ph[8:16]), num(ph[32:40])
                else:
                    offset, size = num(ph[4:8]), num(ph[16:20])
                f.seek(offset)
                return f.read(min(size, 4096)).rstrip(b"\x00").decode("utf-8", "replace")
    except (OSError, ValueError, IndexError):
        return ""
    return ""


def _libc() -> Tuple[str, str]:
    """('glibc'|'musl'|'', version|'') of the running interpreter: glibc's own answer
    (confstr) first, platform.libc_ver() next (on Python < 3.8 it reads the symbols the binary
    was linked against, a lower bound), then the ELF interpreter and ``ldd --version`` for musl."""
    try:
        confstr = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        confstr = ""
    if confstr.startswith("glibc "):
        return "glibc", confstr.split(" ", 1)[1]
    try:
        name, version = platform.libc_ver()
    except (OSError, ValueError):
        name, version = "", ""
    if name == "glibc" and version:
        return "glibc", version
    interpreter = _elf_interpreter(os.path.realpath(sys.executable))
    ldd = shutil.which("ldd")
    ldd_text = ""
    if ldd:
        try:
            _, ldd_text = _run([ldd, "--version"], 10)
        except OSError:
            ldd_text = ""
    if "musl" in interpreter or "musl" in ldd_text.lower():
        version = ""
        for line in ldd_text.splitlines():
            if line.lower().startswith("version "):
                version = line.split(None, 1)[1].strip()
        return "musl", version
    if "GLIBC" in ldd_text or "GNU libc" in ldd_text:
        first = ldd_text.splitlines()[0] if ldd_text else ""
        return "glibc", first.rsplit(" ", 1)[-1] if first else ""
    return "", ""


def probe(params: Dict[str, Any]) -> Dict[str, Any]:
    """Facts about this host (RemoteFacts fields); python_too_old below ``min_python``."""
    min_python = tuple(params.get("min_python") or [3, 11])
    here = tuple(sys.version_info[:3])
    version = "%d.%d.%d" % here
    if here[: len(min_python)] < min_python:
        needed = ".".join(str(part) for part in min_python)
        raise AgentError(
            "python_too_old",
            "Python %s at %s is older than %s, which servetune needs"
            % (version, sys.executable, needed),
            "",
            {"found_version": version, "min_version": needed, "python": sys.executable},
        )
    install_dir = _path(params, "install_dir")
    parent = _existing_parent(install_dir)
    writable = os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)
    try:
        free_gib = shutil.disk_usage(parent).free / GIB
    except OSError:
        free_gib = 0.0
    libc, libc_version = _libc()
    facts = {
        "hostname": socket.gethostname(),
        "python_executable": os.path.abspath(sys.executable),
        "python_version": version,
        "implementation": sys.implementation.name,
        "arch": platform.machine(),
        "libc": libc,
        "libc_version": libc_version,
        "install_dir": install_dir,
        "install_dir_writable": bool(writable),
        "free_disk_gib": round(free_gib, 3),
        "has_rsync": shutil.which("rsync") is not None,
        "has_tar": shutil.which("tar") is not None,
        "index_reachable": None,
        "index_error": None,
    }
    index_url = _param(params, "index_url", str, optional=True)
    if index_url:
        timeout_s = _number(params, "index_timeout_s", 5)
        facts["index_reachable"], facts["index_error"] = _probe_index(index_url, timeout_s)
    return facts


def _probe_index(index_url: str, timeout_s: float) -> Tuple[bool, Optional[str]]:
    import urllib.error
    import urllib.request

    url, headers = _without_credentials(index_url.rstrip("/") + "/pip/")
    headers["User-Agent"] = "servetune-agent"
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            answer.read(1024)
            return True, None
    except urllib.error.HTTPError as exc:
        return False, "GET %s answered HTTP %s" % (url, exc.code)
    except Exception as exc:  # URLError, timeout, ssl errors: all mean "not reachable"
        reason = getattr(exc, "reason", exc)
        return False, "GET %s failed: %s" % (url, reason)


def _without_credentials(url: str) -> Tuple[str, Dict[str, str]]:
    """``url`` without its ``user:password@`` (urllib would read them as the host name) and the
    HTTP Basic header that carries them instead; messages name the URL without them."""
    import base64
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, {}
    host = parts.hostname or ""
    if ":" in host:
        host = "[%s]" % host
    if parts.port is not None:
        host = "%s:%d" % (host, parts.port)
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(("%s:%s" % (user, password)).encode("utf-8")).decode("ascii")
    bare = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, {"Authorization": "Basic " + token}


_URL_CREDENTIALS = re.compile(r"(://[^/@\s:]*:)[^@\s/]+@")
"""``user:password@`` in a URL: the password is masked in what the install logs."""


_SYSTEM_TREES = (
    "bin",
    "boot",
    "dev",
    "etc",
    "lib",
    "lib32",
    "lib64",
    "libx32",
    "proc",
    "run",
    "sbin",
    "sys",
    "usr",
)
"""Top-level directories of the operating system: no install_dir resolves into them (a link
to /etc, /usr/local/bin, …)."""
_OURS = (".servetune-install", "worker.json", "installed.json", "incoming")
"""What an install_dir servetune prepared before holds (the first is written by prepare)."""


def _check_own_dir(install_dir: str, name: Optional[str]) -> None:
    """An existing install_dir must be servetune's to take over: where it really leads is no
    system tree; it is this user's and not writable by others (a shared directory such as /tmp);
    and it is empty or an install dir servetune prepared, of this slot (``name``; worker.json
    says whose). AgentError permission_denied naming it and why."""
    real = os.path.realpath(install_dir)
    parts = [p for p in real.split("/") if p]
    why = ""
    if not parts or len(parts) == 1 or parts[0] in _SYSTEM_TREES:
        why = "it is (or leads to) %s, a system directory" % real
    try:
        st = os.stat(real)
    except OSError:
        st = None  # made by prepare (errors are said there)
    if not why and st is not None and stat.S_ISDIR(st.st_mode):
        if st.st_uid != os.getuid():
            why = "it belongs to another user (uid %d)" % st.st_uid
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            why = "others may write to it (mode %o): it is a shared directory" % (
                st.st_mode & 0o7777
            )
        else:
            try:
                entries = os.listdir(real)
            except OSError:
                entries = []
            owner = _config_name(os.path.join(real, "worker.json"))
            if name and owner is not None and owner != name:
                why = "it holds the worker of slot %s; give each slot its own" % owner
            elif entries and not any(e in entries for e in _OURS):
                why = "it is not empty and servetune did not prepare it (%d entries)" % len(entries)
    if why:
        raise AgentError(
            "permission_denied",
            "%s is not a directory of servetune's own: %s" % (install_dir, why),
            "",
        )


def prepare(params: Dict[str, Any]) -> Dict[str, Any]:
    """Make install_dir and its data, logs, ssh, incoming folders (mode 700) and prove that a
    file can be written there; disk_full when less than ``min_free_gib`` is free."""
    install_dir = _path(params, "install_dir")
    min_free_gib = _number(params, "min_free_gib", 0)
    _check_own_dir(install_dir, _param(params, "name", str, optional=True))
    for sub in ("", "data", "logs", "ssh", "incoming"):
        path = os.path.join(install_dir, sub) if sub else install_dir
        try:
            if not os.path.isdir(path):
                os.makedirs(path, mode=0o700)
                os.chmod(path, 0o700)  # made here: ours (what existed keeps its mode)
        except OSError as exc:
            # EEXIST: a file where the directory goes (the suggestion says so)
            kind = "permission_denied" if exc.errno == errno.EEXIST else "unknown"
            raise _os_error(exc, "creating %s" % path, kind) from None
    # says "servetune prepared this directory" to the next deploy (_check_own_dir)
    with contextlib.suppress(OSError):
        open(os.path.join(install_dir, ".servetune-install"), "a").close()
    free_gib = shutil.disk_usage(install_dir).free / GIB
    if free_gib < min_free_gib:
        raise AgentError(
            "disk_full",
            "only %.2f GiB free at %s, %.2f GiB needed" % (free_gib, install_dir, min_free_gib),
            "",
        )
    probe_path = os.path.join(install_dir, "incoming", ".servetune-write-test")
    try:
        with open(probe_path, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise _os_error(exc, "writing %s" % probe_path) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe_path)
    return {"install_dir": install_dir, "free_disk_gib": round(free_gib, 3)}


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _member_target(dest: str, name: str) -> str:
    """The absolute path where member ``name`` goes; AgentError for an absolute or ``..`` name."""
    if not name or name.startswith("/") or "\x00" in name:
        raise AgentError("unknown", "refused tar member %r: absolute path" % name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AgentError("unknown", "refused tar member %r: it climbs out with '..'" % name)
    return os.path.join(dest, *parts) if parts else dest


def untar(params: Dict[str, Any]) -> Dict[str, Any]:
    """Extract the tar stream that follows the request line on stdin into ``dest``; refuses
    absolute or ``..`` members, links pointing outside dest, and device/fifo members."""
    dest = _path(params, "dest")
    try:
        os.makedirs(dest, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise _os_error(exc, "creating %s" % dest) from None
    root = os.path.realpath(dest)
    files = 0
    try:
        with tarfile.open(fileobj=sys.stdin.buffer, mode="r|*") as archive:
            for member in archive:
                target = _member_target(root, member.name)
                parent = os.path.realpath(os.path.dirname(target))
                if not _inside(root, parent):
                    raise AgentError(
                        "unknown", "refused tar member %r: it goes through a link" % member.name
                    )
                if member.isdir():
                    os.makedirs(target, exist_ok=True)
                    os.chmod(target, (member.mode & 0o777) | 0o700)
                elif member.isfile():
                    source = archive.extractfile(member)
                    _replace_path(target)
                    with open(target, "wb") as out:
                        if source is not None:
                            shutil.copyfileobj(source, out, 1024 * 1024)
                    os.chmod(target, member.mode & 0o777)
                    files += 1
                elif member.issym():
                    link = member.linkname
                    joined = os.path.join(os.path.dirname(target), link)
                    # as written, and as it resolves through links already extracted (sub/up ->
                    # .. then esc -> sub/up/.. stays inside when read, yet leads out)
                    resolved = os.path.normpath(joined)
                    if (
                        link.startswith("/")
                        or not _inside(root, resolved)
                        or not _inside(root, os.path.realpath(joined))
                    ):
                        raise AgentError(
                            "unknown",
                            "refused tar member %r: symlink to %r points outside %s"
                            % (member.name, link, dest),
                        )
                    _replace_path(target)
                    os.symlink(link, target)
                elif member.islnk():
                    try:
                        source_path = _member_target(root, member.linkname)
                    except AgentError as exc:
                        raise AgentError(
                            "unknown", "refused tar member %r (hard link): %s" % (member.name, exc)
                        ) from None
                    if not _inside(root, os.path.realpath(source_path)):
                        raise AgentError(
                            "unknown",
                            "refused tar member %r: hard link to %r outside %s"
                            % (member.name, member.linkname, dest),
                        )
                    _replace_path(target)
                    os.link(source_path, target)
                    files += 1
                else:
                    raise AgentError(
                        "unknown", "refused tar member %r: not a file, folder or link" % member.name
                    )
    except tarfile.TarError as exc:
        raise AgentError("unknown", "the tar stream is unreadable: %s" % exc) from None
    except OSError as exc:
        raise _os_error(exc, "extracting into %s" % dest) from None
    return {"files": files}


def _replace_path(target: str) -> None:
    if os.path.islink(target) or (os.path.lexists(target) and not os.path.isdir(target)):
        os.unlink(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)


def _install_fail(output: str, what: str) -> AgentError:
    if "No space left" in output or "Disk quota exceeded" in output:
        return AgentError("disk_full", "%s: no space left on device" % what, _tail(output))
    return AgentError("install_failed", what, _tail(output))


def install(params: Dict[str, Any]) -> Dict[str, Any]:
    """Make install_dir/venv with uv and install the servetune wheel in it (online from
    ``index_url`` or offline from ``wheelhouse``); {version, seconds}."""
    started = time.monotonic()
    install_dir = _path(params, "install_dir")
    python = _param(params, "python", str)
    wheel = _path(params, "wheel")
    uv = _path(params, "uv")
    constraints = _path(params, "constraints") if params.get("constraints") else None
    wheelhouse = _path(params, "wheelhouse") if params.get("wheelhouse") else None
    index_url = _param(params, "index_url", str, optional=True)
    timeout_s = _number(params, "timeout_s", 1800)
    try:
        os.makedirs(os.path.join(install_dir, "logs"), mode=0o700, exist_ok=True)
    except OSError as exc:
        raise _os_error(exc, "creating %s" % install_dir) from None
    if uv.endswith(".whl"):
        uv = _uv_from_wheel(uv, os.path.join(install_dir, "bin"))
    venv = os.path.join(install_dir, "venv")
    venv_python = os.path.join(venv, "bin", "python")
    env = dict(os.environ)
    _uv_env(env, install_dir)
    log_path = os.path.join(install_dir, "logs", "install.log")
    log = []  # type: List[str]

    def step(argv: List[str], what: str) -> None:
        remaining = timeout_s - (time.monotonic() - started)
        code, output = _run(argv, max(remaining, 1.0), env=env, cwd=install_dir)
        output = _URL_CREDENTIALS.sub(r"\1***@", output)
        log.append("$ " + " ".join(argv) + "\n" + output)
        _write_log(log_path, log)
        if code != 0:
            raise _install_fail(output, "%s failed (exit %d)" % (what, code))

    try:
        step([uv, "venv", "--allow-existing", venv, "--python", python], "uv venv")
        argv = [uv, "pip", "install", "--python", venv_python]
        if wheelhouse:
            argv += ["--offline", "--no-index", "--find-links", wheelhouse]
        elif index_url:
            # in the environment, not on the command line: a token in the URL stays out of ps
            env["UV_DEFAULT_INDEX"] = index_url
        if constraints:
            argv += ["-c", constraints]
        step([*argv, wheel], "uv pip install")
    except OSError as exc:
        raise _os_error(exc, "installing into %s" % venv, "install_failed") from None
    return {
        "version": _installed_version(venv, install_dir),
        "seconds": round(time.monotonic() - started, 3),
    }


def _installed_version(venv: str, install_dir: str) -> str:
    """servetune's version as ``venv``'s python imports it (run in ``install_dir``);
    AgentError(module_not_found) with the output's tail when it does not import."""
    venv_python = os.path.join(venv, "bin", "python")
    try:
        code, output = _run(
            [
                venv_python,
                "-c",
                "import importlib.metadata as m, servetune; print(m.version('servetune'))",
            ],
            120,
            cwd=install_dir,
        )
    except OSError as exc:
        raise _os_error(exc, "running %s" % venv_python, "install_failed") from None
    if code != 0:
        raise AgentError(
            "module_not_found",
            "servetune does not import in %s after the install" % venv,
            _tail(output),
        )
    lines = output.strip().splitlines()
    return lines[-1] if lines else ""


def _uv_env(env: Dict[str, str], install_dir: str) -> None:
    """Set in ``env`` what every uv run of the agent needs: no Python downloads, no uv config
    files of the host, no colour; uv's cache the host's own when it sets one (kept between
    deploys), else one in install_dir; the host's own CA store (uv's default is its bundled
    roots: hosts behind a TLS-inspecting proxy trust its CA there, as pip does), unless the
    host says otherwise."""
    env.update({"UV_PYTHON_DOWNLOADS": "never", "UV_NO_CONFIG": "1", "NO_COLOR": "1"})
    env.setdefault("UV_CACHE_DIR", os.path.join(install_dir, "cache", "uv"))
    env.setdefault("UV_NATIVE_TLS", "1")


def _write_log(path: str, parts: List[str]) -> None:
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(parts))


def _uv_from_wheel(wheel: str, bin_dir: str) -> str:
    """Extract the ``uv`` executable from a uv wheel into ``bin_dir``; its path."""
    import zipfile

    target = os.path.join(bin_dir, "uv")
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith(".data/scripts/uv")]
            if not names:
                raise AgentError("install_failed", "%s holds no uv executable" % wheel)
            os.makedirs(bin_dir, mode=0o700, exist_ok=True)
            tmp = target + ".tmp"
            with zf.open(names[0]) as source, open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, 1024 * 1024)
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
    except zipfile.BadZipFile as exc:
        raise AgentError("install_failed", "%s is not a wheel: %s" % (wheel, exc)) from None
    except OSError as exc:
        raise _os_error(exc, "extracting uv from %s" % wheel, "install_failed") from None
    return target


# ---- the venv copy: the last resort of an offline host (deploy.py, remote/venvcopy.py) --------

_TEXT_LIMIT = 1024 * 1024
"""bin/ files larger than this are never rewritten as text (binaries such as uv)."""


def _regular_file(path: str) -> bool:
    """``path`` is a regular file itself (a symlink is not, whatever it points at)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _write_over(path: str, data: bytes) -> None:
    """Replace the regular file ``path`` with ``data`` (same mode) through a temporary file and
    os.replace, which never follows a symlink."""
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    tmp = "%s.servetune-%d.tmp" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _prefix_pattern(prefix: str) -> "Any":
    """The regex of ``prefix`` as a whole path: followed by '/', a quote, white space, ':' or
    the end (so /a/.venv never matches inside /a/.venv2)."""
    return re.compile(re.escape(prefix.rstrip("/").encode("utf-8")) + rb"(?=[/'\"\s:;]|$)")


def fix_venv(folder: str, old_prefix: str, new_prefix: str, python: str) -> Dict[str, Any]:
    """Make the venv copied into ``folder`` (made at ``old_prefix`` on the manager) work at
    ``new_prefix`` on this host with the interpreter ``python``, in place.

    - ``pyvenv.cfg``: ``home`` = the directory of ``python`` resolved; ``executable`` = it;
      ``command`` dropped; every other key (``version``, ``version_info``, …) kept.
    - ``bin/python``, ``bin/python3``, ``bin/python3.X`` (X from pyvenv.cfg's version, else
      this interpreter's): symlinks to ``python`` resolved.
    - every regular file in ``bin/`` whose first line is ``#!<old_prefix>/bin/python…`` gets
      ``#!<new_prefix>/bin/python…``; other text files there (activate scripts, pip's
      ``#!/bin/sh`` trampolines) get every whole ``old_prefix`` replaced by ``new_prefix``.

    Symlinks are never followed or rewritten (only the python links are replaced), so nothing
    outside ``folder`` changes. Returns {scripts, texts, links, version}: the number of shebangs
    and text files rewritten, the python links made, X.Y. Raises AgentError(install_failed)
    naming the path when ``folder`` is not a venv (no regular pyvenv.cfg, no bin/ folder) or
    no script in bin/ names ``old_prefix``'s python (the old prefix is not where expected);
    OSError as the file system raises it.
    """
    folder = os.path.abspath(folder)
    old_prefix = old_prefix.rstrip("/")
    new_prefix = new_prefix.rstrip("/")
    cfg = os.path.join(folder, "pyvenv.cfg")
    bin_dir = os.path.join(folder, "bin")
    if not _regular_file(cfg):
        raise AgentError(
            "install_failed", "%s is not a venv: no pyvenv.cfg (a regular file) in it" % folder
        )
    if os.path.islink(bin_dir) or not os.path.isdir(bin_dir):
        raise AgentError("install_failed", "%s is not a venv: no bin/ folder in it" % folder)
    real_python = os.path.realpath(python)
    with open(cfg, "r", encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []  # type: List[str]
    version = ""
    for line in lines:
        key, sep, value = line.partition("=")
        name = key.strip().lower()
        if sep and name in ("version", "version_info") and not version:
            version = ".".join(value.strip().split(".")[:2])
        if sep and name == "home":
            kept.append("home = %s" % os.path.dirname(real_python))
        elif sep and name == "executable":
            kept.append("executable = %s" % real_python)
        elif sep and name == "command":
            continue  # how the manager made it: meaningless here
        else:
            kept.append(line)
    if not any(ln.partition("=")[0].strip().lower() == "home" for ln in kept):
        kept.insert(0, "home = %s" % os.path.dirname(real_python))
    _write_over(cfg, ("\n".join(kept) + "\n").encode("utf-8"))
    if not version:
        version = "%d.%d" % sys.version_info[:2]
    links = []
    for name in ("python", "python3", "python" + version):
        link = os.path.join(bin_dir, name)
        if os.path.lexists(link):
            if os.path.isdir(link) and not os.path.islink(link):
                raise AgentError("install_failed", "%s is a folder, not a python link" % link)
            os.unlink(link)
        os.symlink(real_python, link)
        links.append(link)
    old_python = (old_prefix + "/bin/python").encode("utf-8")
    old_whole = _prefix_pattern(old_prefix)
    new_bytes = new_prefix.encode("utf-8")
    scripts = texts = 0
    for name in sorted(os.listdir(bin_dir)):
        path = os.path.join(bin_dir, name)
        if path in links or not _regular_file(path):
            continue  # symlinks (and what they point at) are left alone
        with open(path, "rb") as f:
            head = f.read(_TEXT_LIMIT + 1)
        first, newline, rest = head.partition(b"\n")
        words = first[2:].strip().split()
        if first.startswith(b"#!") and words and words[0].startswith(old_python):
            if len(head) > _TEXT_LIMIT:
                with open(path, "rb") as f:
                    head = f.read()
                first, newline, rest = head.partition(b"\n")
            _write_over(path, old_whole.sub(lambda _: new_bytes, first, count=1) + newline + rest)
            scripts += 1
        elif len(head) <= _TEXT_LIMIT and b"\0" not in head and old_whole.search(head):
            _write_over(path, old_whole.sub(lambda _: new_bytes, head))
            texts += 1
    if scripts == 0:
        raise AgentError(
            "install_failed",
            "no script in %s names %s/bin/python: the copied venv was not made at %s"
            % (bin_dir, old_prefix, old_prefix),
        )
    return {"scripts": scripts, "texts": texts, "links": links, "version": version}


def drop_installed(site_packages: str, root: str, name: str) -> List[str]:
    """Remove distribution ``name`` (e.g. ``servetune``) from ``site_packages`` of the venv at
    ``root``, editable or not: every file its ``*.dist-info/RECORD`` lists (within ``root``;
    symlinks removed, never followed), its ``*.pth`` files and editable finders (``*<name>*.pth``,
    ``__editable__*<name>*``), and the dist-info folder. Returns the paths removed (sorted).
    OSError as the file system raises it."""
    import csv

    root = os.path.realpath(root)
    removed = []  # type: List[str]
    if not os.path.isdir(site_packages):
        return removed
    prefix = name.replace("-", "_").lower() + "-"
    for entry in sorted(os.listdir(site_packages)):
        path = os.path.join(site_packages, entry)
        lower = entry.lower()
        is_info = lower.startswith(prefix) and lower.endswith(".dist-info")
        if is_info and os.path.isdir(path) and not os.path.islink(path):
            record = os.path.join(path, "RECORD")
            rows = []  # type: List[List[str]]
            if _regular_file(record):
                with open(record, "r", encoding="utf-8", newline="") as f:
                    rows = list(csv.reader(f))
            for row in rows:
                if not row or not row[0]:
                    continue
                target = os.path.normpath(os.path.join(site_packages, row[0]))
                parent = os.path.realpath(os.path.dirname(target))
                if not _inside(root, parent) or not os.path.lexists(target):
                    continue
                if os.path.isdir(target) and not os.path.islink(target):
                    continue
                os.unlink(target)
                removed.append(target)
            shutil.rmtree(path)
            removed.append(path)
        elif (lower.endswith(".pth") and name.lower() in lower) or (
            lower.startswith("__editable__") and name.lower() in lower
        ):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
    return sorted(set(removed))


def _installer(venv: str, install_dir: str, env: Dict[str, str]) -> Tuple[str, List[str]]:
    """How to install a wheel into ``venv`` with no index and no dependencies: its own uv when
    it has one (servetune's manager venv holds uv; ~0.1 s), else its own pip (``python -I -m
    pip``, made by ``python -m venv``; ~1.5 s). ("uv"|"pip", argv without the wheel); ``env``
    is adjusted for it. AgentError(install_failed) when it has neither."""
    venv_python = os.path.join(venv, "bin", "python")
    uv = os.path.join(venv, "bin", "uv")
    if _regular_file(uv) and os.access(uv, os.X_OK):
        _uv_env(env, install_dir)
        argv = [uv, "pip", "install", "--python", venv_python, "--no-deps", "--offline"]
        return "uv", [*argv, "--no-index"]
    code, _ = _run([venv_python, "-I", "-c", "import pip"], 60)
    if code == 0:
        for key in [k for k in env if k.startswith("PIP_")]:
            del env[key]  # the host's pip settings (--user, an index, …) do not apply
        env["PIP_CONFIG_FILE"] = os.devnull
        return "pip", [
            venv_python,
            "-I",
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--no-input",
            "--disable-pip-version-check",
        ]
    raise AgentError(
        "install_failed",
        "the copied venv %s has neither uv nor pip to install servetune's wheel with" % venv,
    )


def adopt_venv(params: Dict[str, Any]) -> Dict[str, Any]:
    """Make the manager's venv, copied to ``staging`` (under install_dir/incoming), the
    install's venv (install_dir/venv, where start_worker finds ``venv/bin/servetune``).

    ``staging`` is fixed for its new place (``fix_venv``: pyvenv.cfg, the python links to
    ``python``, shebangs and activate scripts naming ``old_prefix``, the manager's
    ``sys.prefix``), servetune's own install (editable on a developer's manager) is removed
    from it, it replaces install_dir/venv (the old one is moved aside and deleted), then
    ``wheel`` (servetune's wheel) is installed into it with no index and no dependencies and
    ``import servetune`` is checked as by ``install``. {version, seconds, installer, removed,
    scripts}. AgentError: install_failed (not a venv, the old prefix not found, the wheel
    refused), disk_full, module_not_found, permission_denied.
    """
    started = time.monotonic()
    install_dir = _path(params, "install_dir")
    staging = _path(params, "staging")
    old_prefix = _path(params, "old_prefix")
    python = _path(params, "python")
    wheel = _path(params, "wheel")
    timeout_s = _number(params, "timeout_s", 1800)
    incoming = os.path.realpath(os.path.join(install_dir, "incoming"))
    if not _inside(incoming, os.path.realpath(staging)) or os.path.islink(staging):
        raise AgentError(
            "install_failed", "the copied venv %s is not under %s" % (staging, incoming)
        )
    if not os.path.isdir(staging):
        raise AgentError("install_failed", "the copied venv %s is missing" % staging)
    venv = os.path.join(install_dir, "venv")
    log_path = os.path.join(install_dir, "logs", "install.log")
    log = ["venv copied from the manager's %s to %s" % (old_prefix, staging)]
    try:
        os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
        fixed = fix_venv(staging, old_prefix, venv, python)
        site = os.path.join(staging, "lib", "python" + fixed["version"], "site-packages")
        removed = drop_installed(site, staging, "servetune")
        log.append("fixed %(scripts)d scripts, %(texts)d text files; python links" % fixed)
        log.append("removed the manager's servetune install: %s" % ", ".join(removed))
        _write_log(log_path, log)
        aside = "%s.old-%d" % (venv, os.getpid())
        if os.path.lexists(venv):
            os.rename(venv, aside)
        os.rename(staging, venv)
        shutil.rmtree(aside, ignore_errors=True)
    except OSError as exc:
        raise _os_error(
            exc, "fixing the copied venv %s and moving it to %s" % (staging, venv), "install_failed"
        ) from None
    env = dict(os.environ)
    try:
        installer, argv = _installer(venv, install_dir, env)
        remaining = max(timeout_s - (time.monotonic() - started), 1.0)
        code, output = _run([*argv, wheel], remaining, env=env, cwd=install_dir)
    except OSError as exc:
        raise _os_error(exc, "installing %s into %s" % (wheel, venv), "install_failed") from None
    log.append("$ " + " ".join([*argv, wheel]) + "\n" + output)
    _write_log(log_path, log)
    if code != 0:
        raise _install_fail(
            output, "%s install of servetune's wheel failed (exit %d)" % (installer, code)
        )
    return {
        "version": _installed_version(venv, install_dir),
        "seconds": round(time.monotonic() - started, 3),
        "installer": installer,
        "removed": len(removed),
        "scripts": fixed["scripts"],
    }


def keygen(params: Dict[str, Any]) -> Dict[str, Any]:
    """The worker's tunnel key at install_dir/ssh/id_ed25519, made when missing (reused
    otherwise): {public_key: the one-line public key, private_key: its path}."""
    install_dir = _path(params, "install_dir")
    ssh_keygen = shutil.which("ssh-keygen")
    if ssh_keygen is None or shutil.which("ssh") is None:
        raise AgentError(
            "tunnel_failed",
            "no %s on this host's PATH: the Redis tunnel needs the OpenSSH client"
            % ("ssh-keygen" if ssh_keygen is None else "ssh"),
        )
    ssh_dir = os.path.join(install_dir, "ssh")
    key = os.path.join(ssh_dir, "id_ed25519")
    try:
        os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
        if not os.path.exists(key):
            comment = "servetune-worker@%s" % socket.gethostname()
            argv = [ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key]
            code, output = _run(argv, 60)
            if code != 0:
                raise AgentError(
                    "tunnel_failed", "ssh-keygen failed (exit %d)" % code, _tail(output)
                )
        code, public = _run([ssh_keygen, "-y", "-f", key], 60)
        if code != 0:
            raise AgentError("tunnel_failed", "ssh-keygen -y failed on %s" % key, _tail(public))
    except OSError as exc:
        raise _os_error(exc, "making the key %s" % key) from None
    return {"public_key": public.strip().splitlines()[-1], "private_key": key}


def write_file(params: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``content`` (text) to ``path`` atomically, created with ``mode`` (permission bits
    0..0o777, e.g. 0o600: no setuid, setgid or sticky bit; anything else is refused)."""
    path = _path(params, "path")
    content = _param(params, "content", str)
    mode = _param(params, "mode", int)
    if not 0 <= mode <= 0o777:
        raise AgentError(
            "unknown",
            "parameter 'mode' must be permission bits 0..0o777 (e.g. 0o600), got %s" % oct(mode),
        )
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o7777)
        try:
            os.fchmod(fd, mode & 0o7777)  # the umask does not apply
            with os.fdopen(fd, "wb") as f:
                f.write(content.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise _os_error(exc, "writing %s" % path) from None
    return {"path": path}


def _redis_command(sock: socket.socket, *args: str) -> str:
    payload = "*%d\r\n" % len(args)
    for arg in args:
        data = arg.encode("utf-8")
        payload += "$%d\r\n" % len(data) + arg + "\r\n"
    sock.sendall(payload.encode("utf-8"))
    buffer = b""
    while b"\r\n" not in buffer:
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError(errno.ECONNRESET, "the connection closed before Redis answered")
        buffer += chunk
    return buffer.split(b"\r\n", 1)[0].decode("utf-8", "replace")


def _redis_ping(host: str, port: int, password: Optional[str], timeout_s: float) -> str:
    """'PONG' from Redis at host:port (AUTH first when ``password``); raises OSError when it
    cannot be reached and AgentError(redis_unreachable) when it answers with an error."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        if password:
            answer = _redis_command(sock, "AUTH", password)
            if not answer.startswith("+"):
                raise AgentError(
                    "redis_unreachable",
                    "Redis at %s:%d refused the password: %s" % (host, port, answer),
                )
        answer = _redis_command(sock, "PING")
    if answer != "+PONG":
        raise AgentError(
            "redis_unreachable", "Redis at %s:%d answered PING with %s" % (host, port, answer)
        )
    return "PONG"


def redis_probe(params: Dict[str, Any]) -> Dict[str, Any]:
    """Connect to Redis at host:port from this host, AUTH if ``password``, PING: {reply}."""
    host = _param(params, "host", str)
    port = _param(params, "port", int)
    password = _param(params, "password", str, optional=True)
    timeout_s = _number(params, "timeout_s", 5)
    try:
        return {"reply": _redis_ping(host, port, password, timeout_s)}
    except socket.timeout:
        raise AgentError(
            "redis_unreachable",
            "Redis at %s:%d cannot be reached from %s: timed out after %.0f s"
            % (host, port, socket.gethostname(), timeout_s),
        ) from None
    except OSError as exc:
        text = exc.strerror or str(exc)
        raise AgentError(
            "redis_unreachable",
            "Redis at %s:%d cannot be reached from %s: %s"
            % (host, port, socket.gethostname(), text),
        ) from None


def tunnel_check(params: Dict[str, Any]) -> Dict[str, Any]:
    """Start ``argv`` (the ssh -N -L of remote/tunnel.py), wait until Redis answers PING at
    127.0.0.1:bind_port, stop it: {seconds}; tunnel_failed with ssh's stderr tail otherwise."""
    argv = _param(params, "argv", list)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise AgentError("unknown", "parameter 'argv' must be a non-empty list of strings")
    bind_port = _param(params, "bind_port", int)
    password = _param(params, "password", str, optional=True)
    timeout_s = _number(params, "timeout_s", 20)
    started = time.monotonic()
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(  # noqa: S603 (argv list, no shell)
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        except OSError as exc:
            raise AgentError(
                "tunnel_failed", "could not start %s: %s" % (argv[0], exc.strerror or exc)
            ) from None

        def stderr_tail() -> str:
            err.seek(0)
            return _tail(err.read().decode("utf-8", "replace"))

        last = ""
        try:
            while time.monotonic() - started < timeout_s:
                if proc.poll() is not None:
                    raise AgentError(
                        "tunnel_failed",
                        "the tunnel exited (status %d) before Redis answered at 127.0.0.1:%d"
                        % (proc.returncode, bind_port),
                        stderr_tail(),
                    )
                try:
                    _redis_ping("127.0.0.1", bind_port, password, 2.0)
                    return {"seconds": round(time.monotonic() - started, 3)}
                except (OSError, AgentError) as exc:
                    last = str(exc)
                time.sleep(0.2)
            raise AgentError(
                "tunnel_failed",
                "Redis did not answer through the tunnel at 127.0.0.1:%d within %.0f s (%s)"
                % (bind_port, timeout_s, last),
                stderr_tail(),
            )
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(3)
                except (OSError, subprocess.TimeoutExpired):
                    _kill_group(proc)


def _worker_exe(install_dir: str) -> str:
    return os.path.join(install_dir, "venv", "bin", "servetune")


def _cmdline(pid: int) -> List[str]:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def _is_worker(pid: int, exe: str) -> bool:
    """pid runs ``exe worker ...`` (a zombie's cmdline is empty: it is not running)."""
    args = _cmdline(pid)
    return "worker" in args and any(arg == exe for arg in args)


def _worker_pids(install_dir: str) -> List[int]:
    """This install's running worker processes: the pidfile's pid and a /proc scan."""
    exe = _worker_exe(install_dir)
    me = os.getpid()
    pids = set()
    pidfile = os.path.join(install_dir, "worker.pid")
    with contextlib.suppress(OSError, ValueError):
        with open(pidfile, "r") as f:
            pid = int(f.read().strip() or "0")
        if pid > 0 and pid != me and _is_worker(pid, exe):
            pids.add(pid)
    try:
        entries = os.listdir("/proc")
    except OSError:
        entries = []
    for entry in entries:
        if entry.isdigit() and int(entry) != me and _is_worker(int(entry), exe):
            pids.add(int(entry))
    return sorted(pids)


def status(params: Dict[str, Any]) -> Dict[str, Any]:
    """{running, pids}: this install's worker processes (pidfile + /proc scan)."""
    install_dir = _path(params, "install_dir")
    pids = _worker_pids(install_dir)
    return {"running": bool(pids), "pids": pids}


def _stop(install_dir: str, grace_s: float) -> List[int]:
    pids = _worker_pids(install_dir)
    groups = set()
    for pid in pids:
        try:
            group = os.getpgid(pid)
        except OSError:
            continue
        # a worker start_worker started leads its own group (its engines are in it); one started
        # some other way may share a group with a shell or with us: then only the process itself
        groups.add(pid if group == pid else -pid)
    # SIGTERM to the workers only, not their groups: a worker stops its own engines and hands
    # its running trials back to the manager, through its Redis tunnel, whose ssh is in its
    # group (signalling the group would cut the tunnel before the hand-back)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _worker_pids(install_dir):
        time.sleep(0.1)
    # SIGKILL goes to the groups even when the workers are gone: what they started and left
    # behind (an engine ignoring SIGTERM, the tunnel's ssh) is in their group
    for group in groups:
        with contextlib.suppress(OSError):
            if group > 0:
                os.killpg(group, signal.SIGKILL)
            else:
                os.kill(-group, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and _worker_pids(install_dir):
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(install_dir, "worker.pid"))
    return pids


def _config_name(path: str) -> Optional[str]:
    """The worker name in the worker config ``path``; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            name = json.loads(f.read(65536).decode("utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def stop_worker(params: Dict[str, Any]) -> Dict[str, Any]:
    """SIGTERM this install's workers (each hands its running trials back, through its tunnel,
    and stops its engines), wait up to ``grace_s`` (default 10) for them to exit, then SIGKILL
    their process groups (leftovers included): {stopped: [pids]}.

    With ``name`` (a slot's name): when the install's worker.json names another slot's worker
    (two slots given one host and install directory), nothing is stopped:
    {stopped: [], owner: <that name>}."""
    install_dir = _path(params, "install_dir")
    grace_s = _number(params, "grace_s", 10)
    name = _param(params, "name", str, optional=True)
    if name:
        owner = _config_name(os.path.join(install_dir, "worker.json"))
        if owner is not None and owner != name:
            return {"stopped": [], "owner": owner}
    return {"stopped": _stop(install_dir, grace_s)}


def start_worker(params: Dict[str, Any]) -> Dict[str, Any]:
    """Stop leftovers, then start ``venv/bin/servetune worker --config config_path`` detached
    from the ssh session (own session, no stdio on the channel): {pid}. worker_start_failed
    with the log tail when it exits within ``wait_s`` (default 3 s)."""
    install_dir = _path(params, "install_dir")
    config_path = _path(params, "config_path")
    wait_s = _number(params, "wait_s", 3)
    exe = _worker_exe(install_dir)
    if not os.access(exe, os.X_OK):
        raise AgentError(
            "worker_start_failed",
            "%s is missing or not executable: servetune is not installed" % exe,
        )
    _stop(install_dir, _number(params, "grace_s", 10))
    log_path = os.path.join(install_dir, "logs", "worker.out")
    pidfile = os.path.join(install_dir, "worker.pid")
    try:
        os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(  # noqa: S603 (argv list, no shell)
                [exe, "worker", "--config", config_path],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=install_dir,
                close_fds=True,
                start_new_session=True,
            )
        write_file({"path": pidfile, "content": "%d\n" % proc.pid, "mode": 0o600})
    except OSError as exc:
        raise _os_error(exc, "starting %s" % exe, "worker_start_failed") from None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with contextlib.suppress(OSError):
                os.unlink(pidfile)
            try:
                with open(log_path, "rb") as f:
                    f.seek(max(0, os.path.getsize(log_path) - 16384))
                    tail = _tail(f.read().decode("utf-8", "replace"))
            except OSError:
                tail = ""
            raise AgentError(
                "worker_start_failed",
                "the worker exited at once (status %d); its log is %s"
                % (proc.returncode, log_path),
                tail,
            )
        time.sleep(0.1)
    return {"pid": proc.pid}


def read_file(params: Dict[str, Any]) -> Dict[str, Any]:
    """The last ``max_bytes`` (default 16384) of the text file ``path``: {text, exists, size}
    (exists false and text '' when there is no such file). Used for the worker's log tail and
    the install marker."""
    path = _path(params, "path")
    max_bytes = int(_number(params, "max_bytes", 16384))
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - max_bytes))
            data = f.read(max_bytes)
    except FileNotFoundError:
        return {"text": "", "exists": False, "size": 0}
    except OSError as exc:
        raise _os_error(exc, "reading %s" % path) from None
    return {"text": data.decode("utf-8", "replace"), "exists": True, "size": size}


ACTIONS = {
    "probe": probe,
    "prepare": prepare,
    "untar": untar,
    "install": install,
    "adopt_venv": adopt_venv,
    "keygen": keygen,
    "write_file": write_file,
    "redis_probe": redis_probe,
    "tunnel_check": tunnel_check,
    "start_worker": start_worker,
    "status": status,
    "stop_worker": stop_worker,
    "read_file": read_file,
}
"""Every action the agent answers: name → handler(params) → result dict."""


def main(request: Dict[str, Any]) -> int:
    """Run one request, write the reply line to stdout; the exit status (0 ok, 1 error)."""
    action = request.get("action")
    params = request.get("params") or {}
    try:
        handler = ACTIONS.get(action)  # type: ignore[arg-type]
        if handler is None:
            raise AgentError("unknown", "unknown agent action %r" % (action,))
        if not isinstance(params, dict):
            raise AgentError("unknown", "the request's params must be an object")
        reply = {"ok": True, "result": handler(params)}  # type: Dict[str, Any]
    except AgentError as exc:
        reply = {
            "ok": False,
            "error": {
                "kind": exc.kind,
                "message": exc.message,
                "detail": exc.detail,
                "found": exc.found,
            },
        }
    except OSError as exc:
        error = _os_error(exc, "%s" % action)
        reply = {"ok": False, "error": {"kind": error.kind, "message": error.message, "detail": ""}}
    except Exception as exc:
        reply = {
            "ok": False,
            "error": {
                "kind": "unknown",
                "message": "the agent failed in %s: %s: %s" % (action, type(exc).__name__, exc),
                "detail": _tail(traceback.format_exc()),
            },
        }
    sys.stdout.write("\n" + MARKER + json.dumps(reply) + "\n")
    sys.stdout.flush()
    return 0 if reply["ok"] else 1


if __name__ == "servetune_agent":  # exec'd by BOOTSTRAP on the remote, never on import
    sys.exit(main(globals()["REQUEST"]))
