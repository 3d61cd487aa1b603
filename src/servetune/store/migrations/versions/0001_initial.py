"""Initial schema: the studies and trials tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``studies`` and ``trials`` with their indexes."""
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("engine_kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False, comment="StudySpec.model_dump(mode='json')"),
        sa.Column("spec_source", sa.JSON(), nullable=False, comment="The document the user wrote"),
        sa.Column("verdict", sa.JSON(), nullable=True, comment="Confirm/repeat summary at the end"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("name", name=op.f("uq_studies_name")),
    )
    op.create_index(op.f("ix_studies_status"), "studies", ["status"], unique=False)

    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("repeat_of", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("failure_kind", sa.String(length=32), nullable=True),
        sa.Column("feasible", sa.Boolean(), nullable=False),
        sa.Column(
            "objective_value",
            sa.Float(),
            nullable=True,
            comment="First objective term's value (a copy of result.objective_values[0])",
        ),
        sa.Column(
            "result", sa.JSON(), nullable=True, comment="TrialResult.model_dump(mode='json')"
        ),
        sa.Column("pid", sa.Integer(), nullable=True, comment="Engine process id while RUNNING"),
        sa.Column(
            "pgid", sa.Integer(), nullable=True, comment="Engine process group id while RUNNING"
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_trials_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trials")),
        sa.UniqueConstraint("study_id", "number", name=op.f("uq_trials_study_id_number")),
    )
    op.create_index(op.f("ix_trials_failure_kind"), "trials", ["failure_kind"], unique=False)
    op.create_index(
        "ix_trials_study_id_feasible_objective_value",
        "trials",
        ["study_id", "feasible", "objective_value"],
        unique=False,
    )
    op.create_index("ix_trials_study_id_state", "trials", ["study_id", "state"], unique=False)


def downgrade() -> None:
    """Drop both tables (and every study in them)."""
    op.drop_table("trials")
    op.drop_table("studies")
