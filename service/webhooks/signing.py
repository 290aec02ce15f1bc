"""How a delivery is signed: ``Graft-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}." + body)>``.

The timestamp is inside what is signed, so a receiver that refuses old timestamps refuses replays of an old
delivery; ``Graft-Delivery`` (unique per delivery, the same on its retries) lets it drop one it has seen. The
receiver's side is ``client/webhooks.py`` (``verify_webhook``), documented in docs/webhooks.md.
"""

import hashlib
import hmac
import secrets

SIGNATURE_HEADER = "Graft-Signature"
EVENT_HEADER = "Graft-Event"
DELIVERY_HEADER = "Graft-Delivery"
SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh endpoint secret: 32 random bytes, shown to its tenant once, at creation."""
    return SECRET_PREFIX + secrets.token_hex(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``f"{timestamp}."`` + body under ``secret``."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signed_headers(secret: str, timestamp: int, body: bytes, event_type: str, delivery_id: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: f"t={timestamp},v1={signature(secret, timestamp, body)}",
        EVENT_HEADER: event_type,
        DELIVERY_HEADER: delivery_id,
    }
