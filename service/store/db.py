"""The registry database: SQLAlchemy 2.0 models and a small ``Database`` wrapper.

SQLite is the embedded default; a ``postgresql+psycopg://`` URL works unchanged
because queries use only the ORM and portable SQL. The schema is owned by the
Alembic migrations in ``service/store/migrations`` (run on open): a change to a
model here needs a new revision there (``tests/unit/test_migrations.py`` fails when
the two disagree).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import CursorResult, Dialect, Engine, Result
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator

from service.store import migrate


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite would otherwise drop the zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC).replace(tzinfo=None) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, datetime: UTCDateTime}


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    num_examples: Mapped[int] = mapped_column(Integer)
    classes: Mapped[list[str]]
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # its distinct images' bytes (quotas)

    examples: Mapped[list["ExampleRow"]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True, order_by="ExampleRow.position"
    )


class ExampleRow(Base):
    """One image of a dataset, with its label (null: unlabelled, a pool's image). ``file_name`` is the name its
    upload gave it (null for rows older than migration 0009); ``client_id`` the uploader's own id for it, unique
    within the dataset when given."""

    __tablename__ = "examples"
    __table_args__ = (Index("ix_examples_dataset_client_id", "dataset_id", "client_id", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    label: Mapped[str | None] = mapped_column(String(128), nullable=True)
    position: Mapped[int] = mapped_column(Integer)
    file_name: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    client_id: Mapped[str | None] = mapped_column(String(128), nullable=True)

    dataset: Mapped[DatasetRow] = relationship(back_populates="examples")


class BlobRow(Base):
    """A content-addressed blob (a dataset image), for mark-and-sweep collection.

    An uploader pins the row (``pinned_until`` in the future) *before* writing the
    file; the collector deletes, in one transaction, only rows that no example
    refers to and whose pin has expired, and unlinks their files before that
    transaction commits. So a blob another upload is about to use is never
    collected, and a crash leaves at most an expired pin for the next sweep.
    """

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    pinned_until: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FeatureRow(Base):
    """One tenant's cached trunk features of one image (``service/store/features.py``): what its quota counts.

    A row is written before its file and deleted (file unlinked first) in one transaction, so the bytes counted
    are never less than what is on disk; ``used_at`` orders eviction (least recently used first).
    """

    __tablename__ = "features"
    __table_args__ = (Index("ix_features_tenant_used_at", "tenant", "used_at"),)

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    backbone: Mapped[str] = mapped_column(String(64), primary_key=True)
    split: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    used_at: Mapped[datetime] = mapped_column(default=utcnow)


class HeadNameRow(Base):
    """Every head name a tenant ever used, with the last version number handed out.

    Kept when versions (or the whole head) are deleted, so a version number is
    never given twice: ``name@3`` always means the same weights, or nothing.
    """

    __tablename__ = "head_names"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    # the version every prediction of this head also scores, to compare (service/monitoring.py); cleared with it
    shadow_version: Mapped[int | None] = mapped_column(Integer)


class HeadVersionRow(Base):
    """One version of a head. ``metrics`` can be megabytes (a 1,000-class confusion matrix), so it is deferred:
    resolving a reference never reads it, and lists read ``metrics_summary`` (its top-level numbers) instead.

    ``job_id`` is unique: a job publishes at most one version, however often it is run (a requeued run
    finds the version its earlier run published instead of storing a second one).
    """

    __tablename__ = "head_versions"
    __table_args__ = (
        UniqueConstraint("tenant", "name", "version"),
        UniqueConstraint("job_id", name="uq_head_versions_job_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    backbone: Mapped[str] = mapped_column(String(128))
    split_point: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(64))
    classes: Mapped[list[str]]
    config: Mapped[dict[str, Any]]
    hyperparams: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]] = mapped_column(deferred=True)
    metrics_summary: Mapped[dict[str, Any]]  # the top-level numbers of metrics: what lists show
    dataset_id: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(64))
    blob_key: Mapped[str] = mapped_column(String(512))
    weights_sha256: Mapped[str] = mapped_column(String(64))  # identity of the weights: caches key on it
    param_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Monitoring (service/monitoring.py): the reference fitted on its training features, stored apart from the
    # weights (which load strictly); None when it has none (too few examples, a fine-tuned head).
    monitor_blob_key: Mapped[str | None] = mapped_column(String(512))
    drift_status: Mapped[str] = mapped_column(String(16), default="ok", server_default="ok")  # ok | drifting
    drifting_since: Mapped[datetime | None]
    drift_evidence: Mapped[dict[str, Any] | None] = mapped_column(JSON, deferred=True)  # the window that alarmed


class MonitorWindowRow(Base):
    """One closed monitoring window of a head version on one replica: its summary (adapters/monitoring.py
    ``WindowStats.summary``). Each version keeps its newest GRAFT_MONITOR_WINDOWS_KEPT, all replicas' together."""

    __tablename__ = "monitor_windows"
    __table_args__ = (Index("ix_monitor_windows_version_end", "tenant", "name", "version", "end_time"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    replica: Mapped[str] = mapped_column(String(300))
    end_time: Mapped[datetime]
    summary: Mapped[dict[str, Any]]


class HeadAliasRow(Base):
    __tablename__ = "head_aliases"
    __table_args__ = (UniqueConstraint("tenant", "name", "alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(64))
    alias: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)


class HeadComparisonRow(Base):
    """What a head's served version and its shadow answered, summed over every replica (service/monitoring.py).

    Replicas add their counts (``compared += n``), never overwrite, so two replicas' traffic combines; the
    row is deleted with either version, kept when the shadow is cleared.
    """

    __tablename__ = "head_comparisons"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    served_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    shadow_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    compared: Mapped[int] = mapped_column(BigInteger, default=0)
    agreed: Mapped[int] = mapped_column(BigInteger, default=0)  # same top-1 label
    score_difference_sum: Mapped[float] = mapped_column(Float, default=0.0)  # sum of shadow - served top score
    labelled: Mapped[int] = mapped_column(BigInteger, default=0)  # compared images with feedback
    served_correct: Mapped[int] = mapped_column(BigInteger, default=0)
    shadow_correct: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ComparisonCellRow(Base):
    """One cell of a comparison's confusion table: images the served version labelled ``served_label`` and the
    shadow ``shadow_label``. At most classes x classes rows per comparison, whatever the traffic."""

    __tablename__ = "head_comparison_cells"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    served_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    shadow_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    served_label: Mapped[str] = mapped_column(String(128), primary_key=True)
    shadow_label: Mapped[str] = mapped_column(String(128), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)


class PredictionRecordRow(Base):
    """What one image's prediction answered, kept so its caller can report the true label later (feedback).

    ``heads`` lists, per head version asked: head, version, top label and, where it had one, the shadow
    version and its top label. Kept until ``expires_at`` (GRAFT_PREDICTION_TTL_S) and at most
    GRAFT_MAX_PREDICTION_RECORDS per tenant, the oldest dropped first; ``label`` is set once, by feedback.
    """

    __tablename__ = "prediction_records"
    __table_args__ = (Index("ix_prediction_records_tenant_created_at", "tenant", "created_at"),)

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    heads: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    label: Mapped[str | None] = mapped_column(String(128))


class VersionFeedbackRow(Base):
    """Live accuracy of one head version: feedback counts, added to by every replica; deleted with the version."""

    __tablename__ = "version_feedback"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    labelled: Mapped[int] = mapped_column(BigInteger, default=0)
    correct: Mapped[int] = mapped_column(BigInteger, default=0)


class JobRow(Base):
    """A training job, claimed from here by whichever replica has a free slot.

    A running job is held under a lease (``worker``, ``lease_expires_at``) that
    its replica renews; a job whose lease expired is requeued by any replica
    (``attempts`` counts runs, bounded), and only the lease holder may publish
    the job's head.
    """

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    phase: Mapped[str] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float)
    message: Mapped[str] = mapped_column(String(512))
    request: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]]
    head_name: Mapped[str] = mapped_column(String(64))
    head_version: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(300))  # host:pid of the replica running it, if any
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # runs started so far
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class BatchPredictionRow(Base):
    """A batch prediction job (service/batch): heads x a dataset's examples, run in chunks under a lease.

    ``heads`` are the references as asked, ``versions`` the ``name@N`` each resolved to when the job was
    created (every chunk, on every replica, runs the same versions); ``done`` is the checkpoint: the examples
    before it have their result rows, written in the same transaction that moved it.
    """

    __tablename__ = "batch_predictions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    heads: Mapped[list[str]]
    versions: Mapped[list[str]]
    dataset_id: Mapped[str] = mapped_column(String(64))
    options: Mapped[dict[str, Any]]
    total: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(300))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None] = mapped_column(index=True)


