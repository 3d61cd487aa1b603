"""Unit tests of Settings: per-user defaults, SERVETUNE_ environment variables, explicit values.

The database URL follows the data directory unless it is given itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from servetune.core.spec import StudySpec, check_study_name
from servetune.errors import PathOutside
from servetune.settings import Settings, path_under


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


@pytest.mark.parametrize("name", ["../x", "sub/dir", "/srv/x/abs", "..", "", "a/../../b"])
def test_path_under_refuses_a_name_that_leaves_its_folder(name: str, tmp_path: Path) -> None:
    with pytest.raises(PathOutside, match="outside"):
        path_under(tmp_path / "reports", name)
    assert not (tmp_path / "reports").exists()


def test_path_under_follows_symlinks_before_checking(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PathOutside):
        path_under(tmp_path / "reports", "link")
    assert path_under(tmp_path / "reports", "a.b-c_d.html") == (
        tmp_path / "reports" / "a.b-c_d.html"
    )


def test_study_paths_are_checked(clean_env: Path) -> None:
    s = Settings(data_dir=clean_env / "d")
    assert s.report_path("run-1") == (clean_env / "d" / "reports" / "run-1.html").resolve()
    assert s.study_logs_dir("run-1") == (clean_env / "d" / "logs" / "run-1").resolve()
    with pytest.raises(PathOutside):
        s.report_path("../../etc/passwd")


@pytest.mark.parametrize("name", ["../x", "sub/dir", "/srv/x/abs", "2024", ".hidden", "a b"])
def test_one_name_rule_for_every_source(name: str) -> None:
    with pytest.raises(ValueError, match="study name"):
        check_study_name(name)
    with pytest.raises(ValidationError, match="study name"):
        StudySpec.model_validate({"name": name})


def test_lease_ttl_and_log_sizes_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVETUNE_LEASE_TTL_S", "2.5")
    monkeypatch.setenv("SERVETUNE_LOG_MAX_BYTES", "4096")
    monkeypatch.setenv("SERVETUNE_HOST_NAME", "gpu-7")
    s = Settings()
    assert (s.lease_ttl_s, s.log_max_bytes, s.host_name) == (2.5, 4096, "gpu-7")
    monkeypatch.setenv("SERVETUNE_LEASE_TTL_S", "0")
    with pytest.raises(ValidationError, match="lease_ttl_s"):
        Settings()
