"""Persistence of studies and trials: SQLAlchemy 2 tables, a repository, Alembic migrations.

``StudyStore(url)`` is the entry point (SQLite file by default, PostgreSQL through psycopg).
"""

from servetune.store.repo import StudyRecord, StudyStatus, StudyStore

__all__ = ["StudyRecord", "StudyStatus", "StudyStore"]
