"""Prediction records and feedback (service/monitoring.py, service/store/observations.py).

Revision ID: 0007
Revises: 0006

``prediction_records``: per tenant and prediction id, what each head version (and its shadow) answered for one
image, until ``expires_at``; ``label`` is the true label once reported. ``version_feedback``: per head version,
feedback counts (labelled, correct) every replica adds to. No backfill.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prediction_records",
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("heads", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("tenant", "id"),
    )
    with op.batch_alter_table("prediction_records", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_prediction_records_expires_at"), ["expires_at"], unique=False)
        batch_op.create_index("ix_prediction_records_tenant_created_at", ["tenant", "created_at"], unique=False)

    op.create_table(
        "version_feedback",
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("labelled", sa.BigInteger(), nullable=False),
        sa.Column("correct", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "name", "version"),
    )


def downgrade() -> None:
    op.drop_table("version_feedback")
    with op.batch_alter_table("prediction_records", schema=None) as batch_op:
        batch_op.drop_index("ix_prediction_records_tenant_created_at")
        batch_op.drop_index(batch_op.f("ix_prediction_records_expires_at"))

    op.drop_table("prediction_records")