class BatchResultRow(Base):
    """One example's answers in a batch prediction; (batch, position) is unique, so a resumed job never
    writes an example twice."""

    __tablename__ = "batch_prediction_results"

    batch_id: Mapped[str] = mapped_column(ForeignKey("batch_predictions.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    row: Mapped[dict[str, Any]]


class TenantRow(Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKeyRow(Base):
    """An API key: the public ``key_id`` finds the row; only the secret's sha256 is stored."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class IdempotencyKeyRow(Base):
    """A creating call's idempotency key (service/store/requests.py): the client's id, hashed, per tenant, and what
    the call created (unset while it runs), kept until ``expires_at``."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    key_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    method: Mapped[str] = mapped_column(String(32))
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of the request: a repeat must match it
    result: Mapped[str | None] = mapped_column(Text)  # the created resource's name (for a key: its id, sealed)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class WebhookRow(Base):
    """A tenant's webhook endpoint (service/webhooks): where its events are POSTed, signed with ``secret``.

    The secret is kept as given (the server signs every delivery with it) and shown to the tenant only once."""

    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_tenant_created_at", "tenant", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]]
    secret: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(String(512), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    deliveries: Mapped[list["WebhookDeliveryRow"]] = relationship(
        back_populates="webhook", cascade="all, delete-orphan", passive_deletes=True
    )


class WebhookDeliveryRow(Base):
    """One event for one endpoint: the outbox row a replica's delivery worker claims under a lease, and its log.

    ``state`` is pending (due at ``next_attempt_at``), delivered or failed (``attempts`` spent); a claim holds it
    until ``lease_expires_at``, after which another replica may take it (its holder died mid-send)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook_created_at", "webhook_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the Graft-Delivery header
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    tenant: Mapped[str] = mapped_column(String(128))
    event_id: Mapped[str] = mapped_column(String(64))  # one per event, shared by its deliveries to every endpoint
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    lease_owner: Mapped[str | None] = mapped_column(String(300))
    lease_expires_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]

    webhook: Mapped[WebhookRow] = relationship(back_populates="deliveries")


def rows_changed(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE changed (``Session.execute`` is typed as a plain Result)."""
    return cast(CursorResult[Any], result).rowcount


def begin_immediate(session: Session) -> None:
    """SQLite: hold the write lock from here to the commit (waiting up to busy_timeout for another writer).

    A no-op when this transaction already holds it (it wrote) and on other backends.
    """
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        return
    driver = connection.connection.driver_connection
    if driver is not None and not driver.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """Owns the engine and hands out sessions that commit on success and roll back on error."""

    def __init__(self, url: str, blob_dir: Path | None = None) -> None:
        """Connect and migrate the schema to the newest revision (``blob_dir`` feeds data migrations)."""
        is_sqlite = url.startswith("sqlite")
        connect_args = {"check_same_thread": False} if is_sqlite else {}
        self.engine: Engine = create_engine(url, connect_args=connect_args, pool_pre_ping=not is_sqlite)
        if is_sqlite:
            event.listen(self.engine, "connect", _configure_sqlite)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        migrate.upgrade(self.engine, blob_dir)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def close(self) -> None:
        self.engine.dispose()


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers run while a writer commits; SQLite enforces foreign keys only when asked."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
