"""What serving observed, in the registry database: shadow comparisons, prediction records with their feedback
(and so live accuracy), and monitoring.

Every replica keeps its own counts in memory (service/monitoring.py) and adds them here every few seconds:
each write is an additive upsert (``compared = compared + n``), never a read-modify-write, so replicas on one
PostgreSQL database combine without locks held across a round trip, and rows are upserted in key order so two
replicas' transactions cannot deadlock. Everything observed of a version goes with it (``drop_observations``,
called by the head registry in the deleting transaction).
"""

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.errors import AlreadyExists, InvalidArgument, NotFound
from service.store.db import (
    ComparisonCellRow,
    Database,
    HeadComparisonRow,
    HeadVersionRow,
    PredictionRecordRow,
    VersionFeedbackRow,
    begin_immediate,
    rows_changed,
    utcnow,
)
from service.store.windows import drop_windows

MAX_LABEL_CHARS = 128  # the column's width, as a dataset's labels


@dataclass(frozen=True, order=True)
class ComparisonKey:
    tenant: str
    name: str
    served_version: int
    shadow_version: int


@dataclass
class ComparisonTally:
    """One replica's counts of one comparison since its last flush."""

    compared: int = 0
    agreed: int = 0
    score_difference_sum: float = 0.0
    cells: Counter[tuple[str, str]] = field(default_factory=Counter)  # (served label, shadow label) -> images

    def add(self, served_label: str, shadow_label: str, served_score: float, shadow_score: float) -> None:
        self.compared += 1
        self.agreed += served_label == shadow_label
        self.score_difference_sum += shadow_score - served_score
        self.cells[(served_label, shadow_label)] += 1


class RecordedHead(BaseModel):
    """What one head version (and its shadow) answered for a recorded prediction."""

    head: str
    version: int
    label: str
    shadow_version: int | None = None
    shadow_label: str | None = None


@dataclass(frozen=True)
class PredictionRecord:
    tenant: str
    id: str
    heads: list[RecordedHead]
    created_at: datetime


class FeedbackVerdict(BaseModel):
    head: str
    version: int
    correct: bool
    shadow_version: int | None
    shadow_correct: bool | None


class Feedback(BaseModel):
    prediction_id: str
    label: str
    heads: list[FeedbackVerdict]


class Comparison(BaseModel):
    """One (served version, shadow version) pair of a head, over every replica."""

    served_version: int
    shadow_version: int
    compared: int
    agreement: float | None
    mean_top_score_difference: float | None
    labels: list[str]
    confusion: list[list[int]]
    labelled: int
    served_accuracy: float | None
    shadow_accuracy: float | None


def upsert_adding(
    session: Session, table: type, keys: dict[str, Any], add: dict[str, Any], replace: dict[str, Any] | None = None
) -> None:
    """Insert the row, or add ``add`` to the counts of the one with these ``keys`` (and set ``replace``)."""
    replace = replace or {}
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    statement = insert(table).values(**keys, **add, **replace)
    changes = {name: getattr(table, name) + statement.excluded[name] for name in add}
    changes |= {name: statement.excluded[name] for name in replace}
    session.execute(statement.on_conflict_do_update(index_elements=list(keys), set_=changes))


def _comparison_where(table: type, key: ComparisonKey) -> tuple:
    return (
        table.tenant == key.tenant,  # type: ignore[attr-defined]
        table.name == key.name,  # type: ignore[attr-defined]
        table.served_version == key.served_version,  # type: ignore[attr-defined]
        table.shadow_version == key.shadow_version,  # type: ignore[attr-defined]
    )


