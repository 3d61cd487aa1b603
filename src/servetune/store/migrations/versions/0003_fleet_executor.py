"""Fleet columns: who runs a study's trials (executor) and which worker ran each trial.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``studies.executor`` (every existing study is "local") and ``trials.worker_id``."""
    with op.batch_alter_table("studies") as batch:
        batch.add_column(
            sa.Column(
                "executor",
                sa.String(length=16),
                nullable=False,
                server_default="local",
                comment="Who runs its trials: local (servetune run) or manager (workers over Redis)",
            )
        )
    with op.batch_alter_table("trials") as batch:
        batch.add_column(
            sa.Column(
                "worker_id",
                sa.String(length=64),
                nullable=True,
                comment="Worker that ran the trial (null: run in the study's own process)",
            )
        )


def downgrade() -> None:
    """Drop the fleet columns.

    On SQLite with ``ALTER TABLE … DROP COLUMN`` (SQLite 3.35+), not a batch copy: copying
    ``studies`` drops the old table, and with foreign keys on that deletes every trial (ON
    DELETE CASCADE).
    """
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE trials DROP COLUMN worker_id")
        op.execute("ALTER TABLE studies DROP COLUMN executor")
        return
    op.drop_column("trials", "worker_id")
    op.drop_column("studies", "executor")
