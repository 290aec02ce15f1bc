"""Tenant isolation: blob pins, never-reused head versions, weights identity, job leases, quota bookkeeping.

Revision ID: 0002
Revises: 0001

Backfills what the new columns mean for rows that already exist: every head name's last version, a blob row
(unpinned) per stored image with its size, each dataset's stored bytes, and each head version's weights sha256.
Sizes and hashes come from the blob folder when the caller passes it (``config.attributes["blob_dir"]``); without
it (or for a file that is gone) sizes are 0 and the hash is empty, which the loader reports as a missing blob.
"""

import hashlib
from pathlib import Path

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("pinned_until", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
    )
    op.create_table(
        "head_names",
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "name"),
    )
    with op.batch_alter_table("datasets") as batch_op:
        batch_op.add_column(sa.Column("stored_bytes", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("head_versions") as batch_op:
        batch_op.add_column(sa.Column("weights_sha256", sa.String(length=64), nullable=False, server_default=""))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
        batch_op.alter_column("worker", existing_type=sa.VARCHAR(length=300), nullable=True)
        batch_op.create_index(batch_op.f("ix_jobs_lease_expires_at"), ["lease_expires_at"], unique=False)
    _backfill(context.config.attributes.get("blob_dir"))


def _backfill(blob_dir: Path | None) -> None:
    bind = op.get_bind()
    bind.execute(
        sa.text(
            "INSERT INTO head_names (tenant, name, last_version) "
            "SELECT tenant, name, MAX(version) FROM head_versions GROUP BY tenant, name"
        )
    )
    sizes: dict[str, int] = {}
    for (sha,) in bind.execute(sa.text("SELECT DISTINCT image_sha256 FROM examples")):
        path = Path(blob_dir) / "sha" / sha[:2] / sha[2:4] / sha if blob_dir else None
        sizes[sha] = path.stat().st_size if path is not None and path.is_file() else 0
    now = sa.func.now() if bind.dialect.name == "postgresql" else sa.text("CURRENT_TIMESTAMP")
    blobs = sa.table("blobs", sa.column("sha256"), sa.column("size"), sa.column("created_at"))
    for sha, size in sizes.items():
        bind.execute(sa.insert(blobs).values(sha256=sha, size=size, created_at=now))
    datasets = bind.execute(sa.text("SELECT DISTINCT dataset_id, image_sha256 FROM examples")).all()
    stored: dict[str, int] = {}
    for dataset_id, sha in datasets:
        stored[dataset_id] = stored.get(dataset_id, 0) + sizes[sha]
    for dataset_id, total in stored.items():
        bind.execute(
            sa.text("UPDATE datasets SET stored_bytes = :total WHERE id = :id"), {"total": total, "id": dataset_id}
        )
    for row_id, key in bind.execute(sa.text("SELECT id, blob_key FROM head_versions")).all():
        path = Path(blob_dir, "named", *key.split("/")) if blob_dir else None
        if path is not None and path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            bind.execute(
                sa.text("UPDATE head_versions SET weights_sha256 = :sha WHERE id = :id"), {"sha": digest, "id": row_id}
            )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_lease_expires_at"))
        batch_op.alter_column("worker", existing_type=sa.VARCHAR(length=300), nullable=False)
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("attempts")
    with op.batch_alter_table("head_versions") as batch_op:
        batch_op.drop_column("weights_sha256")
    with op.batch_alter_table("datasets") as batch_op:
        batch_op.drop_column("stored_bytes")
    op.drop_table("head_names")
    op.drop_table("blobs")
