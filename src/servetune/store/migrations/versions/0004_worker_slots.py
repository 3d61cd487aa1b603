"""Worker slots: saved SSH targets where a worker can be deployed or restored.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``worker_slots`` (one row per slot, its name unique)."""
    op.create_table(
        "worker_slots",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column(
            "ssh_command",
            sa.String(length=2000),
            nullable=False,
            comment="The ssh command as the user typed it (parsed, never run by a shell)",
        ),
        sa.Column("install_dir", sa.String(length=1024), nullable=False),
        sa.Column("python", sa.String(length=255), nullable=False),
        sa.Column(
            "redis_via", sa.String(length=16), nullable=False, comment="forward, reverse or direct"
        ),
        sa.Column("manager_ssh", sa.String(length=300), nullable=True),
        sa.Column(
            "redis_address",
            sa.String(length=300),
            nullable=True,
            comment="host:port of Redis as the worker sees it (direct only; no password)",
        ),
        sa.Column("max_parallel", sa.Integer(), nullable=False),
        sa.Column("offline", sa.String(length=16), nullable=False, comment="auto, always or never"),
        sa.Column(
            "status",
            sa.String(length=16),
            nullable=False,
            comment="Last known status (reads reconcile it with the worker registry)",
        ),
        sa.Column("worker_id", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True, comment="Last deploy/restore failure"),
        sa.Column("category", sa.String(length=32), nullable=True),
        sa.Column("suggestion", sa.Text(), nullable=True),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "deployed_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="Last successful deploy/restore",
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_worker_slots")),
        sa.UniqueConstraint("name", name=op.f("uq_worker_slots_name")),
    )


def downgrade() -> None:
    """Drop ``worker_slots`` (the saved slots are lost; workers already deployed keep running)."""
    op.drop_table("worker_slots")
