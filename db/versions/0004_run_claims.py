"""Runs are claimed by an owner with a heartbeat, so several processes can share one database;
norm and optimizer names get room for a submission's name with options.

``heartbeat`` is in epoch seconds of the database's clock. Rows written before this revision get
their ``updated_at`` as heartbeat (it was written in UTC), so a finished run keeps the time it was
last written and an old ``running`` row counts as a stale claim.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: ``updated_at`` (naive UTC) as epoch seconds, per dialect.
EPOCH_OF_UPDATED_AT = {
    "sqlite": "(julianday(updated_at) - 2440587.5) * 86400.0",
    "postgresql": "extract(epoch from updated_at)",
}


def upgrade() -> None:
    # Batch mode recreates the SQLite tables (SQLite cannot change a column's type in place);
    # PostgreSQL alters them directly.
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("owner", sa.String(128)))
        batch.add_column(sa.Column("heartbeat", sa.Float))
        batch.alter_column("norm", type_=sa.String(256), existing_nullable=False)
        batch.alter_column("optimizer", type_=sa.String(256), existing_nullable=False)
    with op.batch_alter_table("norm_speed") as batch:
        batch.alter_column("norm", type_=sa.String(256), existing_nullable=False)
    epoch = EPOCH_OF_UPDATED_AT.get(op.get_bind().dialect.name)
    if epoch is not None:
        op.execute(f"UPDATE runs SET heartbeat = {epoch} WHERE heartbeat IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("norm_speed") as batch:
        batch.alter_column("norm", type_=sa.String(160), existing_nullable=False)
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("optimizer", type_=sa.String(128), existing_nullable=False)
        batch.alter_column("norm", type_=sa.String(128), existing_nullable=False)
        batch.drop_column("heartbeat")
        batch.drop_column("owner")
