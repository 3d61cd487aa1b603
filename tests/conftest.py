"""Fixtures shared by every test: the tiny generated model (GGUF + tokenizer, made once a session).

Tests that start engines use it with the real llama.cpp server (xllamacpp), never a mock.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from servetune.modelgen import ModelFiles, make_model
from tests.redis_server import RedisServer, redis_server
from tests.sshd import client_key, loopback_host, netns_remote  # noqa: F401 (fixtures)

PG_ADMIN_URL = os.environ.get(
    "SERVETUNE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
"""A PostgreSQL URL of a role allowed to create databases (trust auth on the test machine)."""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    """The tiny random-weight Llama model (about 15 MB, seed 0), generated once per test session."""
    return make_model("tiny", tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """URL of a new, empty PostgreSQL database on the machine's server; dropped after the test."""
    admin = psycopg.conninfo.conninfo_to_dict(PG_ADMIN_URL)
    name = f"servetune_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    user = admin.get("user", "postgres")
    host = admin.get("host", "127.0.0.1")
    port = admin.get("port", "5432")
    try:
        yield f"postgresql://{user}@{host}:{port}/{name}"  # plain scheme: the store picks psycopg
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(name)))


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free port (no persistence), killed after the test."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server
