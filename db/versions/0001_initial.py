"""Initial results schema: runs, metrics, curve points.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

RUN_STATUS = sa.Enum(
    "running",
    "finished",
    "failed",
    "diverged",
    "interrupted",
    name="run_status",
    native_enum=False,
    length=16,
)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_key", sa.String(64), nullable=False, unique=True),
        sa.Column("suite", sa.String(128), nullable=False),
        sa.Column("budget", sa.String(32), nullable=False),
        sa.Column("protocol_version", sa.Integer, nullable=False),
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("norm", sa.String(128), nullable=False),
        sa.Column("optimizer", sa.String(128), nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("status", RUN_STATUS, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("diverged_step", sa.Integer),
        sa.Column("epochs_done", sa.Integer, nullable=False),
        sa.Column("device", sa.String(256)),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("provenance", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime),
    )
    op.create_index("ix_runs_suite_budget_status", "runs", ["suite", "budget", "status"])
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("split", sa.String(32), nullable=False),
        sa.Column("corruption", sa.String(64), nullable=False),
        sa.Column("severity", sa.Integer, nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.UniqueConstraint(
            "run_id", "name", "split", "corruption", "severity", name="uq_metric_row"
        ),
    )
    op.create_index(
        "ix_metrics_lookup", "metrics", ["name", "split", "corruption", "severity", "run_id"]
    )
    op.create_table(
        "curve_points",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.UniqueConstraint("run_id", "epoch", "name", name="uq_curve_point"),
    )


def downgrade() -> None:
    op.drop_table("curve_points")
    op.drop_index("ix_metrics_lookup", table_name="metrics")
    op.drop_table("metrics")
    op.drop_index("ix_runs_suite_budget_status", table_name="runs")
    op.drop_table("runs")
