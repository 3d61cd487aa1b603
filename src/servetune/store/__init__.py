"""Persistence of studies and trials: SQLAlchemy 2 tables, a repository, Alembic migrations."""
