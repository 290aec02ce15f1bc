"""Checking a graft webhook on the receiving side: the signature, the timestamp, and replays.

graft signs each delivery's raw body: ``Graft-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, t + "." +
body)>``. ``verify_webhook`` checks it against the endpoint's secret (shown once, when it was created) and refuses
a timestamp older than ``tolerance_s``; ``ReplayGuard`` refuses a ``Graft-Delivery`` id seen before. Verify the
body exactly as received, before parsing it.
"""

import hashlib
import hmac
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

SIGNATURE_HEADER = "Graft-Signature"
EVENT_HEADER = "Graft-Event"
DELIVERY_HEADER = "Graft-Delivery"
DEFAULT_TOLERANCE_S = 300.0


class WebhookVerificationError(Exception):
    """A webhook that must not be trusted: unsigned, signed with another secret, altered, stale, or replayed."""


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """The event (the parsed body) if ``body`` was signed with ``secret`` less than ``tolerance_s`` ago;
    raises WebhookVerificationError otherwise. ``headers`` may be any mapping, its names in any case."""
    signature = _header(headers, SIGNATURE_HEADER)
    fields = dict(part.split("=", 1) for part in signature.split(",") if "=" in part)
    timestamp, signed = fields.get("t", ""), fields.get("v1", "")
    if not timestamp.isdigit() or not signed:
        raise WebhookVerificationError(f"{SIGNATURE_HEADER} is not 't=<unix seconds>,v1=<hex>': {signature[:80]!r}")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signed):
        raise WebhookVerificationError("the signature does not match: another secret, or the body was altered")
    age = (time.time() if now is None else now) - int(timestamp)
    if abs(age) > tolerance_s:
        raise WebhookVerificationError(
            f"the signature's timestamp is {age:.0f} s from now, more than the tolerance of {tolerance_s:.0f} s: "
            "a replay, or a clock that is off"
        )
    event: dict[str, Any] = json.loads(body)
    return event


class ReplayGuard:
    """The ``Graft-Delivery`` ids of the last ``capacity`` webhooks accepted: one seen before is refused.

    Ids older than the timestamp tolerance need not be kept: ``verify_webhook`` refuses those already. Keep at
    least as many as the receiver may get within the tolerance."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, headers: Mapping[str, str]) -> str:
        """The delivery id, remembered; WebhookVerificationError if it was seen before."""
        delivery = _header(headers, DELIVERY_HEADER)
        with self._lock:
            if delivery in self._seen:
                raise WebhookVerificationError(f"delivery '{delivery[:80]}' was received before: a replay")
            self._seen[delivery] = None
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
        return delivery


def _header(headers: Mapping[str, str], name: str) -> str:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    raise WebhookVerificationError(f"the request has no {name} header: it is not a graft webhook")
