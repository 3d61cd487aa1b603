"""The manager's authorized_keys lines for workers' Redis tunnels: one line per slot, restricted
to forwarding to Redis (no shell, no pty, no other port), added, replaced and removed under a lock.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from servetune.remote.models import check_slot_name

KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
"""Public key types accepted (OpenSSH names)."""

_PUBLIC_KEY = re.compile(r"^(?P<type>[a-z0-9@.-]+) (?P<blob>[A-Za-z0-9+/]+={0,2})(?: [^\r\n]*)?$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]{1,253})$")

NO_LISTEN = "none.invalid:1"
"""The one ``-R`` listen a tunnel key may ask for: ``port-forwarding`` re-enables ``-R`` too, and
authorized_keys has no ``permitlisten="none"``; a single permitlisten on port 1 of a name that
never resolves (RFC 6761) refuses every other remote forward (port 1 is privileged: only a root
login could bind it, on loopback, with GatewayPorts no)."""

COMMENT_PREFIX = "servetune-slot:"
"""A slot's line ends with ``servetune-slot:<name>``: how add/remove find it."""


def check_public_key(public_key: str) -> str:
    """``"<type> <base64>"`` of a one-line OpenSSH public key (its comment dropped). Raises
    ValueError naming ``public_key`` and the expected form when it is not one line of an accepted
    type with a base64 blob that encodes that same type."""
    text = public_key.strip()
    match = _PUBLIC_KEY.match(text) if "\n" not in text and "\r" not in text else None
    if match is None or match["type"] not in KEY_TYPES:
        raise ValueError(
            f"public_key {public_key[:60]!r}: not an OpenSSH public key; give one line "
            f"'<type> <base64> [comment]' with type one of {', '.join(KEY_TYPES)} "
            "(the content of id_ed25519.pub)"
        )
    try:
        blob = base64.b64decode(match["blob"], validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        inner = blob[4 : 4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError):
        inner = ""
    if inner != match["type"]:
        raise ValueError(
            f"public_key: its base64 part does not encode a {match['type']} key; paste the "
            "whole line of the .pub file unchanged"
        )
    return f"{match['type']} {match['blob']}"


def authorized_line(public_key: str, slot_name: str, permit_host: str, permit_port: int) -> str:
    """The authorized_keys line letting ``public_key`` forward to ``permit_host:permit_port``
    only: ``restrict,port-forwarding,permitopen="h:p",permitlisten="none.invalid:1",
    command="/bin/false" <key> servetune-slot:<name>`` (no shell, pty, agent or X11; any command
    runs /bin/false; no ``-R`` but the useless ``NO_LISTEN``). Unix-socket forwards are not
    covered by permitopen/permitlisten: set ``AllowStreamLocalForwarding no`` in the manager's
    sshd_config to refuse ``-R /path`` for these keys too. Raises
    ValueError naming the field for a bad key, slot name, host or port."""
    key = check_public_key(public_key)
    check_slot_name(slot_name)
    if not _HOST.match(permit_host) or permit_host.startswith("-"):
        raise ValueError(
            f"permit_host {permit_host!r}: give a host name, an IPv4 address or a bracketed "
            "IPv6 address (the Redis host as the manager's sshd reaches it, e.g. 127.0.0.1)"
        )
    if not 1 <= permit_port <= 65535:
        raise ValueError(f"permit_port {permit_port}: give a TCP port, 1-65535 (Redis: 6379)")
    options = (
        f'restrict,port-forwarding,permitopen="{permit_host}:{permit_port}",'
        f'permitlisten="{NO_LISTEN}",command="/bin/false"'
    )
    return f"{options} {key} {COMMENT_PREFIX}{slot_name}"


def _is_slot_line(line: str, slot_name: str) -> bool:
    words = line.split()
    return bool(words) and words[-1] == f"{COMMENT_PREFIX}{slot_name}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``<path>.lock`` (every writer of ``path`` goes through it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _rewrite(path: Path, keep: list[str]) -> None:
    """Replace ``path`` atomically by ``keep`` (one line each), mode 600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(f"{line}\n" for line in keep))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def add_key(path: Path, line: str, slot_name: str) -> None:
    """Add ``line`` (from ``authorized_line``) to the authorized_keys file ``path`` for the slot,
    replacing the slot's previous line; other lines are kept as they were. The file is written
    atomically with mode 600 under a lock (``<path>.lock``), so concurrent adds lose nothing.
    Raises ValueError when ``line`` is not one line ending with the slot's comment, OSError when
    the file cannot be written."""
    check_slot_name(slot_name)
    if "\n" in line or "\r" in line or not _is_slot_line(line, slot_name):
        raise ValueError(
            f"line: must be one line ending with {COMMENT_PREFIX}{slot_name} "
            "(build it with authorized_line)"
        )
    with _locked(path):
        keep = [old for old in _lines(path) if not _is_slot_line(old, slot_name)]
        _rewrite(path, [*keep, line])


def remove_key(path: Path, slot_name: str) -> bool:
    """Remove the slot's line from the authorized_keys file ``path`` (locked, atomic, mode 600);
    whether there was one. Raises ValueError for a bad slot name, OSError when the file cannot
    be written."""
    check_slot_name(slot_name)
    if not path.exists():  # nothing to remove: make no ~/.ssh nor lock file for it
        return False
    with _locked(path):
        lines = _lines(path)
        keep = [old for old in lines if not _is_slot_line(old, slot_name)]
        if len(keep) == len(lines):
            return False
        _rewrite(path, keep)
        return True


# ---- the manager sshd's host keys, pinned in a worker's known_hosts ----------------------------

HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
"""Host key types pinned for a forward tunnel (what ``ssh-keyscan`` reports for ed25519, ecdsa
and rsa host keys; ssh-rsa is the key's type, whichever signature algorithm ssh then uses)."""


def parse_keyscan(output: str) -> list[str]:
    """The host keys in ``ssh-keyscan``'s stdout, as ``"<type> <base64>"`` strings in their order,
    duplicates dropped. Each key line is ``host keytype base64``; comment lines (``# host:port
    SSH-2.0-…``, what ``-v``/banners print), blank lines, hashed or malformed lines and key types
    other than ``HOST_KEY_TYPES`` are ignored (so are blobs that do not encode their type). Pure;
    never raises: an empty list means no usable key came back."""
    found: list[str] = []
    for line in output.splitlines():
        words = line.split()
        if len(words) != 3 or words[0].startswith("#") or words[1] not in HOST_KEY_TYPES:
            continue
        try:
            key = check_public_key(f"{words[1]} {words[2]}")
        except ValueError:
            continue
        if key not in found:
            found.append(key)
    return found


def known_hosts_name(host: str, port: int) -> str:
    """The name ssh looks a destination up by in known_hosts: ``host`` for port 22, else
    ``[host]:port`` (an IPv6 ``host`` is given without brackets: ``[::1]:2222``; with port 22 it
    stays ``::1``). Raises ValueError for a host ssh could misread in that file (space, comma,
    ``*``/``?`` patterns, ``!``, ``#``, brackets) or a port outside 1-65535."""
    if not re.fullmatch(r"[A-Za-z0-9._:%-]{1,253}", host) or host.startswith("-"):
        raise ValueError(
            f"host {host!r}: give a host name or an IP address (letters, digits and ._:%-)"
        )
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port}: give a TCP port, 1-65535")
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts_text(host: str, port: int, host_keys: list[str]) -> str:
    """A whole known_hosts file pinning ``host_keys`` (``"<type> <base64>"``, e.g. from
    ``parse_keyscan``) for ``host``:``port``: one ``<known_hosts_name> <type> <base64>`` line per
    key, each ending in a newline. Raises ValueError for no key, a key that is not an accepted
    OpenSSH public key, or a bad host or port (see ``known_hosts_name``)."""
    if not host_keys:
        raise ValueError("host_keys: give at least one host key (an empty file pins nothing)")
    name = known_hosts_name(host, port)
    return "".join(f"{name} {check_public_key(key)}\n" for key in host_keys)


def fingerprint(public_key: str) -> str:
    """``SHA256:<base64, unpadded>`` of an OpenSSH public key (``"<type> <base64> [comment]"``),
    as ``ssh-keygen -l`` and ssh's host key warnings print it. Raises ValueError as
    ``check_public_key`` does."""
    blob = base64.b64decode(check_public_key(public_key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
