"""Examples keep their names (issue 26).

Revision ID: 0009
Revises: 0008

``examples`` gains ``file_name`` (the name its upload gave it: the multipart file name, the path inside a zip or
below the uploaded folder) and ``client_id`` (the uploader's own id, unique within a dataset when given). Existing
rows keep both null: their original names were never stored, so listings show their position instead.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("examples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("file_name", sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column("client_id", sa.String(length=128), nullable=True))
        batch_op.create_index("ix_examples_dataset_client_id", ["dataset_id", "client_id"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("examples", schema=None) as batch_op:
        batch_op.drop_index("ix_examples_dataset_client_id")
        batch_op.drop_column("client_id")
        batch_op.drop_column("file_name")
