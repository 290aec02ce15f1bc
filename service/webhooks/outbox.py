"""Emitting an event: one pending delivery row per endpoint of the tenant that subscribed to it.

``emit`` runs inside the caller's transaction, so an event exists exactly when the state change that caused it
was committed (a job's final state, a version turning drifting). Each endpoint keeps its newest
GRAFT_WEBHOOK_DELIVERIES_KEPT deliveries: a tenant's events can never make the registry hold more.
"""

import json
import uuid
from enum import Enum
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.errors import InvalidArgument
from service.store.db import WebhookDeliveryRow, WebhookRow, utcnow
from service.webhooks.events import EventType

MAX_PAYLOAD_BYTES = 16 * 1024  # an event says what happened and names the resource; clients GET the rest


class DeliveryState(str, Enum):
    PENDING = "pending"  # due at next_attempt_at (a claim may hold it)
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # every try spent (GRAFT_WEBHOOK_MAX_ATTEMPTS)


PENDING, DELIVERED, FAILED = (state.value for state in DeliveryState)


def emit(session: Session, tenant: str, event: EventType, data: dict[str, Any], *, kept: int) -> int:
    """Queue ``event`` for every endpoint of ``tenant`` subscribed to it; returns how many were queued."""
    hooks = session.scalars(select(WebhookRow).where(WebhookRow.tenant == tenant)).all()
    subscribed = [h for h in hooks if event.value in h.events]
    if subscribed:
        queue(session, subscribed, event, data, kept)
    return len(subscribed)


def batch_prediction_finished(
    session: Session, tenant: str, batch: str, state: str, data: dict[str, Any], *, kept: int
) -> int:
    """``batch_prediction.finished`` for the batch named ``batch`` (its resource name), ended in ``state``; call it
    in the transaction that writes that state. ``data`` adds what a receiver needs (counts, result names)."""
    return emit(
        session, tenant, EventType.BATCH_PREDICTION_FINISHED, {**data, "batch": batch, "state": state}, kept=kept
    )


def queue(session: Session, hooks: list[WebhookRow], event: EventType, data: dict[str, Any], kept: int) -> str:
    """One delivery of a new event to each of ``hooks``; returns the event id."""
    if len(json.dumps(data, default=str)) > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(f"a webhook event's data may be at most {MAX_PAYLOAD_BYTES:,} bytes of JSON")
    event_id = f"evt_{uuid.uuid4().hex}"
    now = utcnow()
    payload = {"id": event_id, "type": event.value, "create_time": now.isoformat(), "data": data}
    for hook in hooks:
        session.add(
            WebhookDeliveryRow(
                id=f"dlv_{uuid.uuid4().hex}",
                webhook_id=hook.id,
                tenant=hook.tenant,
                event_id=event_id,
                event_type=event.value,
                payload=json.loads(json.dumps(payload, default=str)),
                state=PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    session.flush()
    for hook in hooks:
        _keep_newest(session, hook.id, kept)
    return event_id


def _keep_newest(session: Session, webhook_id: str, kept: int) -> None:
    where = WebhookDeliveryRow.webhook_id == webhook_id
    newest = (
        select(WebhookDeliveryRow.id)
        .where(where)
        .order_by(WebhookDeliveryRow.created_at.desc(), WebhookDeliveryRow.id.desc())
        .limit(kept)
    )
    session.execute(delete(WebhookDeliveryRow).where(where, WebhookDeliveryRow.id.not_in(newest)))
