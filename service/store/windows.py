"""Closed monitoring windows and each head version's drift status, in the registry database.

Every replica closes its own windows (service/monitoring.py) and adds them here as rows; reads combine every
replica's, ordered by end time. A version's status turns ``drifting`` the first time one of its windows' drift
tests says so (never on the OOD rate alone, whose realised rate wanders with a small hold-out), keeping that
window as the evidence until a person clears it. Everything goes with the version (``drop_windows``).
"""

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from adapters.monitoring import DriftTest
from service.errors import NotFound
from service.store.db import Database, HeadVersionRow, MonitorWindowRow, rows_changed
from service.webhooks import outbox
from service.webhooks.events import EventType


class DriftStatus(str, Enum):
    OK = "ok"
    DRIFTING = "drifting"


class MonitorWindow(BaseModel):
    """One closed window of one replica's traffic to a head version."""

    end_time: datetime
    predictions: int = Field(description="images in the window")
    label_counts: list[int] = Field(description="top labels, in the version's class order")
    label_distance: float | None = Field(
        description="total variation distance between the window's top labels and the training labels"
    )
    confidence_histogram: list[int] = Field(description="top scores in 10 bins of width 0.1, from 0 to 1")
    abstention_rate: float | None
    ood_rate: float | None = Field(description="the fraction above the OOD threshold (5 % by design in distribution)")
    mean_ood_score: float | None
    drift: DriftTest | None = Field(description="the window's two-sample test; null: no reference or too few images")

    @classmethod
    def of(cls, end_time: datetime, summary: dict[str, Any]) -> "MonitorWindow":
        """From ``WindowStats.summary`` (adapters/monitoring.py)."""
        return cls(
            end_time=end_time,
            label_distance=summary["label_total_variation"],
            **{name: summary[name] for name in cls.model_fields if name in summary},
        )


class DriftState(BaseModel):
    status: DriftStatus
    drifting_since: datetime | None
    evidence: MonitorWindow | None


@dataclass(frozen=True)
class ClosedWindow:
    """A window summarised (in the store thread: its drift test takes a few milliseconds), ready to write."""

    tenant: str
    name: str
    version: int
    end_time: datetime
    summary: dict[str, Any]

    @property
    def drifting(self) -> bool:
        drift = self.summary.get("drift")
        return bool(drift and drift["drifting"])


