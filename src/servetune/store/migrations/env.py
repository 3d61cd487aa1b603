"""Alembic environment of the store's migrations, configured from code (no alembic.ini).

Runs on the connection ``servetune.store.db.upgrade`` passes in ``config.attributes``, or on a
URL given the same way (``alembic_config(url=...)``); never configures logging handlers.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from servetune.store.db import make_engine
from servetune.store.tables import Base

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate on the given connection, or open one from the given URL."""
    attributes = context.config.attributes
    connection = attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = attributes.get("url")
    if url is None:
        raise RuntimeError("servetune migrations need a connection or url in config.attributes")
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("servetune migrations run online only (servetune opens the database itself)")
run_migrations_online()
