"""Per-tenant quotas: what one tenant may store, queue and predict.

Storage quotas are checked inside the transaction that would go over them, so
the check and the write see the same rows: SQLite serialises writers, and on
PostgreSQL each check first takes a per-tenant advisory lock held until commit,
so two concurrent writes of one tenant cannot both pass a check only one fits. The prediction rate is a token
bucket per tenant, kept in this replica's memory: with N replicas behind a load
balancer a tenant gets at most N times the rate (documented in the README).
Every refusal is a ResourceExhausted that says which quota, its setting and
what to do.
"""

import threading
import time

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from service.config import Settings
from service.errors import ResourceExhausted
from service.store.db import BatchPredictionRow, DatasetRow, HeadVersionRow, JobRow, begin_immediate


class Quotas:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @staticmethod
    def _serialise(session: Session, tenant: str) -> None:
        """One quota-checked write per tenant at a time (until this transaction ends), so the count is current.

        PostgreSQL: a per-tenant advisory lock. SQLite: the database's write lock, taken now (``BEGIN
        IMMEDIATE``) unless this transaction already wrote; the driver would otherwise run the check's
        SELECTs outside any transaction and begin one only at the INSERT, after the count was read.
        """
        dialect = session.get_bind().dialect.name
        if dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:tenant))"), {"tenant": f"quota:{tenant}"})
        elif dialect == "sqlite":
            begin_immediate(session)

    def stored_bytes(self, session: Session, tenant: str) -> int:
        """Bytes charged to ``tenant``: its datasets' distinct images plus its head versions' weights."""
        datasets = session.scalar(
            select(func.coalesce(func.sum(DatasetRow.stored_bytes), 0)).where(DatasetRow.tenant == tenant)
        )
        heads = session.scalar(
            select(func.coalesce(func.sum(HeadVersionRow.param_bytes), 0)).where(HeadVersionRow.tenant == tenant)
        )
        return int(datasets or 0) + int(heads or 0)

    def _check_storage(self, session: Session, tenant: str, adding_bytes: int) -> None:
        """Part of a public check, which has already serialised the tenant's writes."""
        used = self.stored_bytes(session, tenant)
        limit = self.settings.quota_stored_bytes
        if used + adding_bytes > limit:
            raise ResourceExhausted(
                f"storing {adding_bytes:,} more bytes would take tenant '{tenant}' to {used + adding_bytes:,} bytes, "
                f"over its quota of {limit:,} (GRAFT_QUOTA_STORED_BYTES); delete datasets or head versions first",
                quota="stored_bytes",
            )

    def check_new_dataset(self, session: Session, tenant: str, adding_bytes: int) -> None:
        self._serialise(session, tenant)
        count = session.scalar(select(func.count()).select_from(DatasetRow).where(DatasetRow.tenant == tenant)) or 0
        if count >= self.settings.quota_datasets:
            raise ResourceExhausted(
                f"tenant '{tenant}' has {count} datasets, its quota (GRAFT_QUOTA_DATASETS); delete one first",
                quota="datasets",
            )
        self._check_storage(session, tenant, adding_bytes)

    def check_new_head_version(self, session: Session, tenant: str, name: str, adding_bytes: int) -> None:
        self._serialise(session, tenant)
        where = HeadVersionRow.tenant == tenant
        versions = session.scalar(select(func.count()).select_from(HeadVersionRow).where(where)) or 0
        if versions >= self.settings.quota_head_versions:
            raise ResourceExhausted(
                f"tenant '{tenant}' has {versions} head versions, its quota (GRAFT_QUOTA_HEAD_VERSIONS); "
                "delete old versions first",
                quota="head_versions",
            )
        names = set(session.scalars(select(HeadVersionRow.name).where(where).distinct()))
        if name not in names and len(names) >= self.settings.quota_heads:
            raise ResourceExhausted(
                f"tenant '{tenant}' has {len(names)} heads, its quota (GRAFT_QUOTA_HEADS); "
                "delete a head or train a new version of an existing one",
                quota="heads",
            )
        self._check_storage(session, tenant, adding_bytes)

    def check_new_job(self, session: Session, tenant: str) -> None:
        self._serialise(session, tenant)
        unfinished = (
            session.scalar(
                select(func.count())
                .select_from(JobRow)
                .where(JobRow.tenant == tenant, JobRow.state.in_(("queued", "running")))
            )
            or 0
        )
        if unfinished >= self.settings.quota_queued_jobs:
            raise ResourceExhausted(
                f"tenant '{tenant}' has {unfinished} jobs queued or running, its quota (GRAFT_QUOTA_QUEUED_JOBS); "
                "wait for one to finish or cancel one",
                quota="queued_jobs",
                retry_after_s=30.0,
            )

    def check_new_batch_prediction(self, session: Session, tenant: str) -> None:
        """Inside the transaction that stores a batch prediction: refuse one past the tenant's quota of batch
        predictions kept (in any state: finished ones hold their results until deleted or expired)."""
        self._serialise(session, tenant)
        kept = (
            session.scalar(
                select(func.count()).select_from(BatchPredictionRow).where(BatchPredictionRow.tenant == tenant)
            )
            or 0
        )
        if kept >= self.settings.quota_batch_predictions:
            raise ResourceExhausted(
                f"tenant '{tenant}' keeps {kept} batch predictions, its quota (GRAFT_QUOTA_BATCH_PREDICTIONS); "
                "delete finished ones (their results go with them) or cancel one",
                quota="batch_predictions",
                retry_after_s=30.0,
            )


class PredictionRate:
    """A token bucket per tenant: ``quota_predict_burst`` images at once, refilled at the sustained rate."""

    def __init__(self, settings: Settings, clock=time.monotonic) -> None:
        self.rate = settings.quota_predict_images_per_s
        self.burst = float(settings.quota_predict_burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, tenant: str, images: int) -> None:
        """Spend ``images`` tokens or raise ResourceExhausted with the wait until they would be there."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(tenant, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if images > tokens:
                self._buckets[tenant] = (tokens, now)
                wait = (min(images, self.burst) - tokens) / self.rate
                raise ResourceExhausted(
                    f"tenant '{tenant}' is over its prediction rate of {self.rate:g} images/s "
                    f"(burst {self.burst:g}; GRAFT_QUOTA_PREDICT_IMAGES_PER_S); retry in {wait:.1f} s",
                    quota="predict_rate",
                    retry_after_s=wait,
                )
            self._buckets[tenant] = (tokens - images, now)
