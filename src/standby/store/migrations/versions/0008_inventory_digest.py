"""The digest of each host's and VM's inventory entry as the agent last sent it in full
(`PUT /agent/inventory`): a later report lists an unchanged VM by its digest only.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-14
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("hosts", "vms"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("inventory_digest", sa.String(64), nullable=True))


def downgrade() -> None:
    for table in ("hosts", "vms"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("inventory_digest")
