"""Webhook endpoints and their deliveries in the registry database: the tenant's calls and the worker's claims.

Every read and change is scoped to the tenant, so another tenant's id answers the same NotFound as an unknown
one. A claim is a conditional UPDATE (still pending, due, lease free or expired), so two replicas never both
win a delivery; the winner alone may record its attempt (``lease_owner`` in the WHERE clause).
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import zip_longest
from typing import Any

from pydantic import BaseModel
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from service.config import Settings
from service.errors import InvalidArgument, NotFound, ResourceExhausted
from service.store.db import Database, WebhookDeliveryRow, WebhookRow, begin_immediate, rows_changed, utcnow
from service.store.pages import check_page_size, decode_time, decode_token, encode_token
from service.webhooks import outbox
from service.webhooks.addresses import AddressPolicy, parse_networks
from service.webhooks.events import SUBSCRIBABLE, EventType
from service.webhooks.signing import new_secret

MAX_DESCRIPTION_CHARS = 512
MAX_ERROR_CHARS = 512
CLAIM_BATCH = 64  # due deliveries one claim looks at, to share a round among tenants; it takes GRAFT_WEBHOOK_SENDERS


class WebhookInfo(BaseModel):
    id: str
    url: str
    events: list[str]
    description: str
    created_at: datetime


class NewWebhook(BaseModel):
    """A created endpoint and its signing secret: the only time the secret is shown."""

    webhook: WebhookInfo
    secret: str


class DeliveryInfo(BaseModel):
    id: str
    webhook_id: str
    event_id: str
    event_type: str
    state: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None  # null once delivered or failed
    delivered_at: datetime | None


@dataclass(frozen=True)
class Claimed:
    """A delivery this replica holds until its lease expires: what to send, where, and with which secret."""

    id: str
    url: str
    secret: str
    event_type: str
    payload: dict[str, Any]
    attempt: int  # this try's number, from 1


class WebhookStore:
    def __init__(self, db: Database, settings: Settings, policy: AddressPolicy | None = None) -> None:
        self.db = db
        self.settings = settings
        self.policy = policy or AddressPolicy(parse_networks(settings.webhook_allowed_networks))

    # -- the tenant's calls ----------------------------------------------------------

    def create(self, tenant: str, url: str, events: list[str], description: str = "") -> NewWebhook:
        """Register an endpoint; its address is vetted now (and again at every delivery)."""
        chosen = check_events(events)
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgument(f"a webhook description may have at most {MAX_DESCRIPTION_CHARS} characters")
        self.policy.vet(url)
        secret = new_secret()
        row = WebhookRow(
            id=f"wh_{uuid.uuid4().hex}",
            tenant=tenant,
            url=url,
            events=chosen,
            secret=secret,
            description=description,
            created_at=utcnow(),
        )
        limit = self.settings.max_webhooks_per_tenant
        with self.db.session() as session:
            begin_immediate(session)
            count = session.scalar(select(func.count()).select_from(WebhookRow).where(WebhookRow.tenant == tenant))
            if (count or 0) >= limit:
                raise ResourceExhausted(
                    f"tenant '{tenant}' already has {count} webhooks, the most one tenant may register "
                    f"(GRAFT_MAX_WEBHOOKS_PER_TENANT={limit}); delete one first",
                    quota="webhooks",
                )
            session.add(row)
        return NewWebhook(webhook=_info(row), secret=secret)

    def get(self, tenant: str, id: str) -> WebhookInfo:
        with self.db.session() as session:
            return _info(self._row(session, tenant, id))

    def list(self, tenant: str, page_size: int, page_token: str | None) -> tuple[list[WebhookInfo], str | None]:
        """Newest first; the token is the (created_at, id) of the last one returned."""
        check_page_size(page_size)
        query = select(WebhookRow).where(WebhookRow.tenant == tenant)
        if page_token:
            created_at, last_id = decode_token(page_token, 2)
            before = decode_time(page_token, created_at)
            query = query.where(
                or_(WebhookRow.created_at < before, and_(WebhookRow.created_at == before, WebhookRow.id < last_id))
            )
        query = query.order_by(WebhookRow.created_at.desc(), WebhookRow.id.desc()).limit(page_size + 1)
        with self.db.session() as session:
            rows = list(session.scalars(query))
            page = [_info(row) for row in rows[:page_size]]
        token = encode_token(page[-1].created_at.isoformat(), page[-1].id) if len(rows) > page_size else None
        return page, token

    def delete(self, tenant: str, id: str) -> None:
        """The endpoint and its deliveries, pending ones included: nothing more is sent to it."""
        with self.db.session() as session:
            session.delete(self._row(session, tenant, id))

    def deliveries(
        self, tenant: str, id: str, page_size: int, page_token: str | None
    ) -> tuple[builtins.list[DeliveryInfo], str | None]:
        """The endpoint's delivery log, newest first."""
        check_page_size(page_size)
        query = select(WebhookDeliveryRow).where(WebhookDeliveryRow.webhook_id == id)
        if page_token:
            created_at, last_id = decode_token(page_token, 2)
            before = decode_time(page_token, created_at)
            query = query.where(
                or_(
                    WebhookDeliveryRow.created_at < before,
                    and_(WebhookDeliveryRow.created_at == before, WebhookDeliveryRow.id < last_id),
                )
            )
        query = query.order_by(WebhookDeliveryRow.created_at.desc(), WebhookDeliveryRow.id.desc()).limit(page_size + 1)
        with self.db.session() as session:
            self._row(session, tenant, id)
            rows = list(session.scalars(query))
            page = [_delivery(row) for row in rows[:page_size]]
        token = encode_token(page[-1].created_at.isoformat(), page[-1].id) if len(rows) > page_size else None
        return page, token

    def ping(self, tenant: str, id: str) -> DeliveryInfo:
        """Queue a ``webhook.test`` event for this endpoint alone; returns its delivery."""
        with self.db.session() as session:
            hook = self._row(session, tenant, id)
            event_id = outbox.queue(
                session,
                [hook],
                EventType.WEBHOOK_TEST,
                {"webhook": f"webhooks/{id}"},
                self.settings.webhook_deliveries_kept,
            )
            row = session.scalars(select(WebhookDeliveryRow).where(WebhookDeliveryRow.event_id == event_id)).one()
            return _delivery(row)

    def _row(self, session: Session, tenant: str, id: str) -> WebhookRow:
        row = session.get(WebhookRow, id)
        if row is None or row.tenant != tenant:
            raise NotFound(f"webhook '{id}' not found; list your webhooks to see valid ids", webhook=id)
        return row

    # -- the delivery worker's ---------------------------------------------------------

    def claim(self, owner: str, limit: int) -> builtins.list[Claimed]:
        """Up to ``limit`` due deliveries, each held by ``owner`` for GRAFT_WEBHOOK_LEASE_S; a delivery whose
        holder died on its last try is marked failed instead."""
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.webhook_lease_s)
        due = and_(
            WebhookDeliveryRow.state == outbox.PENDING,
            WebhookDeliveryRow.next_attempt_at <= now,
            or_(WebhookDeliveryRow.lease_expires_at.is_(None), WebhookDeliveryRow.lease_expires_at < now),
        )
        claimed: builtins.list[Claimed] = []
        with self.db.session() as session:
            candidates = [
                (id, attempts, tenant)
                for id, attempts, tenant in session.execute(
                    select(WebhookDeliveryRow.id, WebhookDeliveryRow.attempts, WebhookDeliveryRow.tenant)
                    .where(due)
                    .order_by(WebhookDeliveryRow.next_attempt_at)
                    .limit(CLAIM_BATCH)
                )
            ]
            for id, attempts, _ in _taking_turns(candidates):
                if len(claimed) >= limit:
                    break
                mine = and_(due, WebhookDeliveryRow.id == id, WebhookDeliveryRow.attempts == attempts)
                if attempts >= self.settings.webhook_max_attempts:  # its holder died on the last try
                    session.execute(
                        update(WebhookDeliveryRow)
                        .where(mine)
                        .values(state=outbox.FAILED, lease_owner=None, lease_expires_at=None)
                    )
                    continue
                values = {"lease_owner": owner, "lease_expires_at": lease, "attempts": attempts + 1}
                if rows_changed(session.execute(update(WebhookDeliveryRow).where(mine).values(**values))) == 1:
                    row = session.get_one(WebhookDeliveryRow, id, populate_existing=True)
                    claimed.append(
                        Claimed(row.id, row.webhook.url, row.webhook.secret, row.event_type, row.payload, row.attempts)
                    )
        return claimed

    def record(self, owner: str, claimed: Claimed, status_code: int | None, error: str | None) -> bool:
        """The outcome of ``owner``'s try: delivered on a 2xx, else retried after a backoff or, out of tries,
        failed. False when ``owner`` no longer held the delivery (nothing is written)."""
        now = utcnow()
        values: dict[str, Any] = {
            "last_status_code": status_code,
            "last_error": error[:MAX_ERROR_CHARS] if error else None,
            "last_attempt_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if error is None and status_code is not None and 200 <= status_code < 300:
            values |= {"state": outbox.DELIVERED, "delivered_at": now}
        elif claimed.attempt >= self.settings.webhook_max_attempts:
            values |= {"state": outbox.FAILED}
        else:
            values |= {"next_attempt_at": now + timedelta(seconds=self.backoff_s(claimed.attempt))}
        with self.db.session() as session:
            held = and_(
                WebhookDeliveryRow.id == claimed.id,
                WebhookDeliveryRow.lease_owner == owner,
                WebhookDeliveryRow.attempts == claimed.attempt,
                WebhookDeliveryRow.state == outbox.PENDING,
            )
            return rows_changed(session.execute(update(WebhookDeliveryRow).where(held).values(**values))) == 1

    def backoff_s(self, attempt: int) -> float:
        """The wait after try ``attempt`` failed: GRAFT_WEBHOOK_BACKOFF_S doubled per try, capped."""
        settings = self.settings
        return min(settings.webhook_max_backoff_s, settings.webhook_backoff_s * 2.0 ** min(attempt - 1, 60))


def _taking_turns(candidates: Sequence[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """Due deliveries, oldest first within each tenant, the tenants taking turns: one tenant's backlog (or slow
    receivers) cannot fill a round while another tenant's deliveries wait."""
    by_tenant: dict[str, list[tuple[str, int, str]]] = {}
    for row in candidates:
        by_tenant.setdefault(row[2], []).append(row)
    turns = zip_longest(*by_tenant.values())
    return [row for turn in turns for row in turn if row is not None]


def check_events(events: list[str]) -> list[str]:
    """The event types asked, each known and subscribable, without repeats, in registry order."""
    if not events:
        raise InvalidArgument(f"name at least one event type: {', '.join(e.value for e in SUBSCRIBABLE)}")
    known = {e.value for e in SUBSCRIBABLE}
    unknown = [e for e in events if e not in known]
    if unknown:
        raise InvalidArgument(
            f"unknown webhook event type {unknown[0]!r}; the types are {', '.join(e.value for e in SUBSCRIBABLE)}"
        )
    return [e.value for e in SUBSCRIBABLE if e.value in events]


def _info(row: WebhookRow) -> WebhookInfo:
    return WebhookInfo(
        id=row.id, url=row.url, events=list(row.events), description=row.description, created_at=row.created_at
    )


def _delivery(row: WebhookDeliveryRow) -> DeliveryInfo:
    return DeliveryInfo(
        id=row.id,
        webhook_id=row.webhook_id,
        event_id=row.event_id,
        event_type=row.event_type,
        state=row.state,
        attempts=row.attempts,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        created_at=row.created_at,
        last_attempt_at=row.last_attempt_at,
        next_attempt_at=row.next_attempt_at if row.state == outbox.PENDING else None,
        delivered_at=row.delivered_at,
    )
