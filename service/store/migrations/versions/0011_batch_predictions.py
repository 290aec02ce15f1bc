"""Batch prediction jobs (issue 26, part 4).

Revision ID: 0011
Revises: 0010

``batch_predictions`` holds one row per job (heads x a dataset's examples), claimed under a lease like training
jobs; ``batch_prediction_results`` one row per example answered, keyed by (job, position) so that a job resumed
by another replica writes each example once. Results go with their job (ON DELETE CASCADE).
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_predictions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("heads", sa.JSON(), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("worker", sa.String(length=300), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("batch_predictions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_batch_predictions_tenant"), ["tenant"], unique=False)
        batch_op.create_index(batch_op.f("ix_batch_predictions_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_batch_predictions_lease_expires_at"), ["lease_expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_batch_predictions_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_batch_predictions_finished_at"), ["finished_at"], unique=False)
    op.create_table(
        "batch_prediction_results",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("row", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batch_predictions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("batch_id", "position"),
    )


def downgrade() -> None:
    op.drop_table("batch_prediction_results")
    op.drop_table("batch_predictions")
