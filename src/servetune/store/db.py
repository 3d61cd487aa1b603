"""Database connections for the store: URL rules, engine set-up per dialect, Alembic upgrades.

SQLite (the default, one file) and PostgreSQL (through psycopg 3) are supported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from servetune.errors import StoreError

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite connection waits for another process's write lock before failing, in s."""

MIGRATIONS = "servetune.store:migrations"
"""Alembic ``script_location`` of the migrations shipped inside the package."""

_PG_MIGRATION_LOCK = 0x5E7E7E0E
"""Key of the PostgreSQL advisory lock held while migrating (any constant unique to servetune)."""


def normalize_url(url: str) -> URL:
    """Parse ``url`` and pick servetune's driver: psycopg 3 for PostgreSQL, pysqlite for SQLite.

    ``postgresql://`` and ``postgres://`` become ``postgresql+psycopg://``; ``~`` in a SQLite
    path is expanded. Raises StoreError for an unparsable URL or another database.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise StoreError(
            f"cannot parse database URL {url!r}: {e}; "
            "use sqlite:///path/to/servetune.db or postgresql://user@host/dbname"
        ) from e
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise StoreError(
                f"database URL {_safe(parsed)}: driver {driver!r} is not supported; "
                "use postgresql:// (servetune uses psycopg 3)"
            )
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise StoreError(
                f"database URL {_safe(parsed)}: driver {driver!r} is not supported; use sqlite:///"
            )
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:") and db.startswith("~"):
            parsed = parsed.set(database=str(Path(db).expanduser()))
        return parsed.set(drivername="sqlite+pysqlite")
    raise StoreError(
        f"database URL {_safe(parsed)}: {backend!r} is not supported; "
        "use sqlite:///path/to/servetune.db or postgresql://user@host/dbname"
    )


def _safe(url: URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    return url.render_as_string(hide_password=True)


def describe(e: SQLAlchemyError) -> str:
    """A short readable form of a SQLAlchemy error: the driver's own message when there is one.

    ``str(e)`` would repeat the whole SQL statement and its parameters (a trial's JSON), so
    the driver error is shown instead; the full error stays chained (``raise ... from e``).
    """
    if isinstance(e, DBAPIError) and e.orig is not None:
        return f"{type(e.orig).__name__}: {str(e.orig).strip()}"
    return str(e).split("\n[SQL:", 1)[0].strip()


def _json_dumps(obj: Any) -> str:
    """JSON text for the JSON columns; NaN/±inf become the strings pydantic reads back as floats.

    PostgreSQL rejects the bare ``NaN``/``Infinity`` tokens Python writes, so they are quoted
    ("NaN", "Infinity", "-Infinity"); pydantic float fields accept those strings on load.
    """
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError:
        return json.dumps(_quote_non_finite(obj), allow_nan=False)


def _quote_non_finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _quote_non_finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_quote_non_finite(v) for v in obj]
    return obj


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite ``url`` (None for PostgreSQL, in-memory and ``file:`` URIs)."""
    parsed = normalize_url(url)
    db = parsed.database
    if parsed.get_backend_name() != "sqlite" or not db or db == ":memory:":
        return None
    if db.startswith("file:") or "mode=memory" in db:
        return None
    return Path(db)


def cannot_write(path: Path) -> bool:
    """True when ``path`` exists and this process may not write it or its folder (read-only
    mount, permissions): a SQLite database there can only be opened read-only."""
    return path.exists() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def make_engine(url: str, read_only: bool = False) -> Engine:
    """A SQLAlchemy engine for ``url`` (see ``normalize_url``), set up for servetune's use.

    SQLite: creates the parent directory, uses WAL, foreign keys, a busy timeout of
    ``SQLITE_BUSY_TIMEOUT_S``, and ``BEGIN IMMEDIATE`` for every transaction, so writers queue
    on the lock instead of failing mid-transaction (SQLAlchemy's documented recipe for taking
    over pysqlite's transaction control). ``sqlite://`` (in memory) keeps one shared connection.
    ``read_only`` (SQLite files only): opens the file with ``?mode=ro`` (falling back to
    ``immutable=1`` when its WAL side files cannot be created, e.g. on a read-only mount; see
    sqlite.org/wal.html "Read-Only Databases"), creates nothing and begins plain transactions.
    PostgreSQL: psycopg 3 with pre-ping. Raises StoreError when the directory cannot be made.
    """
    parsed = normalize_url(url)
    kwargs: dict[str, Any] = {"json_serializer": _json_dumps}
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        in_memory = not db or db == ":memory:" or "mode=memory" in db
        file = sqlite_file(url)
        if read_only and file is not None:
            engine = create_engine(
                "sqlite+pysqlite://",
                creator=lambda: _connect_read_only(file),
                json_serializer=_json_dumps,
            )
            _sqlite_setup(engine, wal=False, immediate=False)
            return engine
        if not in_memory and db and not db.startswith("file:"):
            try:
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the directory of the SQLite file {db}: {e}") from e
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
        if in_memory:
            kwargs["poolclass"] = StaticPool
        engine = create_engine(parsed, **kwargs)
        _sqlite_setup(engine, wal=not in_memory)
        return engine
    return create_engine(parsed, pool_pre_ping=True, **kwargs)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the SQLite file ``path``: ``mode=ro``, else ``immutable=1``."""
    uri = "file:" + urllib.parse.quote(str(path.absolute()))
    for query in ("mode=ro", "mode=ro&immutable=1"):
        conn = sqlite3.connect(
            f"{uri}?{query}", uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False
        )
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            conn.close()
            if "immutable" in query:
                raise
    raise AssertionError("unreachable")


def _sqlite_setup(engine: Engine, wal: bool, immediate: bool = True) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = dbapi_connection.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA foreign_keys = ON")
            if wal:
                cur.execute("PRAGMA journal_mode = WAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic ``Config`` for the shipped migrations, no ``alembic.ini`` needed.

    Give an open ``connection`` (used as is, inside its transaction) or a ``url``. Developers
    make a new revision with
    ``command.revision(alembic_config(url="sqlite:///x.db"), autogenerate=True, message="...")``.
    """
    from alembic.config import Config  # imported when migrating only: ~0.3 s per process

    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    if connection is not None:
        cfg.attributes["connection"] = connection
    if url is not None:
        cfg.attributes["url"] = normalize_url(url)
    return cfg


HEAD_REVISION = "0004"
"""The newest shipped migration's revision id: a new migration changes it (a test compares it with
Alembic's head). Known without importing Alembic, so opening an up-to-date database does not pay
for Alembic (about 0.3 s per process: every CLI command, worker and manager)."""


def head_revision() -> str:
    """The newest revision id of the shipped migrations (``HEAD_REVISION``)."""
    return HEAD_REVISION


def _revision_of(conn: Connection) -> str | None:
    """The revision recorded in ``alembic_version`` (what Alembic's ``MigrationContext``
    reads); None when the table is missing or empty."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database). Raises StoreError."""
    try:
        with engine.connect() as conn:
            return _revision_of(conn)
    except SQLAlchemyError as e:
        raise StoreError(f"reading the schema version of {_safe(engine.url)}: {describe(e)}") from e


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest schema (``alembic upgrade head``); idempotent.

    The whole upgrade runs in one transaction that first takes a lock, so processes opening
    the same database at once migrate it one after the other: SQLite's write lock
    (``BEGIN IMMEDIATE``, DDL is transactional) or a PostgreSQL advisory transaction lock.
    Raises StoreError naming the database when it fails, or when the database has a schema
    revision this servetune does not know (written by a newer servetune).
    """
    try:
        if _up_to_date(engine):
            return
    except SQLAlchemyError as e:
        raise StoreError(
            f"opening the database {_safe(engine.url)} (schema upgrade): {describe(e)}"
        ) from e
    from alembic import command  # imported when migrating only: ~0.3 s per process
    from alembic.util import CommandError

    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                lock = text("SELECT pg_advisory_xact_lock(:key)")
                conn.execute(lock, {"key": _PG_MIGRATION_LOCK})
            command.upgrade(alembic_config(connection=conn), "head")
    except SQLAlchemyError as e:
        raise StoreError(
            f"opening the database {_safe(engine.url)} (schema upgrade): {describe(e)}"
        ) from e
    except CommandError as e:
        raise StoreError(
            f"opening the database {_safe(engine.url)}: its schema is unknown to this servetune "
            f"(newest known revision {head_revision()}): {e}; "
            "upgrade servetune, or use another database"
        ) from e


def check_current(engine: Engine) -> None:
    """Raise StoreError unless the schema is at head: for a database opened read-only, which
    cannot be upgraded. The message names both revisions and how to upgrade it."""
    current = current_revision(engine)
    if current == head_revision():
        return
    raise StoreError(
        f"the database {_safe(engine.url)} is read-only here and its schema is at revision "
        f"{current or '(none)'}, while this servetune needs {head_revision()}; it cannot be "
        "upgraded without write access: run any servetune command on it once with write "
        "access (e.g. `servetune list`), or read it with the servetune that wrote it"
    )


def _up_to_date(engine: Engine) -> bool:
    """True when the schema is already at head (the common case: no write lock needed)."""
    with engine.connect() as conn:
        current = _revision_of(conn)
    return current is not None and current == head_revision()
