"""Unlabelled pools (issue 26, part 2).

Revision ID: 0010
Revises: 0009

``examples.label`` becomes nullable: a null label is an unlabelled example (an image of a pool, labelled later).
Existing rows keep their labels. A downgrade drops the unlabelled rows (0009 cannot hold them).
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("examples", schema=None) as batch_op:
        batch_op.alter_column("label", existing_type=sa.String(length=128), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM examples WHERE label IS NULL")
    with op.batch_alter_table("examples", schema=None) as batch_op:
        batch_op.alter_column("label", existing_type=sa.String(length=128), nullable=False)
