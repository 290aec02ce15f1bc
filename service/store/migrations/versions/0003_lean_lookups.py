"""Lean head lookups, one version per job, finite job requests.

Revision ID: 0003
Revises: 0002

- ``head_versions.metrics_summary``: the top-level numbers of each version's metrics, what lists show, so a
  list never reads the full metrics (megabytes for a 1,000-class confusion matrix). Backfilled row by row.
- ``uq_head_versions_job_id``: a job publishes at most one version. A job that already published twice (the
  bug this closes) keeps its job id on its highest version, the one its finished row names; the others lose it.
- Stored job requests with a non-finite number (SQLite stored ``latency_budget_ms: 1e999`` as Infinity) get
  null there instead, so they load under the request's new rules.
"""

import json
import math
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("head_versions") as batch_op:
        batch_op.add_column(sa.Column("metrics_summary", sa.JSON(), nullable=False, server_default="{}"))
    bind = op.get_bind()
    for row_id, metrics in bind.execute(sa.text("SELECT id, metrics FROM head_versions")).all():
        loaded = json.loads(metrics) if isinstance(metrics, str) else metrics
        bind.execute(
            sa.text("UPDATE head_versions SET metrics_summary = :summary WHERE id = :id"),
            {"summary": json.dumps(metrics_summary(loaded or {})), "id": row_id},
        )
    duplicated = bind.execute(
        sa.text(
            "SELECT job_id, MAX(id) FROM head_versions WHERE job_id IS NOT NULL GROUP BY job_id HAVING COUNT(*) > 1"
        )
    ).all()
    for job_id, kept in duplicated:
        bind.execute(
            sa.text("UPDATE head_versions SET job_id = NULL WHERE job_id = :job AND id != :kept"),
            {"job": job_id, "kept": kept},
        )
    with op.batch_alter_table("head_versions") as batch_op:
        batch_op.create_unique_constraint("uq_head_versions_job_id", ["job_id"])
    if bind.dialect.name == "sqlite":  # PostgreSQL's JSON never accepted them
        for job_id, request in bind.execute(sa.text("SELECT id, request FROM jobs")).all():
            loaded = json.loads(request) if isinstance(request, str) else request
            cleaned = _finite(loaded)
            if cleaned != loaded:
                bind.execute(
                    sa.text("UPDATE jobs SET request = :request WHERE id = :id"),
                    {"request": json.dumps(cleaned), "id": job_id},
                )


def metrics_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Kept in step with ``service.store.heads.metrics_summary`` (a migration never imports the service)."""
    return {
        key: value
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def downgrade() -> None:
    with op.batch_alter_table("head_versions") as batch_op:
        batch_op.drop_constraint("uq_head_versions_job_id", type_="unique")
        batch_op.drop_column("metrics_summary")
