"""A policy's keep_all_points_minutes: every recovery point of the last N minutes is kept
(a Standby extension; 0, the default, is the reference's hourly points only).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
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
    # SQLite cannot add a CHECK constraint in place: batch mode rebuilds the table there
    # (as 0002 did). The server default fills the existing rows with 0 (reference behaviour).
    with op.batch_alter_table("policies") as batch_op:
        batch_op.add_column(
            sa.Column("keep_all_points_minutes", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.create_check_constraint(
            op.f("ck_policies_keep_all_points"), "keep_all_points_minutes BETWEEN 0 AND 1440"
        )


def downgrade() -> None:
    with op.batch_alter_table("policies") as batch_op:
        batch_op.drop_constraint(op.f("ck_policies_keep_all_points"), type_="check")
        batch_op.drop_column("keep_all_points_minutes")
