"""Shadow versions and their comparison with the served version (service/monitoring.py).

Revision ID: 0006
Revises: 0005

``head_names.shadow_version``: the version every prediction of the head also scores (NULL: none).
``head_comparisons``: per (head, served version, shadow version), counts every replica adds to: compared,
agreed, the sum of top-score differences, and, from feedback, labelled and each version's correct answers.
``head_comparison_cells``: the served x shadow label confusion table, one row per non-empty cell.
No backfill: nothing was compared before.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "head_comparison_cells",
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("served_version", sa.Integer(), nullable=False),
        sa.Column("shadow_version", sa.Integer(), nullable=False),
        sa.Column("served_label", sa.String(length=128), nullable=False),
        sa.Column("shadow_label", sa.String(length=128), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "name", "served_version", "shadow_version", "served_label", "shadow_label"),
    )
    op.create_table(
        "head_comparisons",
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("served_version", sa.Integer(), nullable=False),
        sa.Column("shadow_version", sa.Integer(), nullable=False),
        sa.Column("compared", sa.BigInteger(), nullable=False),
        sa.Column("agreed", sa.BigInteger(), nullable=False),
        sa.Column("score_difference_sum", sa.Float(), nullable=False),
        sa.Column("labelled", sa.BigInteger(), nullable=False),
        sa.Column("served_correct", sa.BigInteger(), nullable=False),
        sa.Column("shadow_correct", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "name", "served_version", "shadow_version"),
    )
    with op.batch_alter_table("head_names", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shadow_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("head_names", schema=None) as batch_op:
        batch_op.drop_column("shadow_version")

    op.drop_table("head_comparisons")
    op.drop_table("head_comparison_cells")
