"""Process settings (pydantic-settings, environment prefix SERVETUNE_), built once and passed in.

Nothing reads settings from a module global: entry points build ``Settings()`` and hand it down.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from servetune.errors import PathOutside


def default_data_dir() -> Path:
    """The per-user data directory: ``platformdirs.user_data_dir("servetune")``.

    e.g. ``~/.local/share/servetune`` on Linux (honours ``XDG_DATA_HOME``).
    """
    return Path(platformdirs.user_data_dir("servetune"))


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of a SQLite file at ``path`` (made absolute)."""
    return f"sqlite:///{path.expanduser().absolute()}"


def path_under(base: Path, *parts: str) -> Path:
    """``base / parts``, checked to stay inside ``base``; the resolved path.

    Every path built from a name (a study's log folder, its report) goes through here, so a
    name such as ``../x``, ``sub/dir`` or ``/srv/x`` can never write outside ``base``: each part
    must be one plain path component (no separator, not ``.``/``..``/empty), and the resolved
    path (symlinks followed) must lie under the resolved ``base``. Raises PathOutside naming
    the name and both paths.
    """
    root = base.expanduser().resolve()
    for part in parts:
        if part in ("", ".", "..") or "/" in part or (os.altsep and os.altsep in part):
            raise PathOutside(
                f"{part!r} is not a plain name: it would put files outside {root} or in a "
                "folder under it; use letters, digits, '.', '_' and '-' only"
            )
    path = root.joinpath(*parts).resolve()
    if path == root or not path.is_relative_to(root):
        raise PathOutside(
            f"{'/'.join(parts)!r} would put {path} outside {root} (a symbolic link?); "
            "use a plain name (letters, digits, '.', '_', '-')"
        )
    return path


class Settings(BaseSettings):
    """Where servetune keeps its data; every field can be set as ``SERVETUNE_<FIELD>``.

    ``data_dir`` defaults to ``default_data_dir()``; ``db_url`` defaults to the SQLite file
    ``<data_dir>/servetune.db`` (so moving ``data_dir`` moves the database too); engine logs of
    trials go under ``logs_dir`` = ``<data_dir>/logs``.
    """

    model_config = SettingsConfigDict(env_prefix="SERVETUNE_", extra="ignore")

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Base directory for the database, trial logs, reports and demo models.",
    )
    db_url: str = Field(
        description="SQLAlchemy URL of the store: sqlite:///path/servetune.db (default, under "
        "data_dir) or postgresql://user@host/dbname.",
    )

    lease_ttl_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How long a study's lease lasts unless renewed, in s. The running process "
        "renews it every third of this; another process may take a study over once its "
        "owner has not renewed it for this long (a killed owner on another host).",
    )
    host_name: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=255,
        description="The name this process gives as its host in study leases "
        "(default: the machine's host name). On the same host a lease of a gone pid is "
        "taken over at once; from another host only once it expires.",
    )
    log_max_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1024,
        description="servetune.log is rotated when it would grow past this many bytes.",
    )
    log_backup_count: int = Field(
        default=3,
        ge=0,
        le=100,
        description="How many rotated servetune.log files (servetune.log.1, …) are kept.",
    )

    # ---- the fleet (manager and workers) ------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Redis URL of the fleet (redis://[:password@]host:port/db, rediss:// for "
        "TLS). A manager without one starts a private redis-server when one is on PATH.",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="Bearer token the manager's API requires (Authorization: Bearer <token>). "
        "Required when the manager is bound beyond loopback; never logged.",
    )
    heartbeat_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="A worker's heartbeat period, s; three missed heartbeats mark it offline.",
    )
    gpu_history_len: int = Field(
        default=120,
        ge=1,
        le=10_000,
        description="GPU samples kept per worker (one per heartbeat).",
    )
    worker_log_maxlen: int = Field(
        default=500,
        ge=1,
        le=1_000_000,
        description="Log records kept per worker in Redis (the newest ones).",
    )
    worker_log_ttl_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="A worker's stored log records expire after this long without a new one, s.",
    )
    log_queue_max: int = Field(
        default=10_000,
        ge=1,
        description="Log records a worker buffers in memory while shipping; beyond it, records "
        "are dropped and counted (never blocking the caller).",
    )

    # ---- worker slots (deploying workers over SSH) --------------------------------------
    manager_ssh: str | None = Field(
        default=None,
        max_length=300,
        description="The manager's sshd as deployed workers reach it, [user@]host[:port]: their "
        "Redis tunnel (redis_via=forward) goes there. A slot may override it.",
    )
    authorized_keys_path: Path = Field(
        default_factory=lambda: Path.home() / ".ssh" / "authorized_keys",
        description="The authorized_keys file of the manager's sshd where deploy adds each "
        "worker's tunnel key (restricted to forwarding to Redis only) and delete removes it.",
    )
    package_index_url: str = Field(
        default="https://pypi.org/simple",
        description="Package index the remotes install from when online (probed from the remote "
        "first; --offline auto falls back to a shipped wheelhouse when it does not answer).",
    )
    ssh_connect_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="ssh ConnectTimeout for every deploy call, s."
    )
    deploy_install_timeout_s: float = Field(
        default=1800.0, gt=0, description="Longest a remote install (or wheelhouse build) runs, s."
    )
    register_timeout_s: float = Field(
        default=120.0, gt=0, description="How long a deploy waits for its worker to register, s."
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Expand ``~`` in data_dir and derive db_url from it when db_url is not given."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        data_dir = Path(data.get("data_dir") or default_data_dir()).expanduser()
        data["data_dir"] = data_dir
        if not data.get("db_url"):
            data["db_url"] = sqlite_url(data_dir / "servetune.db")
        return data

    @property
    def logs_dir(self) -> Path:
        """Where trial engine logs and servetune's own log go: ``<data_dir>/logs``."""
        return self.data_dir / "logs"

    @property
    def ssh_dir(self) -> Path:
        """servetune's own ssh files (known_hosts, generated configs): ``<data_dir>/ssh``."""
        return self.data_dir / "ssh"

    @property
    def wheelhouse_dir(self) -> Path:
        """Built wheels and offline wheelhouses, per target: ``<data_dir>/wheelhouse``."""
        return self.data_dir / "wheelhouse"

    @property
    def reports_dir(self) -> Path:
        """Where study reports and the shared plotly.js go: ``<data_dir>/reports``."""
        return self.data_dir / "reports"

    def study_logs_dir(self, name: str) -> Path:
        """The folder of one study's engine logs, ``<logs_dir>/<name>``; raises PathOutside."""
        return path_under(self.logs_dir, name)

    def report_path(self, name: str) -> Path:
        """The study's report, ``<reports_dir>/<name>.html``; raises PathOutside."""
        return path_under(self.reports_dir, f"{name}.html")
