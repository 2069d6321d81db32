"""Submitted norms (source, hash, contract report) and the norm speed table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "submissions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(160), nullable=False, unique=True),
        sa.Column("base_name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("class_name", sa.String(128), nullable=False),
        sa.Column("file_name", sa.String(256), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("source_sha256", sa.String(64), nullable=False),
        sa.Column("contract", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("base_name", "version", name="uq_submission_version"),
        sa.UniqueConstraint("base_name", "source_sha256", name="uq_submission_source"),
    )
    op.create_table(
        "norm_speed",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("norm", sa.String(160), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("batch_size", sa.Integer, nullable=False),
        sa.Column("device", sa.String(256), nullable=False),
        sa.Column("images_per_s", sa.Float, nullable=False),
        sa.Column("ratio_to_batchnorm", sa.Float, nullable=False),
        sa.Column("peak_memory_mb", sa.Float),
        sa.Column("param_count", sa.Integer, nullable=False),
        sa.Column("provenance", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_norm_speed_norm", "norm_speed", ["norm", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_norm_speed_norm", table_name="norm_speed")
    op.drop_table("norm_speed")
    op.drop_table("submissions")
