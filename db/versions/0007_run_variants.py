"""Runs gain a variant: a short label for a setting a suite sweeps within one norm and optimizer
(a label-noise setting such as "symmetric 40%", a batch size such as "batch 8"). The leaderboard
groups runs by norm, optimizer and variant, so the variants of one pair are ranked side by side.

Every run written before has the empty variant (a suite that sweeps nothing).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode recreates the table on SQLite where it cannot alter it in place.
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("variant", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("variant")