class Observations:
    """The database side of service/monitoring.py."""

    def __init__(self, db: Database, record_ttl_s: float, records_per_tenant: int) -> None:
        self.db = db
        self.record_ttl = timedelta(seconds=record_ttl_s)
        self.records_per_tenant = records_per_tenant

    # -- prediction records and feedback ---------------------------------------------------

    def add_records(self, records: list[PredictionRecord]) -> None:
        """Store one replica's records; each tenant then keeps its newest GRAFT_MAX_PREDICTION_RECORDS."""
        if not records:
            return
        with self.db.session() as session:
            session.add_all(
                PredictionRecordRow(
                    tenant=record.tenant,
                    id=record.id,
                    heads=[head.model_dump(exclude_none=True) for head in record.heads],
                    created_at=record.created_at,
                    expires_at=record.created_at + self.record_ttl,
                )
                for record in records
            )
            session.flush()
            for tenant in sorted({record.tenant for record in records}):
                self._keep_newest(session, tenant)

    def _keep_newest(self, session: Session, tenant: str) -> None:
        where = PredictionRecordRow.tenant == tenant
        excess = (session.scalar(select(func.count()).select_from(PredictionRecordRow).where(where)) or 0) - (
            self.records_per_tenant
        )
        if excess > 0:
            oldest = select(PredictionRecordRow.id).where(where).order_by(PredictionRecordRow.created_at).limit(excess)
            session.execute(delete(PredictionRecordRow).where(where, PredictionRecordRow.id.in_(oldest)))

    def feedback(self, tenant: str, prediction_id: str, label: str) -> Feedback:
        """Record the true label of a prediction once, and count each head version's answer right or wrong.

        An unknown, expired or other tenant's id is the same NotFound: nobody learns another tenant's ids.
        """
        if not 0 < len(label) <= MAX_LABEL_CHARS:
            raise InvalidArgument(f"the label must be 1 to {MAX_LABEL_CHARS} characters")
        with self.db.session() as session:
            begin_immediate(session)  # SQLite; PostgreSQL locks the row: one feedback per prediction
            row = session.scalar(
                select(PredictionRecordRow)
                .where(PredictionRecordRow.tenant == tenant, PredictionRecordRow.id == prediction_id)
                .with_for_update()
            )
            if row is None or row.expires_at <= utcnow():
                raise NotFound(
                    f"prediction '{prediction_id[:64]}' not found: ids are kept GRAFT_PREDICTION_TTL_S after the "
                    "prediction (and only the newest GRAFT_MAX_PREDICTION_RECORDS), for the tenant that made it"
                )
            if row.label is not None:
                raise AlreadyExists(f"prediction '{prediction_id}' already has feedback: '{row.label}'")
            heads = [RecordedHead.model_validate(head) for head in row.heads]
            classes = self._classes(session, tenant, heads)
            if label not in classes:
                raise InvalidArgument(
                    f"'{label[:MAX_LABEL_CHARS]}' is not a class of the head(s) that made this prediction; "
                    f"their classes are {sorted(classes)[:50]}"
                )
            row.label = label
            verdicts = [self._count(session, tenant, head, label) for head in heads]
        return Feedback(prediction_id=prediction_id, label=label, heads=verdicts)

    @staticmethod
    def _classes(session: Session, tenant: str, heads: list[RecordedHead]) -> set[str]:
        """Every class of the versions the prediction asked (those not deleted since)."""
        classes: set[str] = set()
        for head in heads:
            stored = session.scalar(
                select(HeadVersionRow.classes).where(
                    HeadVersionRow.tenant == tenant,
                    HeadVersionRow.name == head.head,
                    HeadVersionRow.version == head.version,
                )
            )
            classes.update(stored or [])
        return classes

    @staticmethod
    def _count(session: Session, tenant: str, head: RecordedHead, label: str) -> FeedbackVerdict:
        correct = head.label == label
        version = {"tenant": tenant, "name": head.head, "version": head.version}
        upsert_adding(session, VersionFeedbackRow, version, {"labelled": 1, "correct": int(correct)})
        shadow_correct = None
        if head.shadow_version is not None:
            shadow_correct = head.shadow_label == label
            key = ComparisonKey(tenant, head.head, head.version, head.shadow_version)
            session.execute(
                update(HeadComparisonRow)
                .where(*_comparison_where(HeadComparisonRow, key))
                .values(
                    labelled=HeadComparisonRow.labelled + 1,
                    served_correct=HeadComparisonRow.served_correct + int(correct),
                    shadow_correct=HeadComparisonRow.shadow_correct + int(shadow_correct),
                )
            )
        return FeedbackVerdict(
            head=head.head,
            version=head.version,
            correct=correct,
            shadow_version=head.shadow_version,
            shadow_correct=shadow_correct,
        )

    def live_accuracy(self, tenant: str, name: str, version: int) -> tuple[int, float | None]:
        """(images with feedback, the fraction the version got right; None before any)."""
        with self.db.session() as session:
            row = session.get(VersionFeedbackRow, (tenant, name, version))
        if row is None or not row.labelled:
            return 0, None
        return row.labelled, row.correct / row.labelled

    def collect_expired(self) -> int:
        """Delete prediction records past their time; how many."""
        with self.db.session() as session:
            result = session.execute(delete(PredictionRecordRow).where(PredictionRecordRow.expires_at <= utcnow()))
            return rows_changed(result)

    # -- comparisons -------------------------------------------------------------------------

    def add_comparisons(self, tallies: dict[ComparisonKey, ComparisonTally]) -> None:
        """Add one replica's counts to every replica's, in one transaction, in key order."""
        if not tallies:
            return
        now = utcnow()
        with self.db.session() as session:
            for key in sorted(tallies):
                tally = tallies[key]
                keys = {
                    "tenant": key.tenant,
                    "name": key.name,
                    "served_version": key.served_version,
                    "shadow_version": key.shadow_version,
                }
                upsert_adding(
                    session,
                    HeadComparisonRow,
                    keys,
                    {
                        "compared": tally.compared,
                        "agreed": tally.agreed,
                        "score_difference_sum": tally.score_difference_sum,
                        "labelled": 0,
                        "served_correct": 0,
                        "shadow_correct": 0,
                    },
                    {"updated_at": now},
                )
                for (served_label, shadow_label), count in sorted(tally.cells.items()):
                    cell = keys | {"served_label": served_label, "shadow_label": shadow_label}
                    upsert_adding(session, ComparisonCellRow, cell, {"count": count})

    def comparisons(self, tenant: str, name: str) -> list[Comparison]:
        """Every pair the head's predictions compared, the most recently updated first."""
        with self.db.session() as session:
            rows = list(
                session.scalars(
                    select(HeadComparisonRow)
                    .where(HeadComparisonRow.tenant == tenant, HeadComparisonRow.name == name)
                    .order_by(HeadComparisonRow.updated_at.desc(), HeadComparisonRow.served_version.desc())
                )
            )
            versions = session.execute(
                select(HeadVersionRow.version, HeadVersionRow.classes).where(
                    HeadVersionRow.tenant == tenant, HeadVersionRow.name == name
                )
            )
            classes = {version: list(labels) for version, labels in versions}
            return [self._comparison(session, row, classes) for row in rows]

    @staticmethod
    def _comparison(session: Session, row: HeadComparisonRow, classes: dict[int, list[str]]) -> Comparison:
        key = ComparisonKey(row.tenant, row.name, row.served_version, row.shadow_version)
        cells = session.execute(
            select(ComparisonCellRow.served_label, ComparisonCellRow.shadow_label, ComparisonCellRow.count).where(
                *_comparison_where(ComparisonCellRow, key)
            )
        )
        counts = {(served, shadow): count for served, shadow, count in cells}
        # the served version's classes, then the shadow's others, then any label only the counts still name
        seen = [label for pair in counts for label in pair]
        labels = list(
            dict.fromkeys([*classes.get(key.served_version, []), *classes.get(key.shadow_version, []), *seen])
        )
        index = {label: i for i, label in enumerate(labels)}
        confusion = [[0] * len(labels) for _ in labels]
        for (served, shadow), count in counts.items():
            confusion[index[served]][index[shadow]] += count
        return Comparison(
            served_version=row.served_version,
            shadow_version=row.shadow_version,
            compared=row.compared,
            agreement=row.agreed / row.compared if row.compared else None,
            mean_top_score_difference=row.score_difference_sum / row.compared if row.compared else None,
            labels=labels,
            confusion=confusion,
            labelled=row.labelled,
            served_accuracy=row.served_correct / row.labelled if row.labelled else None,
            shadow_accuracy=row.shadow_correct / row.labelled if row.labelled else None,
        )


def drop_observations(session: Session, tenant: str, name: str, version: int | None) -> None:
    """Delete what was observed of ``version`` (None: of every version of the head), in the caller's transaction."""
    for table in (HeadComparisonRow, ComparisonCellRow):
        where = [table.tenant == tenant, table.name == name]
        if version is not None:
            where.append(or_(table.served_version == version, table.shadow_version == version))
        session.execute(delete(table).where(*where))
    feedback = [VersionFeedbackRow.tenant == tenant, VersionFeedbackRow.name == name]
    if version is not None:
        feedback.append(VersionFeedbackRow.version == version)
    session.execute(delete(VersionFeedbackRow).where(*feedback))
    drop_windows(session, tenant, name, version)
