"""The remote's facts → the platform names uv and pip take, and the source hash of the cache key."""

from __future__ import annotations

from pathlib import Path

import pytest

from servetune.errors import DeployFailed
from servetune.remote.models import Category, RemoteFacts
from servetune.remote.wheelhouse import platform_target, python_release, source_hash


def test_glibc_x86_64_gives_its_manylinux_triple_and_every_older_tag() -> None:
    target = platform_target("x86_64", "glibc", "2.36")
    assert target.triple == "x86_64-manylinux_2_36"
    assert target.pip_platforms[0] == "manylinux_2_36_x86_64"
    # the older glibc tags and the legacy names old wheels still use (psutil: manylinux2010)
    for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux_2_5_x86_64"):
        assert tag in target.pip_platforms
    assert target.pip_platforms[-3:] == (
        "manylinux2014_x86_64",
        "manylinux2010_x86_64",
        "manylinux1_x86_64",
    )
    # nothing newer than the host's glibc: such a wheel would not load there
    assert "manylinux_2_37_x86_64" not in target.pip_platforms


@pytest.mark.parametrize(
    ("libc_version", "triple"),
    [
        ("2.17", "x86_64-manylinux_2_17"),
        ("2.27", "x86_64-manylinux_2_17"),  # uv knows no 2_18 … 2_27
        ("2.30", "x86_64-manylinux_2_28"),  # nor 2_29, 2_30
        ("2.31", "x86_64-manylinux_2_31"),
        ("2.41", "x86_64-manylinux_2_40"),  # newest uv knows
        ("2.35.1", "x86_64-manylinux_2_35"),
    ],
)
def test_glibc_triple_is_the_newest_uv_knows_that_the_host_can_run(
    libc_version: str, triple: str
) -> None:
    target = platform_target("x86_64", "glibc", libc_version)
    assert target.triple == triple
    minor = libc_version.split(".")[1]
    assert target.pip_platforms[0] == f"manylinux_2_{minor}_x86_64"


def test_aarch64_has_no_pre_2014_tags_and_arm64_is_an_alias() -> None:
    target = platform_target("arm64", "glibc", "2.28")
    assert target.arch == "aarch64"
    assert target.triple == "aarch64-manylinux_2_28"
    assert target.pip_platforms[0] == "manylinux_2_28_aarch64"
    assert target.pip_platforms[-1] == "manylinux2014_aarch64"
    assert not any("manylinux1" in t or "manylinux2010" in t for t in target.pip_platforms)


def test_musl_gives_the_musl_triple_and_musllinux_tags() -> None:
    target = platform_target("x86_64", "musl", "1.2.4")
    assert target.triple == "x86_64-unknown-linux-musl"
    assert target.pip_platforms == ("musllinux_1_2_x86_64", "musllinux_1_1_x86_64")


@pytest.mark.parametrize(
    ("arch", "libc", "version", "named"),
    [
        ("ppc64le", "glibc", "2.36", "ppc64le"),
        ("x86_64", "", "", "libc=''"),
        ("x86_64", "glibc", "2.12", "2.12"),
        ("x86_64", "glibc", "two", "'two'"),
    ],
)
def test_platforms_without_wheels_are_refused_naming_what_was_found(
    arch: str, libc: str, version: str, named: str
) -> None:
    with pytest.raises(DeployFailed) as caught:
        platform_target(arch, libc, version)
    assert caught.value.category is Category.INSTALL_FAILED
    assert named in str(caught.value)
    assert caught.value.suggestion


def _facts(version: str, implementation: str = "cpython") -> RemoteFacts:
    return RemoteFacts(
        hostname="h",
        python_executable="/usr/bin/python3",
        python_version=version,
        implementation=implementation,
        arch="x86_64",
        libc="glibc",
        libc_version="2.36",
        install_dir="/opt/servetune",
        install_dir_writable=True,
        free_disk_gib=10.0,
        has_rsync=True,
        has_tar=True,
    )


def test_python_release_keeps_the_patch_version_for_marker_evaluation() -> None:
    assert python_release(_facts("3.11.2")) == ("3.11.2", "3.11")
    assert python_release(_facts("3.13.0rc1")) == ("3.13.0", "3.13")


def test_an_offline_wheelhouse_needs_cpython() -> None:
    with pytest.raises(DeployFailed) as caught:
        python_release(_facts("3.10.14", implementation="pypy"))
    assert caught.value.category is Category.INSTALL_FAILED
    assert "pypy 3.10.14" in str(caught.value)


def test_source_hash_changes_when_a_source_file_is_edited(tmp_path: Path) -> None:
    package = tmp_path / "src" / "servetune"
    package.mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "servetune"\n')
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text("x = 1\n")
    before = source_hash(tmp_path)
    cache = package / "__pycache__"
    cache.mkdir()
    (cache / "cli.cpython-311.pyc").write_bytes(b"\0")
    assert source_hash(tmp_path) == before  # byte-code is not source
    (package / "cli.py").write_text("x = 2\n")
    edited = source_hash(tmp_path)
    assert edited != before
    (package / "cli.py").rename(package / "main.py")
    assert source_hash(tmp_path) not in (before, edited)  # a rename changes it too


def test_an_index_token_goes_in_the_environment_and_is_masked_in_messages() -> None:
    from servetune.redact import redact as mask_url  # what the bundle's failures say the URL as
    from servetune.remote.wheelhouse import _index_env

    url = "https://alice:Tok3n@index.example/simple"
    env = _index_env(url)
    assert env is not None and env["UV_DEFAULT_INDEX"] == url and env["PIP_INDEX_URL"] == url
    assert _index_env(None) is None
    assert mask_url(url) == "https://alice:***@index.example/simple"
    assert mask_url("https://index.example/simple") == "https://index.example/simple"
