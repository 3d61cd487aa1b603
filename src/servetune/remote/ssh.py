"""The system ssh and rsync, driven as argv lists from asyncio subprocesses (worker slots).

A slot's ssh command is parsed with shlex against an allow-list, resolved with ``ssh -G``, and
run with a config file servetune generates (batch mode, its own known_hosts) so ProxyJump hops
get the same settings. Nothing the user typed ever reaches a shell on either host.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servetune.errors import DeployFailed
from servetune.remote import agent, diagnose
from servetune.remote.models import PYTHON_PATTERN, Category, CommandResult, check_remote_path
from servetune.settings import Settings

logger = logging.getLogger(__name__)

TIMEOUT_RETURNCODE = 124
"""The returncode of a command killed at its timeout (as coreutils' ``timeout``)."""

_KILL_DRAIN_S = 2.0
"""After a timeout kill, how long to wait for the pipes to close (a process that left the group
may still hold them); the output read so far is kept either way."""

_READ_CHUNK = 1 << 16

# -- running local commands ---------------------------------------------------------------------


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (started with start_new_session=True)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _feed(
    stream: asyncio.StreamWriter, head: bytes | None, tail: bytes | AsyncIterator[bytes] | None
) -> None:
    """Write ``head`` then ``tail`` to a child's stdin and close it; a child that stops reading
    (it exited) ends the feed quietly: its exit status tells what happened."""
    try:
        if head:
            stream.write(head)
            await stream.drain()
        if isinstance(tail, bytes | bytearray):
            stream.write(tail)
            await stream.drain()
        elif tail is not None:
            async for chunk in tail:
                stream.write(chunk)
                await stream.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        if tail is not None and not isinstance(tail, bytes | bytearray):
            aclose = getattr(tail, "aclose", None)
            if aclose is not None:
                await aclose()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
            stream.close()


async def _drain(stream: asyncio.StreamReader, into: bytearray) -> None:
    """Append everything ``stream`` yields to ``into`` until EOF."""
    while chunk := await stream.read(_READ_CHUNK):
        into += chunk


async def _run(
    argv: list[str],
    *,
    timeout_s: float,
    head: bytes | None = None,
    tail: bytes | AsyncIterator[bytes] | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> CommandResult:
    """run_command, with stdin given as ``head`` then ``tail`` (bytes or an async stream)."""
    if not argv:
        raise ValueError("argv is empty: give the program and its arguments as a list")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s}: give a positive number of seconds")
    feeding = head is not None or tail is not None
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if feeding else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise DeployFailed(
            Category.UNKNOWN,
            f"{argv[0]} is not installed on the manager (not found on its PATH)",
            f"install {argv[0]} on the manager host (Debian/Ubuntu: apt-get install "
            f"{'openssh-client' if argv[0] == 'ssh' else argv[0]}) and try again",
        ) from exc
    out, err = bytearray(), bytearray()
    assert proc.stdout is not None and proc.stderr is not None
    tasks = [
        asyncio.ensure_future(_drain(proc.stdout, out)),
        asyncio.ensure_future(_drain(proc.stderr, err)),
    ]
    if feeding:
        assert proc.stdin is not None
        tasks.append(asyncio.ensure_future(_feed(proc.stdin, head, tail)))
    waiter = asyncio.ensure_future(proc.wait())
    timed_out = False
    try:
        _, pending = await asyncio.wait([waiter, *tasks], timeout=timeout_s)
        if pending:
            timed_out = True
            _kill_group(proc.pid)
            await waiter
            _, pending = await asyncio.wait(tasks, timeout=_KILL_DRAIN_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            failed = None if task.cancelled() else task.exception()
            if failed is not None:
                raise failed
    except BaseException:
        # cancelled (or the stdin stream failed) while running: nothing of it may outlive us
        _kill_group(proc.pid)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.shield(waiter)
        raise
    finally:
        # the leader has exited; kill what it left in its group (e.g. a backgrounded child)
        _kill_group(proc.pid)
    assert proc.returncode is not None
    duration_s = time.monotonic() - started
    logger.debug(
        "%s exited %s after %.2f s%s",
        argv[0],
        proc.returncode,
        duration_s,
        " (timed out, group killed)" if timed_out else "",
    )
    return CommandResult(
        argv=list(argv),
        returncode=TIMEOUT_RETURNCODE if timed_out else proc.returncode,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        duration_s=duration_s,
        timed_out=timed_out,
    )


async def run_command(
    argv: list[str],
    *,
    timeout_s: float,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> CommandResult:
    """Run ``argv`` (never through a shell) and return what it did.

    The command leads its own process group (its own session); when it runs past ``timeout_s``
    (seconds) or the caller is cancelled, the whole group gets SIGKILL, and the result has
    returncode 124 and ``timed_out=True`` with the output read so far. Any process the command
    left behind in its group is killed when it exits too. ``input`` (bytes) is written to its
    stdin, which is otherwise /dev/null. ``env`` replaces the environment (None: inherit).

    Raises ValueError for an empty argv or a timeout that is not positive, and DeployFailed
    (Category.UNKNOWN, naming the program) when ``argv[0]`` is not installed here.
    """
    return await _run(argv, timeout_s=timeout_s, head=input, env=env, cwd=cwd)


# -- parsing the user's ssh command -------------------------------------------------------------

_DESTINATION_RE = re.compile(r"[A-Za-z0-9._@:%\[\]-]+")
_HOP_RE = re.compile(
    r"(?:[A-Za-z0-9._][A-Za-z0-9._-]{0,63}@)?[A-Za-z0-9._][A-Za-z0-9._-]{0,252}(?::[0-9]{1,5})?"
)
_USER_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,63}")
_NAME_RE = re.compile(r"[A-Za-z0-9._:][A-Za-z0-9._:-]{0,252}")
_ALGOS_RE = re.compile(r"[+^-]?[A-Za-z0-9@._+,-]{1,2000}")
_PATH_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\"]")
_O_PATH_FORBIDDEN = re.compile(r"[\s\\'#]")
"""Refused in a file path given as ``-o IdentityFile=``/``CertificateFile=``: ssh splits that
value itself (quotes, backslash escapes, ``#`` comments), so the file it opens would not be the
one servetune checked; ``-i PATH`` takes any path as one word."""
_SAFE_WORD_RE = re.compile(r"[A-Za-z0-9_./@:%+=,-]+")
_INT_RE = re.compile(r"[0-9]{1,6}")

_FLAGS_NO_ARG = {"4", "6", "C", "q", "v", "T", "a", "x"}  # -a -x: no agent, no X11 forwarding
_FLAGS_ARG = {"p", "i", "l", "J", "o"}
_ALLOWED_HELP = (
    "allowed: -p PORT, -i KEY_FILE, -l USER, -J JUMP_HOST, -4, -6, -C, -a, -x, -q (ignored), -v, -T and "
    "-o Key=Value for a few keys (Port, User, IdentityFile, ProxyJump, ConnectTimeout, …)"
)
_REFUSED_FLAGS: dict[str, str] = {
    "F": "-F (config file) is not allowed: servetune writes its own ssh config and Includes your "
    "~/.ssh/config; put host settings there",
    "E": "-E (log file) is not allowed: servetune keeps ssh's error output to diagnose failures",
    "L": "-L (local port forwarding) is not allowed: servetune opens the Redis tunnel itself "
    "(choose it with redis_via)",
    "R": "-R (remote port forwarding) is not allowed: servetune opens the Redis tunnel itself "
    "(choose it with redis_via)",
    "D": "-D (dynamic forwarding) is not allowed: remove it",
    "W": "-W (stdio forwarding) is not allowed: use -J JUMP_HOST to go through a jump host",
    "A": "-A (agent forwarding) is not allowed: the worker gets its own tunnel key instead",
    "X": "-X (X11 forwarding) is not allowed: remove it",
    "Y": "-Y (X11 forwarding) is not allowed: remove it",
    "t": "-t (forced tty) is not allowed: servetune's commands need a clean byte stream",
    "N": "-N (no command) is not allowed: servetune runs its own commands on the host",
    "f": "-f (background) is not allowed: servetune runs ssh itself",
    "M": "-M (control master) is not allowed: remove it",
    "S": "-S (control socket) is not allowed: remove it",
    "O": "-O (control command) is not allowed: remove it",
    "G": "-G is not allowed: servetune resolves the target with ssh -G itself",
    "c": "-c is not allowed: write -o Ciphers=LIST instead",
    "m": "-m is not allowed: write -o MACs=LIST instead",
}


def _invalid(message: str, suggestion: str) -> DeployFailed:
    return DeployFailed(Category.SSH_COMMAND_INVALID, message, suggestion)


def _check_value(key: str, value: str, *, in_o: bool = False) -> str:
    """``value`` of option ``key`` when it is acceptable (~ expanded in file options); ``in_o``:
    given as ``-o Key=Value`` (ssh splits such a value itself)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _invalid(
            f"the value of {key} contains a newline or control character",
            f"write {key} on one line with printable characters only",
        )
    if not value:
        raise _invalid(f"{key} has an empty value", f"give a value, e.g. -o {key}=...")
    lowered = key.lower()
    if lowered == "port":
        if not _INT_RE.fullmatch(value) or not 1 <= int(value) <= 65535:
            raise _invalid(f"port {value!r} is not a number from 1 to 65535", "e.g. -p 2222")
        return value
    if lowered == "user":
        if not _USER_RE.fullmatch(value):
            raise _invalid(
                f"user {value!r} has characters other than letters, digits, '.', '_', '-' or "
                "starts with '-'",
                "give the remote login name, e.g. -l ubuntu",
            )
        return value
    if lowered in ("identityfile", "certificatefile"):
        if _PATH_FORBIDDEN.search(value):
            raise _invalid(f"{key} {value!r} contains a '\"'", "rename the key file")
        if "${" in value:  # it would read the manager's environment (tokens, secrets) into paths
            raise _invalid(
                f"{key} {value!r}: ${{VAR}} is not expanded in a worker slot's ssh command",
                "write the path out, e.g. -i ~/.ssh/id_ed25519",
            )
        if in_o and _O_PATH_FORBIDDEN.search(value):
            raise _invalid(
                f"-o {key}={value} holds a space, a quote, a backslash or '#', which ssh would "
                "split or strip in an -o value",
                f"give the key as -i '{value}'"
                if lowered == "identityfile"
                else "move or link the file to a path of letters, digits and . _ / -",
            )
        return os.path.expanduser(value)
    if lowered == "proxyjump":
        if value.lower() == "none":
            return "none"
        for hop in value.split(","):
            plain = hop[len("ssh://") :] if hop.startswith("ssh://") else hop
            if not _HOP_RE.fullmatch(plain):
                raise _invalid(
                    f"jump host {hop!r} is not [user@]host[:port] (letters, digits, '.', '_', "
                    "'-', not starting with '-'; hops separated by ',')",
                    "e.g. -J admin@bastion.example.com:2222 (define anything fancier as a Host "
                    "in ~/.ssh/config and give its name)",
                )
        return value
    if lowered in ("connecttimeout", "serveraliveinterval", "serveralivecountmax"):
        if not _INT_RE.fullmatch(value):
            raise _invalid(f"{key} {value!r} is not a whole number", f"e.g. -o {key}=10")
        return value
    if lowered == "stricthostkeychecking":
        if value.lower() not in ("yes", "accept-new"):
            raise _invalid(
                f"StrictHostKeyChecking={value} is not allowed (only yes or accept-new)",
                "remove it (servetune records a new host's key on first use and stops on a "
                "changed one) or say yes to accept only keys already known",
            )
        return value.lower()
    if lowered in ("identitiesonly", "compression"):
        if value.lower() not in ("yes", "no"):
            raise _invalid(f"{key} {value!r} must be yes or no", f"e.g. -o {key}=yes")
        return value.lower()
    if lowered == "addressfamily":
        if value.lower() not in ("any", "inet", "inet6"):
            raise _invalid(f"AddressFamily {value!r} must be any, inet or inet6", "e.g. -4")
        return value.lower()
    if lowered == "loglevel":
        levels = ("quiet", "fatal", "error", "info", "verbose", "debug", "debug1", "debug2")
        if value.lower() not in (*levels, "debug3"):
            raise _invalid(f"LogLevel {value!r} is not an ssh log level", "e.g. -o LogLevel=ERROR")
        if value.lower() in ("quiet", "fatal"):
            raise _invalid(
                f"LogLevel={value} would hide the errors servetune reads from ssh to say what "
                "failed (host key, refused login, closed port, …)",
                "remove it, or use LogLevel=ERROR",
            )
        return value
    # algorithm lists and PreferredAuthentications
    if not _ALGOS_RE.fullmatch(value):
        raise _invalid(
            f"{key} {value!r} is not a comma-separated list of names",
            f"e.g. -o {key}=name1,name2",
        )
    return value


_O_KEYS_ALLOWED = (
    "Port",
    "User",
    "IdentityFile",
    "IdentitiesOnly",
    "ProxyJump",
    "ConnectTimeout",
    "StrictHostKeyChecking",
    "ServerAliveInterval",
    "ServerAliveCountMax",
    "Compression",
    "AddressFamily",
    "HostKeyAlgorithms",
    "PubkeyAcceptedAlgorithms",
    "PubkeyAcceptedKeyTypes",
    "Ciphers",
    "MACs",
    "KexAlgorithms",
    "CertificateFile",
    "PreferredAuthentications",
    "LogLevel",
)
_O_KEYS = {k.lower(): k for k in _O_KEYS_ALLOWED}
_O_REFUSED = {
    "proxycommand": "use -J JUMP_HOST (ProxyJump) instead of ProxyCommand",
    "localcommand": "remove it: nothing may run on the manager from a slot's ssh command",
    "permitlocalcommand": "remove it: nothing may run on the manager from a slot's ssh command",
    "knownhostscommand": "remove it: servetune keeps its own known_hosts file",
    "remotecommand": "remove it: servetune runs its own commands on the host",
    "match": "put Match blocks in ~/.ssh/config (servetune Includes it)",
    "userknownhostsfile": "remove it: servetune keeps its own known_hosts file (data dir ssh/)",
    "globalknownhostsfile": "remove it: servetune keeps its own known_hosts file (data dir ssh/)",
    "batchmode": "remove it: servetune always runs ssh in batch mode",
    # one known_hosts serves every slot: an alias would let one slot record a host key under
    # another host's name (poisoning that host's entry); the user's own config is trusted
    "hostkeyalias": "set HostKeyAlias for that Host in ~/.ssh/config (servetune Includes it): "
    "in a slot's command it could record a key under another host's name",
    "include": "put Include lines in ~/.ssh/config (servetune Includes it)",
}


def _parse_o(raw: str) -> tuple[str, str]:
    """``-o Key=Value`` or ``-o "Key Value"`` → (canonical key, checked value)."""
    if any(c in raw for c in "\r\n\x00"):
        raise _invalid(
            f"-o {raw.splitlines()[0] if raw.splitlines() else ''!r}… contains a newline",
            "give each -o option on one line: -o Key=Value",
        )
    match = re.fullmatch(r"\s*([A-Za-z][A-Za-z0-9]*)\s*(?:=|\s)\s*(.*?)\s*", raw)
    if match is None:
        raise _invalid(f"-o {raw!r} is not Key=Value", "e.g. -o ConnectTimeout=10")
    key, value = match.group(1), match.group(2)
    lowered = key.lower()
    if lowered in _O_REFUSED:
        raise _invalid(
            f"-o {key} is not allowed in a worker slot's ssh command", _O_REFUSED[lowered]
        )
    if lowered not in _O_KEYS:
        raise _invalid(
            f"-o {key} is not allowed in a worker slot's ssh command",
            f"remove it or set it for this host in ~/.ssh/config ({_ALLOWED_HELP})",
        )
    canonical = _O_KEYS[lowered]
    return canonical, _check_value(canonical, value, in_o=True)


def _parse_uri(word: str) -> tuple[str, str | None]:
    """``ssh://[user@]host[:port]`` → (``[user@]host``, port or None)."""
    match = re.fullmatch(
        r"ssh://(?:([A-Za-z0-9._-]{1,64})@)?([A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.%]+\])"
        r"(?::([0-9]{1,5}))?/?",
        word,
    )
    if match is None:
        raise _invalid(
            f"destination {word!r} is not ssh://[user@]host[:port]",
            "e.g. ssh://ubuntu@gpu-1.example.com:2222",
        )
    user, host, port = match.groups()
    host = host.strip("[]")
    if port is not None:
        _check_value("Port", port)
    return _check_destination(f"{user}@{host}" if user else host), port


def _check_destination(word: str) -> str:
    if word.startswith("-"):
        raise _invalid(
            f"destination {word!r} starts with '-'", "give [user@]host, e.g. ubuntu@gpu-1"
        )
    if not _DESTINATION_RE.fullmatch(word):
        bad = sorted({c for c in word if not _DESTINATION_RE.fullmatch(c)})
        raise _invalid(
            f"destination {word!r} contains {', '.join(repr(c) for c in bad)}: only letters, "
            "digits and . _ @ : % [ ] - are allowed",
            "give [user@]host or a Host alias from ~/.ssh/config, e.g. ubuntu@gpu-1.example.com",
        )
    if word.count("@") > 1 or word.endswith("@") or word.startswith("@"):
        raise _invalid(f"destination {word!r} is not [user@]host", "e.g. ubuntu@gpu-1")
    user, at, host = word.rpartition("@")
    if host.startswith("-"):
        raise _invalid(
            f"destination {word!r}: the host part starts with '-'",
            "give [user@]host, e.g. ubuntu@gpu-1 (a host name never starts with '-')",
        )
    if at:
        _check_value("User", user)
    return word


@dataclass(frozen=True)
class SshTarget:
    """A parsed, validated slot ssh command.

    ``destination`` is ``[user@]host`` or a Host alias (an ``ssh://user@host:port`` URI becomes
    ``user@host`` plus ``-p port`` at the end of ``options``, which is what ssh does with it);
    ``options`` are the allowed options in canonical argv form (``("-p", "2222", "-i",
    "/root/.ssh/key", "-o", "ConnectTimeout=5")``, ``~`` expanded in key files); ``command`` is the
    command as typed.
    """

    destination: str
    options: tuple[str, ...]
    command: str


def parse_ssh_command(command: str) -> SshTarget:
    """Parse a slot's ssh command (e.g. ``ssh -p 2222 -i ~/.ssh/key -J jump user@host``).

    shlex splits it (no shell ever sees it); the first word must be ``ssh``; options must be in
    the allow-list (-p, -i, -l, -J, -4, -6, -C, -q, -v, -T, -o Key=Value for the keys listed in
    ``_O_KEYS``; -q is accepted but dropped, and LogLevel QUIET/FATAL refused, since a quiet ssh
    prints none of the errors diagnose.classify_ssh reads); options may also follow the
    destination, as ssh allows. Raises DeployFailed
    (Category.SSH_COMMAND_INVALID) naming the refused part and how to fix it: an empty command,
    a newline or control character, unbalanced quotes, any other option (ProxyCommand,
    LocalCommand, -F, -E, -L/-R/-D/-W, …), a bad value, a destination with characters other
    than ``[A-Za-z0-9._@:%[]-]`` or starting with '-', or a remote command after the destination.
    """
    if not command or not command.strip():
        raise _invalid(
            "the ssh command is empty",
            "give the ssh command you use to reach the host, e.g. ssh -p 2222 ubuntu@gpu-1",
        )
    for index, char in enumerate(command):
        if (ord(char) < 32 and char != "\t") or ord(char) == 127:
            what = "a newline" if char in "\r\n" else f"control character {ord(char):#04x}"
            raise _invalid(
                f"the ssh command contains {what} (at character {index + 1})",
                "give the ssh command on one line, e.g. ssh -p 2222 ubuntu@gpu-1",
            )
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise _invalid(
            f"the ssh command cannot be split into words: {exc}",
            "close every quote you open, e.g. ssh -i '/path with space/key' user@host",
        ) from exc
    if not words or words[0] != "ssh":
        raise _invalid(
            f"the ssh command must start with 'ssh', not {words[0]!r}"
            if words
            else "the ssh command is empty",
            "e.g. ssh -p 2222 ubuntu@gpu-1 (the system ssh is always used)",
        )
    options: list[str] = []
    tail: list[str] = []
    destination: str | None = None
    index = 1
    while index < len(words):
        word = words[index]
        index += 1
        if word == "--":
            if destination is None and index < len(words):
                destination = _check_destination(words[index])
                index += 1
            if index < len(words):
                raise _invalid(
                    f"remote command after the destination: {' '.join(words[index:])!r}",
                    "remove it: servetune runs its own commands on the host",
                )
            break
        if word.startswith("--") and len(word) > 2:
            raise _invalid(
                f"{word!r} is not an ssh option (ssh has no long options)", _ALLOWED_HELP
            )
        if word.startswith("-") and len(word) > 1:
            pos = 1
            while pos < len(word):
                flag = word[pos]
                pos += 1
                if flag == "q":
                    continue  # accepted, not passed on: quiet ssh says nothing to diagnose
                if flag in _FLAGS_NO_ARG:
                    options.append(f"-{flag}")
                    continue
                if flag not in _FLAGS_ARG:
                    raise _invalid(
                        _REFUSED_FLAGS.get(flag, f"option -{flag} is not allowed"),
                        _ALLOWED_HELP,
                    )
                if pos < len(word):
                    value = word[pos:]
                elif index < len(words):
                    value = words[index]
                    index += 1
                else:
                    raise _invalid(f"-{flag} needs a value", _ALLOWED_HELP)
                if flag == "o":
                    key, checked = _parse_o(value)
                    options += ["-o", f"{key}={checked}"]
                else:
                    key = {"p": "Port", "i": "IdentityFile", "l": "User", "J": "ProxyJump"}[flag]
                    if flag == "i" and ("%" in value or "${" in value):
                        # ssh opens an -i file as written (it warns "not accessible" and goes
                        # on without it): tokens and ${VAR} are expanded in -o IdentityFile only
                        raise _invalid(
                            f"-i {value!r}: ssh does not expand % tokens or ${{VAR}} in -i",
                            f"write the path out, or give it as -o IdentityFile={value}",
                        )
                    options += [f"-{flag}", _check_value(key, value)]
                break
            continue
        if destination is None:
            if word.startswith("ssh://"):
                destination, port = _parse_uri(word)
                if port is not None:
                    tail += ["-p", port]
            else:
                destination = _check_destination(word)
            continue
        raise _invalid(
            f"remote command after the destination: {' '.join(words[index - 1 :])!r}",
            "remove it: servetune runs its own commands on the host",
        )
    if destination is None:
        raise _invalid(
            "the ssh command has no destination",
            "end it with [user@]host, e.g. ssh -p 2222 ubuntu@gpu-1",
        )
    return SshTarget(destination=destination, options=tuple(options + tail), command=command)


# -- a session with one target ------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedTarget:
    """What ``ssh -G`` says the target is: ``hostname`` to connect to, ``port``, remote ``user``,
    ``identity_files`` ssh will try (as ssh prints them, ``~`` unexpanded), ``proxy_jump`` (None
    when direct) and the effective ``strict_host_key_checking`` (``yes`` or ``accept-new``)."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    proxy_jump: str | None
    strict_host_key_checking: str


_SHELL_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+-]+")


def _config_quote(path: Path, what: str) -> str:
    """``path`` written as one ssh config argument (double-quoted when it has a space)."""
    text = str(path)
    if any(ord(c) < 32 for c in text) or '"' in text:
        raise DeployFailed(
            Category.UNKNOWN,
            f"{what} {text!r} contains a '\"' or a control character",
            "set SERVETUNE_DATA_DIR to a plain directory path",
        )
    return f'"{text}"' if " " in text or "\t" in text else text


def _rsync_quote(word: str) -> str:
    """``word`` as one argument of rsync's ``-e`` string (rsync splits it on spaces itself)."""
    if _SAFE_WORD_RE.fullmatch(word):
        return word
    if "'" not in word:
        return f"'{word}'"
    return '"' + word.replace('"', '""') + '"'


def _home_dir() -> Path:
    """The home directory ssh uses for ``~`` (the password database's, not $HOME)."""
    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        return Path.home()


_KEY_TOKENS = "%dhilLnprujk"
"""The ``%`` tokens ssh expands in IdentityFile/CertificateFile that servetune expands the same
way to check the file (``%C`` is refused: give the path written out)."""


def _expand_key_path(raw: str, resolved: ResolvedTarget, destination: str, what: str) -> str:
    """``raw`` as ssh opens it: ``~`` then ``%`` tokens then ``${VAR}`` expanded (ssh_config(5),
    TOKENS and ENVIRONMENT VARIABLES). Raises DeployFailed (SSH_COMMAND_INVALID) for a token or
    variable ssh could not expand either (or ``%C``)."""
    home = str(_home_dir())
    text = os.path.expanduser(raw) if raw.startswith("~") else raw
    local = socket.gethostname()
    values = {
        "%": "%",
        "d": home,
        "h": resolved.hostname,
        "i": str(os.getuid()),
        "l": local,
        "L": local.split(".")[0],
        "n": destination.rpartition("@")[2],
        "p": str(resolved.port),
        "r": resolved.user,
        "u": _user_name(),
        "j": resolved.proxy_jump or "",
        "k": destination.rpartition("@")[2],
    }
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char != "%":
            out.append(char)
            index += 1
            continue
        token = text[index + 1 : index + 2]
        if token not in values:
            raise _invalid(
                f"the key file {what} holds %{token}, a token servetune does not expand",
                f"write the path out, or use one of %{', %'.join(_KEY_TOKENS)} and %%",
            )
        out.append(values[token])
        index += 2
    expanded = "".join(out)

    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise _invalid(
                f"the key file {what} names ${{{name}}}, which is not set for the manager",
                "write the path out",
            )
        return os.environ[name]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", variable, expanded)


def _is_special_path(path: str) -> bool:
    """``path`` (absolute, normalised) is under /dev, /proc or /sys."""
    return any(path == top or path.startswith(top + "/") for top in ("/dev", "/proc", "/sys"))


def _user_name() -> str:
    """The local user's name (as ssh's ``%u``)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


class SshSession:
    """One slot's ssh target with servetune's settings: the generated config file, ``ssh -G``,
    running the remote agent and pushing directories.

    The config file (``settings.ssh_dir/config/<hash>.conf``, the hash of its content so slots
    with the same settings share it) holds, when -i/IdentityFile is given, a block for the
    destination's host with IdentitiesOnly (so the jump hop, which never sees -i, may still use
    the ssh-agent), then a ``Host *`` block (BatchMode, ConnectTimeout, ServerAliveInterval,
    servetune's own UserKnownHostsFile and StrictHostKeyChecking), so ProxyJump hops (which ssh
    runs as ``ssh -F <cfg>``) get them too, and then Includes ``~/.ssh/config`` when it exists. With a jump host its path
    must be free of shell metacharacters and spaces, since ssh writes it unquoted into the jump
    hop's command line (``sh -c "exec ssh -F <cfg> ..."``): DeployFailed otherwise.
    """

    def __init__(self, target: SshTarget, settings: Settings) -> None:
        self.target = target
        self.settings = settings
        self._config: Path | None = None
        self._resolved: ResolvedTarget | None = None

    # -- the generated config ------------------------------------------------------------

    @property
    def known_hosts_path(self) -> Path:
        """servetune's own known_hosts: ``settings.ssh_dir/known_hosts``."""
        return self.settings.ssh_dir / "known_hosts"

    @property
    def strict_host_key_checking(self) -> str:
        """``yes`` when the slot's ssh command says so, else ``accept-new``."""
        for index, word in enumerate(self.target.options):
            if word == "-o" and self.target.options[index + 1].lower().startswith(
                "stricthostkeychecking="
            ):
                return self.target.options[index + 1].split("=", 1)[1]
        return "accept-new"

    def config_text(self) -> str:
        """The generated ssh config's content (see the class docstring)."""
        opts = self.target.options
        lines = ["# generated by servetune for worker slots; rewritten as needed, do not edit"]
        if "-i" in opts or any(w.startswith("IdentityFile=") for w in opts):
            # only the key(s) named for the final host; a jump hop keeps its own ways (agent)
            lines += [f"Host {self.target.destination.rpartition('@')[2]}", "  IdentitiesOnly yes"]
        lines += [
            "Host *",
            "  BatchMode yes",
            f"  ConnectTimeout {max(1, round(self.settings.ssh_connect_timeout_s))}",
            "  ServerAliveInterval 15",
            "  ServerAliveCountMax 3",
            f"  UserKnownHostsFile {_config_quote(self.known_hosts_path, 'known_hosts path')}",
            f"  StrictHostKeyChecking {self.strict_host_key_checking}",
            "  RequestTTY no",
            "  PermitLocalCommand no",
            "  ForwardAgent no",
            "  ForwardX11 no",
            "  ControlMaster no",
            "  ControlPath none",
        ]
        user_config = _home_dir() / ".ssh" / "config"
        if user_config.is_file():
            lines.append(f"Include {_config_quote(user_config, 'ssh config path')}")
        return "\n".join(lines) + "\n"

    def config_path(self) -> Path:
        """Write the generated config (once, atomically, mode 600) and return its path.

        Raises DeployFailed when the slot goes through a jump host and the path holds
        characters other than letters, digits and ``. _ / + -`` (see the class docstring)."""
        if self._config is not None and self._config.is_file():
            return self._config
        text = self.config_text()
        directory = self.settings.ssh_dir / "config"
        path = directory / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.conf"
        for folder in (self.settings.ssh_dir, directory):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(temporary, path)
        self._config = path
        opts = self.target.options
        if "-J" in opts or any(w.startswith("ProxyJump=") for w in opts):
            self._check_jump_safe(path)
        return path

    @staticmethod
    def _check_jump_safe(path: Path) -> None:
        if not _SHELL_SAFE_PATH.fullmatch(str(path)):
            raise DeployFailed(
                Category.SSH_COMMAND_INVALID,
                f"servetune's ssh config {str(path)!r} has characters other than letters, digits "
                "and . _ / + -, and ssh writes its path into the shell command of a jump host",
                "set SERVETUNE_DATA_DIR to a plain path (e.g. /srv/servetune) to use -J/ProxyJump",
            )

    # -- argv -----------------------------------------------------------------------------

    def ssh_argv(self, remote_command: str | None = None) -> list[str]:
        """``["ssh", "-F", <config>, *options, "--", destination]`` plus ``remote_command`` (a
        string the remote user's shell runs: build it only from constants and shlex-quoted
        validated values). Writes the config file when needed."""
        argv = ["ssh", "-F", str(self.config_path()), *self.target.options, "--"]
        argv.append(self.target.destination)
        if remote_command is not None:
            argv.append(remote_command)
        return argv

    def describe(self) -> str:
        """The target for messages, as the user knows it: the destination, with ``:port`` when
        the command gives one (``ubuntu@gpu-1:2222``, ``[fe80::1]:2222``)."""
        opts = self.target.options
        ports = [opts[i + 1] for i, w in enumerate(opts[:-1]) if w == "-p"]
        ports += [w.split("=", 1)[1] for w in opts if w.startswith("Port=")]
        if not ports:
            return self.target.destination
        user, at, host = self.target.destination.rpartition("@")
        if ":" in host:
            host = f"[{host}]"
        return f"{user}{at}{host}:{ports[0]}"

    # -- ssh -G --------------------------------------------------------------------------

    async def resolve(self) -> ResolvedTarget:
        """Run ``ssh -G`` with the slot's options and servetune's config; what ssh will use.

        Raises DeployFailed (Category.SSH_COMMAND_INVALID) when a key file the command names
        (-i, IdentityFile, CertificateFile; after ssh's own ``%``/``${}`` expansion) is missing
        here, not a regular file, a device or /proc path, or a private key readable by others
        (ssh would skip it silently), or when ssh rejects the options or the destination (with
        ssh's message). ``run_agent`` and ``push_dir`` resolve first when it was not done.
        """
        argv = ["ssh", "-F", str(self.config_path()), *self.target.options, "-G", "--"]
        argv.append(self.target.destination)
        result = await run_command(argv, timeout_s=30.0)
        if result.returncode != 0:
            message = result.stderr.strip().splitlines()
            raise DeployFailed(
                Category.SSH_COMMAND_INVALID,
                f"ssh does not accept the slot's ssh command: {message[-1] if message else ''}",
                "fix the ssh command (try it by hand: ssh -G ...)",
                logs=message[-30:],
            )
        values: dict[str, list[str]] = {}
        for line in result.stdout.splitlines():
            key, _, value = line.partition(" ")
            values.setdefault(key.lower(), []).append(value.strip())
        strict = values.get("stricthostkeychecking", ["accept-new"])[0]
        strict = {"true": "yes", "false": "no"}.get(strict, strict)
        jump = values.get("proxyjump", [None])[0]
        if jump not in (None, "none"):  # also one set for this host in ~/.ssh/config
            self._check_jump_safe(self.config_path())
        resolved = ResolvedTarget(
            hostname=values.get("hostname", [self.target.destination])[0],
            port=int(values.get("port", ["22"])[0]),
            user=values.get("user", [""])[0],
            identity_files=tuple(values.get("identityfile", [])),
            proxy_jump=None if jump in (None, "none") else jump,
            strict_host_key_checking=strict,
        )
        await asyncio.to_thread(self._check_key_files, resolved)
        self._resolved = resolved
        return resolved

    def _key_files(self) -> list[tuple[str, str]]:
        """(option, path) of every key file the command names: -i, IdentityFile, CertificateFile."""
        opts = self.target.options
        found = [("-i", opts[i + 1]) for i, w in enumerate(opts[:-1]) if w == "-i"]
        for word in opts:
            key, eq, value = word.partition("=")
            if eq and key in ("IdentityFile", "CertificateFile"):
                found.append((key, value))
        return found

    def _check_key_files(self, resolved: ResolvedTarget) -> None:
        """Refuse a key file ssh would not read as the user meant: one missing here, not a
        regular file (a directory, a FIFO), a device or /proc path (``/dev/stdin``: ssh would
        read the agent's request, secrets included, as a key), a private key readable by others
        (ssh skips it). Paths are checked after the expansion ssh applies (``~``, ``%d``,
        ``%h``, ``${VAR}``, …), so a token cannot hide any of these."""
        for option, raw in self._key_files():
            if raw.lower() == "none":
                continue
            what = f"{option} {raw}"
            expanded = _expand_key_path(raw, resolved, self.target.destination, what)
            real = os.path.realpath(expanded)
            # both: /dev/stdin resolves through /proc/self, which is this process, not ssh
            special = [p for p in (os.path.normpath(expanded), real) if _is_special_path(p)]
            if special:
                raise _invalid(
                    f"the key file {what} is {special[0]}, a device or kernel file, not a key file "
                    "(ssh would read it in place of its own input)",
                    "give the path of a key file on the manager, e.g. -i ~/.ssh/id_ed25519",
                )
            path = Path(real)
            if not path.exists():
                raise _invalid(
                    f"the key file {what} (-i/IdentityFile/CertificateFile) does not exist on "
                    "the manager",
                    "give the path of a private key on the manager host, e.g. -i ~/.ssh/id_ed25519",
                )
            if not path.is_file():
                raise _invalid(
                    f"the key file {what} is not a regular file on the manager ({real})",
                    "give the path of the key file itself, e.g. -i ~/.ssh/id_ed25519",
                )
            if option != "CertificateFile" and path.stat().st_mode & 0o077:
                raise _invalid(
                    f"the key file {raw} (-i/IdentityFile) is readable by other users: ssh refuses it",
                    f"run: chmod 600 {shlex.quote(expanded)}",
                )

    async def _ensure_resolved(self) -> ResolvedTarget:
        """``resolve()`` once per session (it checks the key files before any connection)."""
        if self._resolved is None:
            await self.resolve()
        assert self._resolved is not None
        return self._resolved

    # -- the remote agent ----------------------------------------------------------------

    async def _agent_call(
        self,
        action: str,
        params: dict[str, Any],
        *,
        python: str,
        timeout_s: float,
        stdin_tail: bytes | AsyncIterator[bytes] | None,
    ) -> tuple[dict[str, Any], CommandResult]:
        """run_agent, also returning the ssh CommandResult."""
        if not re.fullmatch(PYTHON_PATTERN, python):
            raise _invalid(
                f"python {python!r} is not a command name or path (letters, digits, _ . / + -)",
                "give the remote interpreter as python3 or an absolute path like /usr/bin/python3",
            )
        await self._ensure_resolved()
        remote = shlex.quote(python) + " -I -c " + shlex.quote(agent.BOOTSTRAP)
        result = await _run(
            self.ssh_argv(remote),
            timeout_s=timeout_s,
            head=agent.request_line(action, params),
            tail=stdin_tail,
        )
        target = self.describe()
        try:
            reply = agent.parse_reply(result.stdout)
        except ValueError:
            reply = None
        if reply is not None:
            if reply.get("ok"):
                return dict(reply.get("result") or {}), result
            raise _from_agent_error(dict(reply.get("error") or {}), step=action, target=target)
        failure = _classify_ssh(result, target=target)
        if failure is None:
            failure = _unexplained(result, action=action, target=target, timeout_s=timeout_s)
        if not failure.step:
            failure.step = action
        raise failure

    async def run_agent(
        self,
        action: str,
        params: dict[str, Any],
        *,
        python: str = "python3",
        timeout_s: float,
        stdin_tail: bytes | AsyncIterator[bytes] | None = None,
    ) -> dict[str, Any]:
        """Run the agent's ``action`` on the remote with ``params``; its ``result`` dict.

        The remote command line is ``<python> -I -c <agent.BOOTSTRAP>`` (both shlex-quoted;
        ``python`` must match PYTHON_PATTERN); ``params`` travel as the JSON request line on
        stdin, followed by ``stdin_tail`` (e.g. a tar stream), so no value appears in any argv.
        Raises DeployFailed: the agent's own error through ``diagnose.from_agent_error``; an ssh
        failure (no agent reply) through ``diagnose.classify_ssh``; otherwise Category.UNKNOWN
        (STEP_TIMEOUT past ``timeout_s`` seconds) with the output's tail as logs.
        """
        result, _ = await self._agent_call(
            action, params, python=python, timeout_s=timeout_s, stdin_tail=stdin_tail
        )
        return result

    # -- pushing files -------------------------------------------------------------------

    async def push_dir(
        self,
        local_dir: Path,
        remote_dir: str,
        *,
        rsync: bool,
        timeout_s: float,
        python: str = "python3",
        exclude: tuple[str, ...] = (),
    ) -> CommandResult:
        """Copy the contents of ``local_dir`` into ``remote_dir`` (absolute or under ``~/``;
        its parent must exist on the remote). Files already there and not in ``local_dir``
        stay.

        With ``rsync`` (the remote has rsync) and rsync installed here: ``rsync -a -s -e "ssh -F
        <config> <options>"``; otherwise a tar stream made here with Python's tarfile is piped
        into the agent's ``untar`` action run by the remote ``python`` (the slot's interpreter;
        no tar binary needed on either side). The result's
        ``argv[0]`` says which ran (``rsync`` or ``ssh``): a remote whose shell cannot run
        rsync after all gets the tar stream (logged as a warning), so the caller can report the
        fallback (Category.RSYNC_MISSING). Raises ValueError for a missing ``local_dir`` or a bad
        ``remote_dir``; DeployFailed as run_agent for the tar path; for rsync: what
        ``diagnose.classify_ssh`` finds, else Category.UNKNOWN with rsync's output.

        ``exclude`` leaves paths out, both ways alike (rsync's ``--exclude``): a pattern starting
        with ``/`` is a path relative to ``local_dir`` (``/bin/python``), any other one a name
        (fnmatch, e.g. ``__pycache__``, ``*.pyc``) matched at any depth; an excluded folder is
        left out with everything in it.
        """
        if not await asyncio.to_thread(local_dir.is_dir):
            raise ValueError(f"local_dir {local_dir} is not a directory")
        try:
            check_remote_path(remote_dir)
        except ValueError as exc:
            raise ValueError(f"remote_dir: {exc}") from exc
        if rsync and shutil.which("rsync") is not None:
            done = await self._push_rsync(
                local_dir, remote_dir, timeout_s=timeout_s, exclude=exclude
            )
            if done is not None:
                return done
            logger.warning("rsync is missing on %s: sending a tar stream instead", self.describe())
        _, result = await self._agent_call(
            "untar",
            {"dest": remote_dir},
            python=python,
            timeout_s=timeout_s,
            stdin_tail=_tar_stream(local_dir, exclude),
        )
        return result

    async def _push_rsync(
        self, local_dir: Path, remote_dir: str, *, timeout_s: float, exclude: tuple[str, ...] = ()
    ) -> CommandResult | None:
        """rsync's result; None when the remote has no rsync (its shell could not run it)."""
        await self._ensure_resolved()
        if remote_dir == "~":
            remote_path = "."
        elif remote_dir.startswith("~/"):
            remote_path = remote_dir[2:] or "."  # rsync starts in the login's home directory
        else:
            remote_path = remote_dir
        shell = " ".join(
            _rsync_quote(w) for w in ["ssh", "-F", str(self.config_path()), *self.target.options]
        )
        user, _, host = self.target.destination.rpartition("@")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        spec = f"{user}@{host}" if user else host
        argv = ["rsync", "-a", "-s", "-e", shell, *(f"--exclude={p}" for p in exclude)]
        argv += ["--", f"{local_dir}/", f"{spec}:{remote_path}/"]
        result = await run_command(argv, timeout_s=timeout_s)
        if result.returncode == 0:
            return result
        target = self.describe()
        if re.search(
            r"remote command (?:not found|could not be run) \(code 12[67]\)"
            r"|(?m:^[\w/.-]*sh:.*(?:rsync: (?:command not found|not found|Permission denied"
            r"|No such file or directory)|command not found: rsync))",
            result.stderr,
        ):
            return None
        failure = _classify_ssh(result, target=target)
        if failure is None:
            failure = _unexplained(result, action="rsync", target=target, timeout_s=timeout_s)
        if not failure.step:
            failure.step = "upload"
        raise failure


