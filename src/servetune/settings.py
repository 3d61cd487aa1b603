"""Process settings (pydantic-settings, environment prefix SERVETUNE_), built once and passed in.

Nothing reads settings from a module global: entry points build ``Settings()`` and hand it down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import platformdirs
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    """The per-user data directory: ``platformdirs.user_data_dir("servetune")``.

    e.g. ``~/.local/share/servetune`` on Linux (honours ``XDG_DATA_HOME``).
    """
    return Path(platformdirs.user_data_dir("servetune"))


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of a SQLite file at ``path`` (made absolute)."""
    return f"sqlite:///{path.expanduser().absolute()}"


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
