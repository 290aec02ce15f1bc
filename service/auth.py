"""Tenants and their API keys: who a caller is, decided once for both doors.

A key looks like ``graft_<key_id>_<secret part>``. The public ``key_id`` finds
the row; only the sha256 of the whole key is stored, so a leaked database
grants nothing. (A fast hash is enough: the secret carries 256 random bits, so
there is nothing to guess.) The admin key comes from ``GRAFT_ADMIN_KEY`` and
only manages tenants and keys.

Guessing is bounded per client address (both doors set ``CLIENT`` before they
authenticate; without one, the presented key's first characters stand in):
failed authentications spend a token bucket, and once it is empty the address
gets 429 + Retry-After. For the admin key the bucket is checked before the key
is compared, so a guesser learns nothing more until it refills; admin calls
themselves are rate limited per address too. A tenant key that is valid always
passes (its 256 random bits need no guessing bound, and clients behind one proxy
share an address: one of them failing must not lock the others out).
"""

import contextvars
import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from datetime import datetime

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service.config import Settings
from service.errors import (
    AlreadyExists,
    FailedPrecondition,
    GraftError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from service.store.db import ApiKeyRow, Database, TenantRow, utcnow
from service.store.heads import check_name

OPEN_TENANT = "default"  # every caller's tenant when settings.auth == "open"
KEY_PREFIX = "graft"

# The caller's network address, set by each door before it authenticates (in_thread copies it to the store pool).
CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("graft_client", default=None)
_KEY = re.compile(rf"^{KEY_PREFIX}_(?P<key_id>[0-9a-f]{{12}})_[A-Za-z0-9_-]{{43}}$")


class TenantInfo(BaseModel):
    name: str
    created_at: datetime


class NewKey(BaseModel):
    key_id: str = Field(description="public: names the key, e.g. to revoke it")
    tenant: str
    secret: str = Field(description="the whole key to send as 'Authorization: Bearer <secret>'; shown only once")


class RateLimit:
    """Token buckets per caller: ``burst`` at once, refilled at ``per_minute``; at most ``callers`` remembered.

    Thread-safe (authentication runs in the store pool). The least recently seen caller is forgotten first, so a
    flood of distinct addresses costs bounded memory (and only gives the forgotten a fresh bucket).
    """

    def __init__(self, burst: float, per_minute: float, callers: int = 10_000) -> None:
        self.burst = burst
        self.rate = per_minute / 60.0
        self.callers = callers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # caller -> (tokens, at)
        self._lock = threading.Lock()

    def _tokens(self, caller: str, now: float) -> float:
        tokens, at = self._buckets.get(caller, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def wait_s(self, caller: str) -> float:
        """0 if ``caller`` may go on; else the seconds until one token is back."""
        with self._lock:
            tokens = self._tokens(caller, time.monotonic())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def spend(self, caller: str) -> float:
        """Take a token; returns what ``wait_s`` would have said before (0: there was one)."""
        now = time.monotonic()
        with self._lock:
            tokens = self._tokens(caller, now)
            if tokens < 1:
                self._buckets[caller] = (tokens, now)
                self._buckets.move_to_end(caller)
                return (1 - tokens) / self.rate
            self._buckets[caller] = (tokens - 1, now)
            self._buckets.move_to_end(caller)
            while len(self._buckets) > self.callers:
                self._buckets.popitem(last=False)
            return 0.0


def _too_many(what: str, wait_s: float) -> ResourceExhausted:
    seconds = max(1, math.ceil(wait_s))
    return ResourceExhausted(f"too many {what} from this client; retry in {seconds} s", retry_after_s=seconds)


class Tenants:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.failures = RateLimit(settings.auth_failures_burst, settings.auth_failures_per_minute)
        self.admin_calls = RateLimit(settings.admin_calls_per_minute, settings.admin_calls_per_minute)

    def _failed(self, caller: str, exc: GraftError) -> GraftError:
        """Count a failed authentication; past the bucket, the answer becomes 429 with Retry-After."""
        wait_s = self.failures.spend(caller)
        return _too_many("failed authentications", wait_s) if wait_s else exc

    # -- callers -------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> str:
        """The tenant whose key is in the ``Authorization`` header."""
        if self.settings.auth == "open":
            return OPEN_TENANT
        caller = _caller(authorization)
        try:
            secret = _bearer(authorization)
            match = _KEY.match(secret)
            if match is None:
                raise Unauthenticated("invalid API key")
            with self.db.session() as session:
                row = session.get(ApiKeyRow, match["key_id"])
                valid = row is not None and hmac.compare_digest(row.secret_sha256, _sha256(secret))
                if row is None or not valid or row.revoked_at is not None:
                    raise Unauthenticated("invalid API key")
                return row.tenant
        except Unauthenticated as exc:
            raise self._failed(caller, exc) from None

    def require_admin(self, authorization: str | None) -> None:
        if self.settings.admin_key is None:
            raise FailedPrecondition("admin endpoints are disabled: start the service with GRAFT_ADMIN_KEY set")
        caller = _caller(authorization)
        if wait_s := self.failures.wait_s(caller):  # checked before comparing: a guesser learns nothing more
            raise _too_many("failed authentications", wait_s)
        if wait_s := self.admin_calls.spend(caller):
            raise _too_many("admin calls", wait_s)
        try:
            presented = _bearer(authorization)
            expected = self.settings.admin_key.get_secret_value()
            if not hmac.compare_digest(presented.encode(), expected.encode()):
                raise PermissionDenied("this endpoint needs the admin key (GRAFT_ADMIN_KEY)")
        except (Unauthenticated, PermissionDenied) as exc:
            raise self._failed(caller, exc) from None

    # -- administration ------------------------------------------------------------

    def create_tenant(self, name: str) -> TenantInfo:
        check_name("tenant name", name)
        exists = AlreadyExists(f"tenant '{name}' already exists", tenant=name)
        try:
            with self.db.session() as session:
                if session.get(TenantRow, name) is not None:
                    raise exists
                row = TenantRow(name=name, created_at=utcnow())
                session.add(row)
        except IntegrityError:  # another replica created it between our read and our insert
            raise exists from None
        return TenantInfo(name=row.name, created_at=row.created_at)

    def list_tenants(self) -> list[TenantInfo]:
        with self.db.session() as session:
            rows = session.scalars(select(TenantRow).order_by(TenantRow.name))
            return [TenantInfo(name=row.name, created_at=row.created_at) for row in rows]

    def create_key(self, tenant: str) -> NewKey:
        """A new key for ``tenant``; its secret is returned here and never again."""
        key_id = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        with self.db.session() as session:
            if session.get(TenantRow, tenant) is None:
                raise NotFound(f"tenant '{tenant}' not found; create it first", tenant=tenant)
            session.add(ApiKeyRow(key_id=key_id, tenant=tenant, secret_sha256=_sha256(secret), created_at=utcnow()))
        return NewKey(key_id=key_id, tenant=tenant, secret=secret)

    def revoke_key(self, key_id: str) -> None:
        """From now on the key authenticates nobody; revoking twice is harmless."""
        with self.db.session() as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                raise NotFound(f"API key '{key_id}' not found", key_id=key_id)
            if row.revoked_at is None:
                row.revoked_at = utcnow()


def _caller(authorization: str | None) -> str:
    """Whom a rate limit counts: the client address the door saw, else the presented key's first characters."""
    if (address := CLIENT.get()) is not None:
        return f"addr:{address}"
    token = (authorization or "").strip().partition(" ")[2].strip()
    return f"key:{token[: len(KEY_PREFIX) + 14]}"  # graft_<key_id>_: one bucket per key id


def _bearer(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthenticated("malformed Authorization header: send 'Authorization: Bearer <key>'")
    return token


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