class MonitorWindows:
    """The database side of service/monitoring.py's windows."""

    def __init__(self, db: Database, replica: str, kept: int, webhook_deliveries_kept: int = 1000) -> None:
        """``replica`` names the windows this process closes; ``kept``: GRAFT_MONITOR_WINDOWS_KEPT;
        ``webhook_deliveries_kept``: GRAFT_WEBHOOK_DELIVERIES_KEPT (for the drifting event)."""
        self.db = db
        self.replica = replica
        self.kept = kept
        self.webhook_deliveries_kept = webhook_deliveries_kept

    def add(self, windows: list[ClosedWindow]) -> None:
        """Write windows (those of versions deleted since are dropped), keep each version's newest, and mark a
        version drifting at its first window whose test says so."""
        if not windows:
            return
        with self.db.session() as session:
            for window in sorted(windows, key=lambda w: (w.tenant, w.name, w.version, w.end_time)):
                where = _version_where(window.tenant, window.name, window.version)
                if session.scalar(select(HeadVersionRow.id).where(*where)) is None:
                    continue
                session.add(
                    MonitorWindowRow(
                        tenant=window.tenant,
                        name=window.name,
                        version=window.version,
                        replica=self.replica,
                        end_time=window.end_time,
                        summary=window.summary,
                    )
                )
                if window.drifting:
                    evidence = MonitorWindow.of(window.end_time, window.summary).model_dump(mode="json")
                    marked = session.execute(
                        update(HeadVersionRow)
                        .where(*where, HeadVersionRow.drift_status == DriftStatus.OK.value)
                        .values(
                            drift_status=DriftStatus.DRIFTING.value,
                            drifting_since=window.end_time,
                            drift_evidence=evidence,
                        )
                    )
                    if rows_changed(marked) == 1:
                        self._emit_drifting(session, window)
            session.flush()
            for tenant, name, version in sorted({(w.tenant, w.name, w.version) for w in windows}):
                self._keep_newest(session, tenant, name, version)

    def _emit_drifting(self, session: Session, window: ClosedWindow) -> None:
        """``head_version.drifting`` for the tenant's webhooks, in the transaction that marked the version."""
        data = {
            "head_version": f"heads/{window.name}/versions/{window.version}",
            "drifting_since": window.end_time.isoformat(),
        }
        outbox.emit(session, window.tenant, EventType.HEAD_VERSION_DRIFTING, data, kept=self.webhook_deliveries_kept)

    def _keep_newest(self, session: Session, tenant: str, name: str, version: int) -> None:
        where = _window_where(tenant, name, version)
        newest = (
            select(MonitorWindowRow.id)
            .where(*where)
            .order_by(MonitorWindowRow.end_time.desc(), MonitorWindowRow.id.desc())
            .limit(self.kept)
        )
        session.execute(delete(MonitorWindowRow).where(*where, MonitorWindowRow.id.not_in(newest)))

    def windows(self, tenant: str, name: str, version: int) -> list[MonitorWindow]:
        """The version's newest GRAFT_MONITOR_WINDOWS_KEPT windows of every replica, oldest first."""
        with self.db.session() as session:
            rows = session.execute(
                select(MonitorWindowRow.end_time, MonitorWindowRow.summary)
                .where(*_window_where(tenant, name, version))
                .order_by(MonitorWindowRow.end_time.desc(), MonitorWindowRow.id.desc())
                .limit(self.kept)
            ).all()
        return [MonitorWindow.of(end_time, summary) for end_time, summary in reversed(rows)]

    def drift_state(self, tenant: str, name: str, version: int) -> DriftState:
        with self.db.session() as session:
            row = session.execute(
                select(HeadVersionRow.drift_status, HeadVersionRow.drifting_since, HeadVersionRow.drift_evidence).where(
                    *_version_where(tenant, name, version)
                )
            ).one_or_none()
        if row is None:
            raise NotFound(f"head '{name}' has no version {version}", head=name, version=version)
        status, since, evidence = row
        return DriftState(
            status=DriftStatus(status),
            drifting_since=since,
            evidence=None if evidence is None else MonitorWindow.model_validate(evidence),
        )

    def clear_drift(self, tenant: str, name: str, version: int) -> None:
        """Back to ok: a person looked at the traffic and accepts it; the next drifting window alarms again."""
        with self.db.session() as session:
            result = session.execute(
                update(HeadVersionRow)
                .where(*_version_where(tenant, name, version))
                .values(drift_status=DriftStatus.OK.value, drifting_since=None, drift_evidence=None)
            )
            if rows_changed(result) == 0:
                raise NotFound(f"head '{name}' has no version {version}", head=name, version=version)


def drop_windows(session: Session, tenant: str, name: str, version: int | None) -> None:
    """Delete the windows of ``version`` (None: of every version of the head), in the caller's transaction."""
    where = [MonitorWindowRow.tenant == tenant, MonitorWindowRow.name == name]
    if version is not None:
        where.append(MonitorWindowRow.version == version)
    session.execute(delete(MonitorWindowRow).where(*where))


def _version_where(tenant: str, name: str, version: int) -> tuple:
    return (HeadVersionRow.tenant == tenant, HeadVersionRow.name == name, HeadVersionRow.version == version)


def _window_where(tenant: str, name: str, version: int) -> tuple:
    return (MonitorWindowRow.tenant == tenant, MonitorWindowRow.name == name, MonitorWindowRow.version == version)
