"""The HTTP door's gate: who is calling, and how much they may send, decided before a byte of the body is read.

A pure ASGI middleware (``@app.middleware("http")`` would buffer the body). For
``/v1/...`` it authenticates the ``Authorization`` header in the authentication pool
(the admin key for ``/v1/admin/...``) and puts the tenant into the request
scope, where the ``tenant`` dependency reads it. Then it bounds the body (a
JSON body more tightly than a multipart one, as JSON is parsed in one piece on
the event loop): a declared ``Content-Length`` over the limit is refused at
once; a chunked body is counted as it streams and refused when it crosses the limit, or when it does
not end within ``upload_timeout_s``. While the worker drains, new ``/v1``
calls are refused with 503 (clients and nginx retry on another replica) and
the calls already admitted are counted, so the drain can wait for them. A
prediction that arrives while the predictor's queue is full is refused with 429
before its body is read: under a flood of retries, refusing must stay cheap. A
dataset upload's body counts against the worker's in-flight upload bytes, which
gRPC upload streams share (GRAFT_MAX_INFLIGHT_UPLOAD_BYTES): its declared length
is reserved before reading (429 with Retry-After when it does not fit), a chunked
one is counted as it streams.
"""

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from fastapi import params
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import CLIENT
from service.calls import InflightBytes
from service.config import Settings
from service.errors import GraftError, InvalidArgument, PayloadTooLarge, ResourceExhausted, Unavailable
from service.http.errors import error_response
from service.runtime import Runtime

TENANT = "graft.tenant"  # scope key: the authenticated tenant
ADMIN = "graft.admin"  # scope key: True once the admin key was checked
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
Route = TypeVar("Route", bound=BaseRoute)


