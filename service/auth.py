"""Tenants and their API keys: who a caller is, decided once for both doors.

A key looks like ``graft_<key_id>_<secret part>``. The public ``key_id`` finds
the row; only the sha256 of the whole key is stored, so a leaked database
grants nothing. (A fast hash is enough: the secret carries 256 random bits, so
there is nothing to guess.) The admin key comes from ``GRAFT_ADMIN_KEY`` and
only manages tenants and keys.
"""

import hashlib
import hmac
import re
import secrets
from datetime import datetime

from pydantic import BaseModel, Field
from sqlalchemy import select

from service.config import Settings
from service.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from service.store.db import ApiKeyRow, Database, TenantRow, utcnow
from service.store.heads import check_name

OPEN_TENANT = "default"  # every caller's tenant when settings.auth == "open"
KEY_PREFIX = "graft"

_KEY = re.compile(rf"^{KEY_PREFIX}_(?P<key_id>[0-9a-f]{{12}})_[A-Za-z0-9_-]{{43}}$")


class TenantInfo(BaseModel):
    name: str
    created_at: datetime


class NewKey(BaseModel):
    key_id: str = Field(description="public: names the key, e.g. to revoke it")
    tenant: str
    secret: str = Field(description="the whole key to send as 'Authorization: Bearer <secret>'; shown only once")


class Tenants:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    # -- callers -------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> str:
        """The tenant whose key is in the ``Authorization`` header."""
        if self.settings.auth == "open":
            return OPEN_TENANT
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

    def require_admin(self, authorization: str | None) -> None:
        if self.settings.admin_key is None:
            raise FailedPrecondition("admin endpoints are disabled: start the service with GRAFT_ADMIN_KEY set")
        presented = _bearer(authorization)
        expected = self.settings.admin_key.get_secret_value()
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            raise PermissionDenied("this endpoint needs the admin key (GRAFT_ADMIN_KEY)")

    # -- administration ------------------------------------------------------------

    def create_tenant(self, name: str) -> TenantInfo:
        check_name("tenant name", name)
        with self.db.session() as session:
            if session.get(TenantRow, name) is not None:
                raise AlreadyExists(f"tenant '{name}' already exists", tenant=name)
            row = TenantRow(name=name, created_at=utcnow())
            session.add(row)
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
