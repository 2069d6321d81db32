"""Metric rows gain a layer index and a training step, for the probes' per-layer and per-step
values (activation variance per block, gradient norms per convolution, landscape probes every K
steps), so they are rows like any metric.

Both columns are -1 on every row written before (a whole-run, whole-model value), and the unique
key of a metric row includes them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

KEY = ["run_id", "name", "split", "corruption", "severity"]


def upgrade() -> None:
    # Batch mode recreates the table on SQLite (which cannot change a constraint in place).
    with op.batch_alter_table("metrics") as batch:
        batch.add_column(sa.Column("layer", sa.Integer, nullable=False, server_default="-1"))
        batch.add_column(sa.Column("step", sa.Integer, nullable=False, server_default="-1"))
        batch.drop_constraint("uq_metric_row", type_="unique")
        batch.create_unique_constraint("uq_metric_row", [*KEY, "layer", "step"])


def downgrade() -> None:
    # Per-layer and per-step rows have no place in the older schema.
    op.execute("DELETE FROM metrics WHERE layer != -1 OR step != -1")
    with op.batch_alter_table("metrics") as batch:
        batch.drop_constraint("uq_metric_row", type_="unique")
        batch.create_unique_constraint("uq_metric_row", KEY)
        batch.drop_column("step")
        batch.drop_column("layer")
