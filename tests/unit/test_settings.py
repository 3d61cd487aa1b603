"""Unit tests of Settings: per-user defaults, SERVETUNE_ environment variables, explicit values.

The database URL follows the data directory unless it is given itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from servetune.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No SERVETUNE_ variables from the caller; the per-user data dir lives under tmp_path."""
    monkeypatch.delenv("SERVETUNE_DATA_DIR", raising=False)
    monkeypatch.delenv("SERVETUNE_DB_URL", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return tmp_path


def test_defaults_live_in_the_user_data_dir(clean_env: Path) -> None:
    s = Settings()
    base = clean_env / "xdg" / "servetune"
    assert s.data_dir == base
    assert s.db_url == f"sqlite:///{base / 'servetune.db'}"
    assert s.logs_dir == base / "logs"


def test_data_dir_from_env_moves_the_database_and_logs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SERVETUNE_DATA_DIR", str(tmp_path / "st"))
    s = Settings()
    assert s.data_dir == tmp_path / "st"
    assert s.db_url == f"sqlite:///{tmp_path / 'st' / 'servetune.db'}"
    assert s.logs_dir == tmp_path / "st" / "logs"


def test_db_url_from_env_wins(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    monkeypatch.setenv("SERVETUNE_DB_URL", "postgresql://servetune@db.internal/servetune")
    s = Settings()
    assert s.db_url == "postgresql://servetune@db.internal/servetune"
    assert s.data_dir == clean_env / "xdg" / "servetune"


def test_explicit_values_beat_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SERVETUNE_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("SERVETUNE_DB_URL", "sqlite:///from-env.db")
    s = Settings(data_dir=tmp_path / "arg", db_url="sqlite:///from-arg.db")
    assert s.data_dir == tmp_path / "arg"
    assert s.db_url == "sqlite:///from-arg.db"


def test_home_relative_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SERVETUNE_DATA_DIR", "~/servetune-data")
    s = Settings()
    assert s.data_dir == tmp_path / "home" / "servetune-data"
    assert s.db_url == f"sqlite:///{tmp_path / 'home' / 'servetune-data' / 'servetune.db'}"
