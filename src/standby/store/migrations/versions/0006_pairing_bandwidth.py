"""A site pair's bandwidth schedule: the time windows and rates that every replication
cycle of the pairing's agents shares (empty: unlimited).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("cloud_pairings") as batch_op:
        batch_op.add_column(sa.Column("bandwidth_schedule", sa.String(500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cloud_pairings") as batch_op:
        batch_op.drop_column("bandwidth_schedule")
