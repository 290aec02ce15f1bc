"""Idempotency keys: a creating call that carries one runs once, however often it is sent.

A client sends a request id (HTTP ``Idempotency-Key`` header, gRPC ``idempotency-key`` metadata) with
``create_dataset``, ``create_job`` or the admin ``create_key``, and the same id again on every retry of
that logical call. The registry remembers (tenant, id) -> what the call created for ``GRAFT_IDEMPOTENCY_TTL_S``;
a repeat answers with that resource instead of creating another, as Google APIs' ``request_id`` and
Stripe's ``Idempotency-Key`` do.

- The id is stored only as its sha256, scoped by tenant: another tenant's identical id is another row.
- A repeat with another request (method or fingerprint) is refused: FailedPrecondition (HTTP 409,
  gRPC FAILED_PRECONDITION); a repeat while the first is still running: ResourceExhausted with a retry
  hint (429 + Retry-After), so the client waits for the first to finish and then gets its result.
- The row is claimed (result unset) before the call runs, released if the call fails (a retry may try
  again), and completed with the result after it succeeded. A claim whose replica died before it
  completed expires after ``pending_s`` and may then be taken by a retry.
- Each tenant keeps at most ``per_tenant`` rows: past it, its oldest completed ones are forgotten first.
  Expired rows are collected with the other housekeeping (``collect_expired``).
"""

import hashlib
import hmac
import secrets
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from service.store.db import Database, IdempotencyKeyRow, begin_immediate, rows_changed, utcnow

MAX_KEY_CHARS = 255
IN_PROGRESS_RETRY_S = 2.0
ADMIN_SCOPE = "(admin)"  # not a tenant name (names are [a-z0-9-_]), so admin keys never meet a tenant's


def check_key(key: str) -> str:
    """The client's id as sent: 1 to 255 printable ASCII characters."""
    if not 0 < len(key) <= MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise InvalidArgument(
            f"the idempotency key must be 1 to {MAX_KEY_CHARS} printable ASCII characters (a UUID is usual)"
        )
    return key


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def fingerprint(*parts: str) -> str:
    """What a repeat must match: the request, as the call's own canonical text."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


class IdempotencyKeys:
    def __init__(self, db: Database, ttl_s: float, per_tenant: int, pending_s: float) -> None:
        self.db = db
        self.ttl = timedelta(seconds=ttl_s)
        self.per_tenant = per_tenant
        self.pending = timedelta(seconds=pending_s)

    def claim(self, tenant: str, key: str, method: str, request: str) -> str | None:
        """The result an earlier call with this key recorded, or None: the key is now this call's (run it, then
        ``complete`` or ``release``)."""
        digest = key_hash(check_key(key))
        while True:
            try:
                with self.db.session() as session:
                    begin_immediate(session)
                    now = utcnow()
                    row = session.get(IdempotencyKeyRow, (tenant, digest))
                    if row is not None and row.expires_at <= now:
                        session.delete(row)
                        session.flush()
                        row = None
                    if row is not None:
                        if row.method != method or not hmac.compare_digest(row.fingerprint, request):
                            raise FailedPrecondition(
                                f"this idempotency key was used for another request ({row.method}) within "
                                "GRAFT_IDEMPOTENCY_TTL_S; send a new key for a new request"
                            )
                        if row.result is None:
                            raise ResourceExhausted(
                                "a request with this idempotency key is still in progress; retry shortly for "
                                "its result",
                                retry_after_s=IN_PROGRESS_RETRY_S,
                            )
                        return row.result
                    self._make_room(session, tenant)
                    session.add(
                        IdempotencyKeyRow(
                            tenant=tenant,
                            key_sha256=digest,
                            method=method,
                            fingerprint=request,
                            result=None,
                            created_at=now,
                            expires_at=now + self.pending,
                        )
                    )
                    return None
            except IntegrityError:
                continue  # another replica claimed it between our read and our insert: read its row

    def complete(self, tenant: str, key: str, result: str) -> None:
        """The call succeeded: repeats answer ``result`` until the TTL is over."""
        with self.db.session() as session:
            row = session.get(IdempotencyKeyRow, (tenant, key_hash(key)))
            if row is not None:
                row.result = result
                row.expires_at = utcnow() + self.ttl

    def release(self, tenant: str, key: str) -> None:
        """The call failed: forget the claim, so a retry runs it again."""
        with self.db.session() as session:
            session.execute(
                delete(IdempotencyKeyRow).where(
                    IdempotencyKeyRow.tenant == tenant,
                    IdempotencyKeyRow.key_sha256 == key_hash(key),
                    IdempotencyKeyRow.result.is_(None),
                )
            )

    def collect_expired(self) -> int:
        """Delete every expired row; how many went."""
        with self.db.session() as session:
            return rows_changed(
                session.execute(delete(IdempotencyKeyRow).where(IdempotencyKeyRow.expires_at <= utcnow()))
            )

    def _make_room(self, session: Session, tenant: str) -> None:
        held = session.scalar(select(func.count()).where(IdempotencyKeyRow.tenant == tenant)) or 0
        if held < self.per_tenant:
            return
        oldest = (
            select(IdempotencyKeyRow.key_sha256)
            .where(IdempotencyKeyRow.tenant == tenant, IdempotencyKeyRow.result.is_not(None))
            .order_by(IdempotencyKeyRow.created_at)
            .limit(held - self.per_tenant + 1)
        )
        victims = list(session.scalars(oldest))
        if not victims:
            raise ResourceExhausted(
                f"{held} requests with idempotency keys are in progress for this tenant; retry when some finish",
                retry_after_s=IN_PROGRESS_RETRY_S * 5,
            )
        session.execute(
            delete(IdempotencyKeyRow).where(
                IdempotencyKeyRow.tenant == tenant, IdempotencyKeyRow.key_sha256.in_(victims)
            )
        )


def seal(secret: str, key: str) -> str:
    """``secret`` (an API key shown once) encrypted under the client's idempotency key, which is stored only as
    its hash: a replay can give the secret back to whoever holds the key, and the database alone cannot.

    A keystream of keyed BLAKE2b blocks (a PRF in counter mode) XORed with the secret, under a fresh salt."""
    salt = secrets.token_bytes(16)
    data = secret.encode()
    return salt.hex() + ":" + bytes(a ^ b for a, b in zip(data, _stream(key, salt, len(data)), strict=True)).hex()


def unseal(sealed: str, key: str) -> str:
    salt_hex, _, body_hex = sealed.partition(":")
    data = bytes.fromhex(body_hex)
    return bytes(a ^ b for a, b in zip(data, _stream(key, bytes.fromhex(salt_hex), len(data)), strict=True)).decode()


def _stream(key: str, salt: bytes, length: int) -> bytes:
    secret_key = hashlib.blake2b(key.encode(), digest_size=32, person=b"graft-idem-seal").digest()  # not key_hash
    blocks = b""
    counter = 0
    while len(blocks) < length:
        blocks += hashlib.blake2b(salt + counter.to_bytes(8, "big"), key=secret_key, digest_size=64).digest()
        counter += 1
    return blocks[:length]
