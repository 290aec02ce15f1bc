"""Per-tenant feature cache: one row per cached entry, so a tenant's cached bytes are counted and evicted.

Revision ID: 0004
Revises: 0003

No backfill: the entries of the old shared cache (``<feature dir>/<backbone>/...``) belong to no tenant, so they
are not adopted. The feature collector removes them (they are only a cache, recomputed on the next job).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "features",
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("backbone", sa.String(length=64), nullable=False),
        sa.Column("split", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "backbone", "split", "sha256"),
    )
    op.create_index("ix_features_tenant_used_at", "features", ["tenant", "used_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_features_tenant_used_at", table_name="features")
    op.drop_table("features")