# -- tar stream -----------------------------------------------------------------------------


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def excluded(relative: str, patterns: tuple[str, ...]) -> bool:
    """Whether the path ``relative`` (``a/b/c``, relative to the folder sent) is left out by
    ``patterns`` (as rsync's ``--exclude``: ``/a/b`` anchored at the folder, else a name
    pattern matched against each part; a part matching leaves out all below it). Pure."""
    parts = relative.strip("/").split("/")
    for pattern in patterns:
        if pattern.startswith("/"):
            anchored = pattern.strip("/").split("/")
            if parts[: len(anchored)] == anchored:
                return True
        elif any(fnmatch.fnmatchcase(part, pattern) for part in parts):
            return True
    return False


async def _tar_stream(local_dir: Path, exclude: tuple[str, ...] = ()) -> AsyncIterator[bytes]:
    """The contents of ``local_dir`` as an uncompressed tar stream (members named relative to
    it; ``exclude`` as ``excluded`` reads it), made in a thread that writes into a pipe, so
    memory stays bounded by the pipe; closing the stream early ends the thread (its next write
    fails)."""
    read_fd, write_fd = os.pipe()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_READ_CHUNK)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )

    unreadable: list[OSError] = []

    def leave_out(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if exclude and excluded(info.name, exclude) else _tar_filter(info)

    def build() -> None:
        try:
            with (
                os.fdopen(write_fd, "wb") as sink,
                tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                for child in sorted(local_dir.iterdir()):
                    tar.add(child, arcname=child.name, filter=leave_out)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the reader went away (the remote side failed): it reports why
        except OSError as exc:
            unreadable.append(exc)

    worker = loop.run_in_executor(None, build)
    try:
        while chunk := await reader.read(_READ_CHUNK):
            if unreadable:
                break
            yield chunk
        await worker
        if unreadable:
            raise DeployFailed(
                Category.UNKNOWN,
                f"cannot read what to upload from {local_dir}: {unreadable[0]}",
                f"make every file under {local_dir} readable by the manager's user",
                step="upload",
            )
    finally:
        transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(worker), 10)


# -- failures ---------------------------------------------------------------------------------


def _classify_ssh(result: CommandResult, *, target: str) -> DeployFailed | None:
    return diagnose.classify_ssh(result, target=target)


def _from_agent_error(error: dict[str, Any], *, step: str, target: str) -> DeployFailed:
    return diagnose.from_agent_error(error, step=step, target=target)


def _unexplained(
    result: CommandResult, *, action: str, target: str, timeout_s: float
) -> DeployFailed:
    """The failure of a command that gave no agent reply and that classify_ssh did not explain."""
    logs = diagnose.tail(result.stderr.strip() or result.stdout)
    if result.timed_out:
        return diagnose.failure(
            Category.STEP_TIMEOUT,
            f"{action} on {target} did not finish within {timeout_s:g} s",
            step=action,
            logs=logs,
            host=target,
            timeout_s=f"{timeout_s:g}",
        )
    last = logs[-1] if logs else "no output"
    return diagnose.failure(
        Category.UNKNOWN,
        f"{action} on {target} failed (exit status {result.returncode}): {last}",
        step=action,
        logs=logs,
        host=target,
        reason=f"{action} exited with status {result.returncode} ({last})",
    )
