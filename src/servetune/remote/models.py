"""The typed records of worker slots and their deploys (pydantic v2; the API's schema of record).

A **worker slot** is a saved SSH target where a worker can be deployed or restored. A deploy or
restore runs as named steps, each timed; a failure carries a stable ``Category`` and a one-line
suggestion specific to what was found.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

SLOT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
"""A slot name: 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit. It names
the worker (its alias), files on both hosts and the authorized_keys comment, so nothing else is
allowed (no space, no shell metacharacter, no newline)."""

PYTHON_PATTERN = r"^[A-Za-z0-9_./+-]{1,255}$"
"""The remote interpreter: a command name on the remote PATH (``python3``) or an absolute path."""


def _shown(value: str) -> str:
    """``value`` as an error message quotes it: whole when short, else its start and length."""
    return repr(value) if len(value) <= 80 else f"{value[:60]!r}… ({len(value)} characters)"


def check_slot_name(name: str) -> str:
    """``name`` when it matches SLOT_NAME_PATTERN; raises ValueError naming the fix."""
    if not re.fullmatch(SLOT_NAME_PATTERN, name):
        raise ValueError(
            f"{_shown(name)} is not a valid slot name: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. gpu-host-1)"
        )
    return name


def check_python_name(python: str) -> str:
    """``python`` when it matches PYTHON_PATTERN (a command name or a path, nothing a shell
    would read); raises ValueError naming the fix."""
    if not re.fullmatch(PYTHON_PATTERN, python):
        raise ValueError(
            f"{_shown(python)} is not an interpreter name or path: use letters, digits and _ . / + - "
            "only, e.g. python3.11 or /usr/bin/python3"
        )
    return python


def check_remote_path(path: str) -> str:
    """``path`` when it is usable as a remote directory: 1-1024 characters, no NUL or newline,
    absolute or starting with ``~/`` (expanded by the remote's python, never by a shell).
    Raises ValueError naming the fix."""
    if not path or len(path) > 1024 or any(c in path for c in "\x00\n\r"):
        raise ValueError(f"{path!r}: a remote path must be 1-1024 characters with no newline")
    if not (path.startswith("/") or path == "~" or path.startswith("~/")):
        raise ValueError(f"{path!r}: give an absolute remote path or one under ~/ (~/.servetune)")
    return path


SlotName = Annotated[str, AfterValidator(check_slot_name)]
RemotePath = Annotated[str, AfterValidator(check_remote_path)]
RemotePython = Annotated[str, AfterValidator(check_python_name)]


class RedisVia(StrEnum):
    """How a deployed worker reaches the manager's Redis."""

    FORWARD = "forward"
    """The worker opens ``ssh -L`` to the manager's sshd with a key made for it (restricted to
    forwarding to Redis only); Redis is then at 127.0.0.1:<local port> on the worker."""
    REVERSE = "reverse"
    """The manager opens ``ssh -R`` to the worker's host (its own ssh command); Redis is then at
    127.0.0.1:<remote port> on the worker. Needs nothing from the worker's side."""
    DIRECT = "direct"
    """The worker connects to ``redis_address`` (host:port as the worker sees Redis)."""


class OfflineMode(StrEnum):
    """Whether the remote installs from the package index or from a shipped wheelhouse."""

    AUTO = "auto"
    """Probe the index from the remote; offline when it cannot be reached."""
    ALWAYS = "always"
    """Always build and ship a wheelhouse (air-gapped hosts)."""
    NEVER = "never"
    """Always install from the index; an unreachable index fails the deploy."""


class SlotStatus(StrEnum):
    """A slot's status, reconciled with the worker registry on every read."""

    NEVER_SEEN = "never_seen"
    """No worker from this slot has registered yet."""
    DEPLOYING = "deploying"
    """A deploy or restore is running now."""
    ONLINE = "online"
    """Its worker is registered and heartbeating, idle."""
    BUSY = "busy"
    """Its worker is registered and running trials."""
    OFFLINE = "offline"
    """Its worker registered once and has stopped heartbeating."""
    FAILED = "failed"
    """The last deploy or restore failed (see error, category, suggestion)."""


class Category(StrEnum):
    """Why a deploy step failed (or which fallback it took): stable codes, each with a default
    suggestion in ``remote/diagnose.py``; the suggestion returned is specific to what was found."""

    HOST_KEY_CHANGED = "host_key_changed"
    HOST_KEY_UNKNOWN = "host_key_unknown"
    AUTH_REFUSED = "auth_refused"
    CONNECTION_REFUSED = "connection_refused"
    CONNECTION_TIMEOUT = "connection_timeout"
    NAME_NOT_RESOLVED = "name_not_resolved"
    NO_ROUTE = "no_route"
    SSH_COMMAND_INVALID = "ssh_command_invalid"
    REDIS_UNREACHABLE = "redis_unreachable"
    INDEX_UNREACHABLE = "index_unreachable"
    PYTHON_MISSING = "python_missing"
    PYTHON_TOO_OLD = "python_too_old"
    MODULE_NOT_FOUND = "module_not_found"
    INSTALL_FAILED = "install_failed"
    RSYNC_MISSING = "rsync_missing"
    DISK_FULL = "disk_full"
    PERMISSION_DENIED = "permission_denied"
    WORKER_START_FAILED = "worker_start_failed"
    REGISTER_TIMEOUT = "register_timeout"
    TUNNEL_FAILED = "tunnel_failed"
    STEP_TIMEOUT = "step_timeout"
    CONNECTION_LOST = "connection_lost"
    DEPLOY_INTERRUPTED = "deploy_interrupted"
    UNKNOWN = "unknown"


class CommandResult(BaseModel):
    """What one local command (ssh, rsync, uv, …) did: one result type per call."""

    model_config = ConfigDict(frozen=True)

    argv: list[str] = Field(description="The command as run (secrets never appear in it).")
    returncode: int = Field(description="Exit status; -N for a signal; 124 when it timed out.")
    stdout: str = Field(description="Its standard output (decoded, errors replaced).")
    stderr: str = Field(description="Its standard error (decoded, errors replaced).")
    duration_s: float = Field(ge=0, description="Wall time it ran, s.")
    timed_out: bool = Field(default=False, description="Killed (its process group) at timeout.")


class RemoteFacts(BaseModel):
    """What the pre-flight read off the remote host (agent action ``probe``)."""

    hostname: str = Field(description="The remote's host name.")
    python_executable: str = Field(description="Absolute path of the interpreter probed.")
    python_version: str = Field(description="Its full version, e.g. 3.11.2.")
    implementation: str = Field(description="sys.implementation.name, e.g. cpython.")
    arch: str = Field(description="platform.machine(), e.g. x86_64, aarch64.")
    libc: str = Field(description="'glibc', 'musl' or '' when unknown.")
    libc_version: str = Field(description="e.g. 2.36; '' when unknown.")
    install_dir: str = Field(description="The install directory, ~ expanded, absolute.")
    install_dir_writable: bool = Field(
        description="It (or its nearest existing parent) is writable."
    )
    free_disk_gib: float = Field(description="Free space where the install directory goes, GiB.")
    has_rsync: bool = Field(description="rsync is on the remote PATH.")
    has_tar: bool = Field(description="tar is on the remote PATH.")
    index_reachable: bool | None = Field(
        default=None, description="The package index answered (None: not probed)."
    )
    index_error: str | None = Field(default=None, description="Why it did not, when it did not.")


class StepStatus(StrEnum):
    """How a step ended."""

    OK = "ok"
    WARNING = "warning"
    """Done, through a fallback (offline install, tar instead of rsync): see category."""
    FAILED = "failed"
    SKIPPED = "skipped"


class DeployStep(BaseModel):
    """One timed step of a deploy or restore."""

    name: str = Field(description="preflight, install, tunnel_key, start, register, …")
    status: StepStatus = Field(description="How it ended.")
    duration_s: float = Field(ge=0, description="How long it took, s.")
    detail: str = Field(default="", description="One line on what it did or found.")
    category: Category | None = Field(default=None, description="Set on failure or fallback.")
    suggestion: str | None = Field(default=None, description="What to do about it.")


class DeployReport(BaseModel):
    """The answer of ``POST /api/worker-slots/{id}/deploy`` and ``…/restore`` (and the CLI's)."""

    success: bool = Field(description="A worker from this slot is registered and running.")
    action: Literal["deploy", "restore", "remove"] = Field(description="What was asked.")
    message: str = Field(description="One line: what happened, or what failed.")
    category: Category | None = Field(default=None, description="Why it failed (None: success).")
    suggestion: str | None = Field(default=None, description="How to fix it (None: success).")
    steps: list[DeployStep] = Field(default_factory=list, description="Every step run, in order.")
    logs: list[str] = Field(
        default_factory=list, description="Tail of the output of the failing command (no secrets)."
    )
    worker_id: str | None = Field(default=None, description="The registered worker's id.")
    gpus: list[str] = Field(
        default_factory=list, description="Its GPUs, e.g. 'NVIDIA H200 (139.8 GiB)'."
    )
    duration_s: float = Field(default=0.0, ge=0, description="Whole deploy, s.")


class TunnelConfig(BaseModel):
    """One supervised ssh tunnel (``ssh -N -L`` from a worker, ``ssh -N -R`` from the manager).

    ``remote/tunnel.py`` turns it into an argv; every field is checked, nothing is a shell string.
    """

    model_config = ConfigDict(extra="forbid")

    direction: Literal["local", "remote"] = Field(description="local: -L (worker); remote: -R.")
    destination: str = Field(description="ssh destination: host, user@host or a Host alias.")
    port: int | None = Field(default=None, ge=1, le=65535, description="sshd port (-p).")
    proxy_jump: str | None = Field(
        default=None,
        description="Jump hosts (-J): comma-separated [ssh://][user@]host[:port], as in the "
        "slot's ssh command.",
    )
    identity_file: str | None = Field(default=None, description="Private key (-i), absolute.")
    more_identity_files: list[str] = Field(
        default_factory=list,
        description="Further private keys (-i), tried after identity_file, as the slot's ssh "
        "command gave them.",
    )
    config_file: str | None = Field(
        default=None, description="ssh config (-F) generated by servetune for this target."
    )
    known_hosts_file: str | None = Field(
        default=None,
        description="UserKnownHostsFile; with strict_host_key_checking 'accept-new', unknown "
        "keys are recorded on first use.",
    )
    strict_host_key_checking: Literal["yes", "accept-new"] = Field(
        default="accept-new",
        description="StrictHostKeyChecking with known_hosts_file: 'yes' (the destination's key "
        "must already be in the file: a worker's forward tunnel, its file written by the deploy "
        "from the manager's own sshd) or 'accept-new' (recorded on first use; the default, for "
        "configs stored before the field).",
    )
    bind_port: int = Field(ge=1, le=65535, description="Port listened on (127.0.0.1 only).")
    target_host: str = Field(description="Where the forwarded connections go (Redis host).")
    target_port: int = Field(ge=1, le=65535, description="Redis port.")
    keepalive_s: int = Field(default=15, ge=1, description="ServerAliveInterval, s.")


class WorkerLaunchConfig(BaseModel):
    """The deployed worker's settings: a JSON file of mode 600 in the install directory, read by
    ``servetune worker --config FILE`` (it holds the Redis password)."""

    model_config = ConfigDict(extra="forbid")

    redis_url: str = Field(description="Redis URL as the worker reaches it (through its tunnel).")
    name: str = Field(description="The worker's name: the slot's name.")
    data_dir: str = Field(description="The worker's data directory (install_dir/data).")
    max_parallel: int = Field(default=1, ge=1, description="Trials it runs at once.")
    tunnel: TunnelConfig | None = Field(
        default=None, description="The forward tunnel it keeps open (RedisVia.FORWARD)."
    )


class WorkerSlotCreate(BaseModel):
    """The body of ``POST /api/worker-slots``."""

    model_config = ConfigDict(extra="forbid")

    name: SlotName = Field(description="Slot name, also the worker's alias (e.g. gpu-host-1).")
    ssh_command: str = Field(
        min_length=1,
        max_length=2000,
        description="The ssh command as you type it: 'ssh -p 2222 -i ~/.ssh/key user@host' "
        "(-J/ProxyJump allowed). Parsed with shlex and resolved with ssh -G, never run by a shell.",
    )
    install_dir: RemotePath = Field(
        default="~/.servetune", description="Remote install directory (venv, data, logs)."
    )
    python: RemotePython = Field(
        default="python3",
        description="Remote interpreter used to install (>= 3.11): a name on PATH or a path.",
    )
    redis_via: RedisVia = Field(
        default=RedisVia.FORWARD, description="How the worker reaches Redis."
    )
    manager_ssh: str | None = Field(
        default=None,
        max_length=300,
        description="forward only: the manager's sshd as the worker reaches it, [user@]host[:port] "
        "(default: the manager's setting manager_ssh).",
    )
    redis_address: str | None = Field(
        default=None,
        max_length=300,
        description="direct only: host:port of the manager's Redis as the worker reaches it.",
    )
    max_parallel: int = Field(
        default=1, ge=1, le=64, strict=True, description="Trials the worker runs at once."
    )
    offline: OfflineMode = Field(default=OfflineMode.AUTO, description="Online or offline install.")


class WorkerSlotUpdate(BaseModel):
    """The body of ``PATCH /api/worker-slots/{id}``: only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    name: SlotName | None = None
    ssh_command: str | None = Field(default=None, min_length=1, max_length=2000)
    install_dir: RemotePath | None = None
    python: RemotePython | None = None
    redis_via: RedisVia | None = None
    manager_ssh: str | None = Field(default=None, max_length=300)
    redis_address: str | None = Field(default=None, max_length=300)
    max_parallel: int | None = Field(default=None, ge=1, le=64, strict=True)
    offline: OfflineMode | None = None


class WorkerSlot(WorkerSlotCreate):
    """A stored slot with its last known state (``GET /api/worker-slots/{id}``)."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(description="Database id.")
    status: SlotStatus = Field(description="Reconciled with the worker registry on every read.")
    worker_id: str | None = Field(default=None, description="Id of its worker, once registered.")
    error: str | None = Field(default=None, description="Last deploy/restore failure, one line.")
    category: Category | None = Field(default=None, description="Its category.")
    suggestion: str | None = Field(default=None, description="How to fix it.")
    last_seen_at: datetime | None = Field(default=None, description="Worker last seen (UTC).")
    deployed_at: datetime | None = Field(default=None, description="Last successful deploy (UTC).")
    created_at: datetime = Field(description="When the slot was saved (UTC).")
    updated_at: datetime = Field(description="Last change (UTC).")


M = TypeVar("M", bound=BaseModel)


def read_config_file(path: Path, model: type[M], *, private: bool = False) -> M:
    """The ``model`` record in the JSON file ``path`` (a ``--config FILE``).

    ``private``: the file holds a secret (a Redis password), so one that group or others may
    read is refused. Raises ValueError naming the file and the fix: ``chmod 600 FILE``, the field
    at fault, or why it cannot be read.
    """
    try:
        if private and (mode := path.stat().st_mode) & 0o077:
            raise ValueError(
                f"--config {path}: open to group or others (mode {mode & 0o777:o}); it holds the "
                f"Redis password: run chmod 600 {path}"
            )
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from e
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        field = ".".join(str(x) for x in first["loc"]) or "(file)"
        raise ValueError(f"--config {path}: {field}: {first['msg']}") from None
