"""The running instance of the active control plane (`server run --workers N`: its
workers share one instance id; the one holding the active lock leads, the others serve
changes too).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("control_plane_state") as batch_op:
        batch_op.add_column(sa.Column("active_instance", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("control_plane_state") as batch_op:
        batch_op.drop_column("active_instance")
