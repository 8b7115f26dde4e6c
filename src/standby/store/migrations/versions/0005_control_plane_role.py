"""The control plane's role in a two-site deployment: one row saying which control plane
is active and at which epoch (bumped by every promotion; agents follow the highest).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "control_plane_state",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("epoch", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("active_name", sa.String(128), nullable=True),
        sa.Column("active_url", sa.String(512), nullable=True),
        sa.Column("active_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("id = 1", name=op.f("ck_control_plane_state_one_row")),
        sa.CheckConstraint("epoch >= 1", name=op.f("ck_control_plane_state_epoch")),
    )
    op.execute("INSERT INTO control_plane_state (id, epoch) VALUES (1, 1)")


def downgrade() -> None:
    op.drop_table("control_plane_state")