class Gate:
    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        runtime: Callable[[], Runtime],
        predictions: Sequence[BaseRoute],
        datasets: Sequence[BaseRoute],
    ) -> None:
        """``predictions`` and ``datasets``: the routers' routes (service/http/predict.py, datasets.py), matched
        as routes, not by path literals, so that a renamed route keeps its checks before the body. A dataset
        route that reads a form is an upload."""
        self.app = app
        self.settings = settings
        self.runtime = runtime
        self.predictions = [route for route in predictions if isinstance(route, APIRoute)]
        self.uploads = [route for route in datasets if isinstance(route, APIRoute) and _reads_form(route)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        prediction = _matching(self.predictions, scope)
        upload = _matching(self.uploads, scope) is not None
        try:
            await self._admit(scope, prediction)
            limit, setting = self._limit(prediction, upload)
            _check_declared_length(Headers(scope=scope), limit, setting)
        except GraftError as exc:
            await error_response(exc)(scope, receive, send)
            return
        if not scope["path"].startswith("/v1/") or scope["path"].endswith(":watch"):
            # health, docs, and event streams (which a client resumes) do not hold a drain up
            await self.app(scope, _bounded(receive, limit, setting, self.settings.upload_timeout_s), send)
            return
        runtime = self.runtime()
        budget = _UploadBytes(runtime.uploads) if upload else None
        if budget is not None:
            try:
                budget.reserve(Headers(scope=scope).get("content-length"))
            except GraftError as exc:
                await error_response(exc)(scope, receive, send)
                return
        runtime.http_in_flight += 1
        try:
            timeout_s = self.settings.upload_timeout_s
            await self.app(scope, _bounded(receive, limit, setting, timeout_s, budget), send)
        finally:
            runtime.http_in_flight -= 1
            if budget is not None:
                budget.give_back()

    async def _admit(self, scope: Scope, prediction: APIRoute | None) -> None:
        path: str = scope["path"]
        if _CONTROL.search(path):
            raise InvalidArgument("the request path contains control characters")
        if not path.startswith("/v1/"):
            return  # documentation and unknown paths: nothing to protect
        if self.runtime().draining:
            raise Unavailable("this replica is shutting down; retry the call (another replica will answer it)")
        authorization = Headers(scope=scope).get("authorization")
        client = scope.get("client")
        CLIENT.set(client[0] if client else None)  # the rate limits of failed authentication count per address
        tenants = self.runtime().tenants
        if path.startswith("/v1/admin/"):
            if _matching(scope["app"].router.routes, scope) is None:
                return  # an unknown route or method: the router answers 404 or 405, the body unread
            tenants.require_admin(authorization)
            scope[ADMIN] = True
        else:
            scope[TENANT] = await self.runtime().authenticate(authorization)
        if prediction is not None:
            self.runtime().predictor.check_room()  # a full replica refuses before the body is read

    def _limit(self, prediction: APIRoute | None, upload: bool) -> tuple[int, str]:
        """The body limit of this route: multipart bodies are parsed as they stream, JSON ones in one piece."""
        if upload:
            return self.settings.max_upload_bytes, "GRAFT_MAX_UPLOAD_BYTES"
        if prediction is not None and _reads_form(prediction):
            return self.settings.max_request_bytes, "GRAFT_MAX_REQUEST_BYTES"
        return self.settings.max_json_bytes, "GRAFT_MAX_JSON_BYTES"


def _reads_form(route: APIRoute) -> bool:
    """Whether the route's body is a form (multipart, parsed part by part), as FastAPI itself decides it."""
    return route.body_field is not None and isinstance(route.body_field.field_info, params.Form)


def _matching(routes: Sequence[Route], scope: Scope) -> Route | None:
    """The one of ``routes`` that takes this request (path and method), if any."""
    return next((route for route in routes if route.matches(scope)[0] is Match.FULL), None)


class _UploadBytes:
    """One HTTP dataset upload's share of the worker's in-flight upload bytes (shared with gRPC streams):
    a declared Content-Length is reserved whole before a byte is read; a chunked body takes its bytes as
    they arrive. All of it is held until the answer is sent (the parsed parts are held until then)."""

    def __init__(self, inflight: InflightBytes) -> None:
        self.inflight = inflight
        self.declared = False
        self.held = 0

    def reserve(self, content_length: str | None) -> None:
        if content_length is not None:  # already checked: ASCII digits within the upload limit
            self.inflight.take(int(content_length), f"this upload of {int(content_length):,} bytes")
            self.declared, self.held = True, int(content_length)

    def take(self, size: int) -> None:
        """Bytes of a chunked body as they arrive; raises HTTPException(429) once they do not fit."""
        if self.declared or not size:
            return
        try:
            self.inflight.take(size, "this upload's next part")
        except ResourceExhausted as exc:
            raise HTTPException(429, exc.message, headers={"Retry-After": "5"}) from None
        self.held += size

    def give_back(self) -> None:
        self.inflight.give_back(self.held)
        self.held = 0


def _check_declared_length(headers: Headers, limit: int, setting: str) -> None:
    declared = headers.get("content-length")
    if declared is None:
        return
    if not declared.isascii() or not declared.isdigit():
        raise InvalidArgument(f"Content-Length {declared[:32]!r} is not a number of bytes")
    if int(declared) > limit:
        raise PayloadTooLarge(_too_large(f"request body of {int(declared):,} bytes", limit, setting))


def _too_large(what: str, limit: int, setting: str) -> str:
    return f"{what} is over the limit of {limit:,} bytes ({setting}); send less, e.g. split a dataset in parts"


def _bounded(
    receive: Receive, limit: int, setting: str, timeout_s: float, budget: _UploadBytes | None = None
) -> Receive:
    """``receive`` that counts body bytes as they arrive and raises HTTPException(413 or 408) past the limits,
    or 429 when an upload's chunked body no longer fits the in-flight upload budget.

    FastAPI re-raises an HTTPException met while it parses a body; the app's handler answers it. Once the
    body has ended, messages pass through untouched (a streaming response listens for the disconnect).
    """
    received = 0
    ended = False
    deadline = time.monotonic() + timeout_s

    async def bounded_receive() -> Message:
        nonlocal received, ended
        if ended:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise HTTPException(
                408, f"the request body did not arrive within {timeout_s:g} s (GRAFT_UPLOAD_TIMEOUT_S)"
            ) from None
        if message["type"] == "http.request":
            size = len(message.get("body", b""))
            received += size
            ended = not message.get("more_body", False)
            if received > limit:
                raise HTTPException(413, _too_large("the request body", limit, setting))
            if budget is not None:
                budget.take(size)
        else:
            ended = True
        return message

    return bounded_receive
