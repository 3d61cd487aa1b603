"""Study lease: which process owns a study, on which host, until when.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (
    "lease_owner",
    "lease_host",
    "lease_pid",
    "lease_acquired_at",
    "lease_renewed_at",
    "lease_expires_at",
)


def upgrade() -> None:
    """Add the nullable lease columns to ``studies`` (every existing study starts free)."""
    with op.batch_alter_table("studies") as batch:
        batch.add_column(
            sa.Column(
                "lease_owner",
                sa.String(length=64),
                nullable=True,
                comment="Id of the process run that owns the study now (null = free)",
            )
        )
        batch.add_column(
            sa.Column(
                "lease_host",
                sa.String(length=255),
                nullable=True,
                comment="Host of the lease owner",
            )
        )
        batch.add_column(
            sa.Column(
                "lease_pid", sa.Integer(), nullable=True, comment="Process id of the lease owner"
            )
        )
        batch.add_column(sa.Column("lease_acquired_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("lease_renewed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column(
                "lease_expires_at",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="The lease is free for anyone to take after this (UTC)",
            )
        )


def downgrade() -> None:
    """Drop the lease columns."""
    with op.batch_alter_table("studies") as batch:
        for name in reversed(_COLUMNS):
            batch.drop_column(name)
