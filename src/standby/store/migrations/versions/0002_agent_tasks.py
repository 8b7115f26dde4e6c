"""Agent tasks (work the control plane hands to agents) and a policy's RPO alert threshold.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agent_tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("bytes_done", sa.BigInteger(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_type", sa.String(length=80), nullable=True),
        sa.Column("item_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('cancelled', 'claimed', 'expired', 'failed', 'queued', 'succeeded')",
            name=op.f("ck_agent_tasks_state"),
        ),
        sa.CheckConstraint("progress BETWEEN 0 AND 100", name=op.f("ck_agent_tasks_progress")),
        sa.CheckConstraint("attempt >= 0", name=op.f("ck_agent_tasks_attempt")),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_agent_tasks_agent_id"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["item_id"], ["protected_items.id"], name=op.f("fk_agent_tasks_item_id"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_agent_tasks_job_id"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_tasks")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_agent_tasks_agent_state", "agent_tasks", ["agent_id", "state"])
    op.create_index("ix_agent_tasks_state_deadline", "agent_tasks", ["state", "deadline_at"])
    op.create_index("ix_agent_tasks_item_kind_state", "agent_tasks", ["item_id", "kind", "state"])
    op.create_index(op.f("ix_agent_tasks_job_id"), "agent_tasks", ["job_id"])
    op.create_index(op.f("ix_agent_tasks_finished_at"), "agent_tasks", ["finished_at"])

    # SQLite cannot add a CHECK constraint in place: batch mode rebuilds the table there
    # (named constraints are carried over; store.db.upgrade keeps foreign keys off meanwhile).
    with op.batch_alter_table("policies") as batch_op:
        batch_op.add_column(sa.Column("rpo_alert_seconds", sa.Integer(), nullable=True))
        batch_op.create_check_constraint(
            op.f("ck_policies_rpo_alert"), "rpo_alert_seconds IS NULL OR rpo_alert_seconds > 0"
        )


def downgrade() -> None:
    with op.batch_alter_table("policies") as batch_op:
        batch_op.drop_constraint(op.f("ck_policies_rpo_alert"), type_="check")
        batch_op.drop_column("rpo_alert_seconds")
    op.drop_table("agent_tasks")
