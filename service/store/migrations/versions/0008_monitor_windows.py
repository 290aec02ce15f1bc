"""Monitoring per head version (service/monitoring.py, service/store/windows.py).

Revision ID: 0008
Revises: 0007

``head_versions`` gains ``monitor_blob_key`` (the monitoring reference fitted at training, a blob of its own;
null for versions trained before, which are monitored without OOD scores or drift tests) and the version's drift
status: ``drift_status`` ('ok' for every existing row), ``drifting_since`` and ``drift_evidence``.
``monitor_windows``: each replica's closed windows per version, with their summary. No backfill.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "monitor_windows",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("replica", sa.String(length=300), nullable=False),
        sa.Column("end_time", sa.DateTime(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("monitor_windows", schema=None) as batch_op:
        batch_op.create_index("ix_monitor_windows_version_end", ["tenant", "name", "version", "end_time"], unique=False)

    with op.batch_alter_table("head_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("monitor_blob_key", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("drift_status", sa.String(length=16), server_default="ok", nullable=False))
        batch_op.add_column(sa.Column("drifting_since", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("drift_evidence", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("head_versions", schema=None) as batch_op:
        batch_op.drop_column("drift_evidence")
        batch_op.drop_column("drifting_since")
        batch_op.drop_column("drift_status")
        batch_op.drop_column("monitor_blob_key")

    with op.batch_alter_table("monitor_windows", schema=None) as batch_op:
        batch_op.drop_index("ix_monitor_windows_version_end")

    op.drop_table("monitor_windows")
