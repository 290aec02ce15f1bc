"""What every HTTP handler needs: the caller's ``Calls`` (tenant found by the gate), or the runtime for admin."""

import asyncio
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import Header, Query, Request

from service.calls import Calls, KeyCheck
from service.errors import Cancelled, PermissionDenied, Unauthenticated
from service.http.gate import ADMIN, TENANT
from service.resources import MAX_PAGE_SIZE, PAGE_TOKEN_PATTERN
from service.runtime import Runtime
from service.store.requests import MAX_KEY_CHARS

T = TypeVar("T")
DISCONNECT_POLL_S = 0.5  # how soon a long call notices that its client left

# The query parameters of every List method.
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]
PageToken = Annotated[
    str,
    Query(
        pattern=PAGE_TOKEN_PATTERN,
        description="the previous page's next_page_token, unchanged (opaque); empty for the first page",
    ),
]

# The request id of a creating call (POST /v1/datasets, /v1/jobs, /v1/admin/tenants/{name}/keys); gRPC sends it as
# the ``idempotency-key`` metadata. service/store/requests.py keeps it: printable ASCII, which over HTTP cannot begin
# or end with a space (a header value's surrounding spaces are not part of it).
IDEMPOTENCY_KEY_PATTERN = rf"^[!-~]([ -~]{{0,{MAX_KEY_CHARS - 2}}}[!-~])?$"
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_KEY_CHARS,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Any unique string (a UUID) per logical request, the same on each retry of it: a repeat within "
        "GRAFT_IDEMPOTENCY_TTL_S (24 h) answers what the first created instead of creating another. Reused for a "
        "different request: 409 failed_precondition; while the first is still running: 429 with Retry-After. "
        "Keys are per tenant.",
    ),
]


def runtime(request: Request) -> Runtime:
    """The runtime owned by this worker (see ``create_app``)."""
    return request.app.state.runtime()


def calls(request: Request) -> Calls:
    """The calls of the tenant whose API key the gate checked (the core checks ownership)."""
    if TENANT not in request.scope:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    rt = runtime(request)
    key = KeyCheck(rt, request.headers.get("authorization"), request.scope[TENANT], rt.settings.key_recheck_s)
    return Calls(rt, key)


def admin(request: Request) -> None:
    """Routes under /v1/admin: the gate checked the admin key."""
    if not request.scope.get(ADMIN):
        raise PermissionDenied("this endpoint needs the admin key (GRAFT_ADMIN_KEY)")


async def unless_disconnected(request: Request, call: Awaitable[T], poll_s: float = DISCONNECT_POLL_S) -> T:
    """``call``'s result; cancelled once the client has disconnected (then Cancelled, which nobody reads).

    Starlette does not cancel a plain handler when its client goes away; a call that holds a scarce slot
    for long (an audit) is polled here every ``poll_s`` with ``request.is_disconnected()`` instead.
    """
    work = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=poll_s)
            if done:
                return work.result()
            if await request.is_disconnected():
                raise Cancelled("the client disconnected; the call was stopped")
    finally:
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
