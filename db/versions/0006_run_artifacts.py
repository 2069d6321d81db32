"""Runs gain artifacts: named binary outputs a reader looks at rather than ranks, such as a GAN
run's grid of generated samples (a PNG). They live in the database beside the run's metrics, so a
dashboard reading a remote database shows them too.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("media_type", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("run_id", "name", name="uq_artifact"),
    )


def downgrade() -> None:
    op.drop_table("artifacts")
