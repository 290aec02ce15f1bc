"""The one place where errors become HTTP statuses and a JSON body ``{code, message, details}``.

Anything that is not a GraftError, a validation error or an HTTPException is a
defect: the client gets ``internal error (reference <id>)`` and the log gets the
details under that reference, never the response.
"""

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors

log = logging.getLogger(__name__)

HTTP_STATUS: dict[type[errors.GraftError], int] = {
    errors.PayloadTooLarge: 413,  # before InvalidArgument, its base
    errors.InvalidArgument: 400,
    errors.Unauthenticated: 401,
    errors.PermissionDenied: 403,
    errors.NotFound: 404,
    errors.AlreadyExists: 409,
    errors.FailedPrecondition: 409,
    errors.Cancelled: 409,
    errors.ResourceExhausted: 429,
    errors.Unavailable: 503,
    errors.DeadlineExceeded: 504,
}

# Statuses Starlette and FastAPI raise themselves (unknown route, wrong method, the gate's body limits).
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 408: "deadline_exceeded", 413: "payload_too_large"}


class ErrorBody(BaseModel):
    """Every error answer of the HTTP door (and the data of an SSE ``event: error``)."""

    code: str = Field(description="the kind of error, e.g. invalid_argument, not_found, resource_exhausted")
    message: str = Field(description="what went wrong and what to do about it, for a person")
    details: dict[str, Any] = Field(description="machine-readable context, e.g. the problems of a malformed request")


_MEANING = {
    400: "invalid argument (a bad name, value, image or page token)",
    401: "missing or invalid API key",
    403: "not the admin key",
    404: "not found (also another tenant's resources)",
    405: "method not allowed",
    408: "the request body did not arrive in time",
    409: "failed precondition or already exists",
    413: "request body too large",
    422: "malformed request (details.problems lists each field)",
    429: "resource exhausted: a quota, rate or queue limit; retry after Retry-After seconds",
    500: "internal error (the log has the details under details.reference)",
    503: "this replica is shutting down; retry (another replica answers)",
    504: "deadline exceeded",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds after which retrying may work", "schema": {"type": "integer"}}}
# What any /v1 call can answer, whatever it does (429: too many failed authentications from one client address).
COMMON_ERRORS = (400, 401, 408, 413, 422, 429, 500, 503)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each with the ErrorBody model."""
    return {
        status: {"model": ErrorBody, "description": _MEANING[status]}
        | ({"headers": _RETRY_AFTER} if status == 429 else {})
        for status in statuses
    }


def error_body(code: str, message: str, details: dict) -> dict:
    return {"code": code, "message": message, "details": details}


def error_response(exc: errors.GraftError) -> JSONResponse:
    status = next((s for cls, s in HTTP_STATUS.items() if isinstance(exc, cls)), 500)
    headers = {}
    if isinstance(exc, errors.ResourceExhausted) and exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=status, headers=headers)


# Starlette types every handler's exception as Exception; each is registered for one kind, asserted here.
async def _graft_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.GraftError)
    return error_response(exc)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "invalid_argument" if exc.status_code < 500 else "internal")
    return JSONResponse(error_body(code, str(exc.detail), {}), status_code=exc.status_code, headers=exc.headers)


def _method_not_allowed(routes: list[BaseRoute]) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """405 with every method the path takes in ``Allow``: Starlette's names only the first matching route's."""

    async def handler(request: Request, _: Exception) -> JSONResponse:
        allowed = sorted(
            {
                m
                for route in routes
                if route.matches(request.scope)[0] is not Match.NONE
                for m in getattr(route, "methods", None) or ()
            }
        )
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
        return JSONResponse(
            error_body("method_not_allowed", message, {"allowed": allowed}),
            status_code=405,
            headers={"Allow": ", ".join(allowed)},
        )

    return handler


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    problems = [{"field": ".".join(str(part) for part in e["loc"]), "problem": e["msg"]} for e in exc.errors()]
    message = "; ".join(f"{p['field']}: {p['problem']}" for p in problems) or "invalid request"
    return JSONResponse(error_body("invalid_argument", message, {"problems": problems}), status_code=422)


def install_error_handlers(app: FastAPI, routes: list[BaseRoute]) -> None:
    """``routes``: every route of the app's routers (FastAPI nests included routers out of reach of ``app.routes``)."""
    app.add_exception_handler(errors.GraftError, _graft_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(405, _method_not_allowed(routes))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)


class HideInternalErrors:
    """Outermost middleware: an unexpected exception answers 500 with a reference, its details go to the log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            message, reference = errors.log_internal_error(log, f"{scope['method']} {scope['path']}", exc)
            if started:
                raise  # the response is under way: all that can be done is to break it off
            body = error_body("internal", message, {"reference": reference})
            await JSONResponse(body, status_code=500)(scope, receive, send)


class ErrorBodyOutsideTheApp:
    """Around BentoML's own app: its plain-text 404 (no route) and 405 (e.g. ``POST /livez``) become the error body.

    The FastAPI app sees only paths it routes (BentoML mounts it passively), so an unknown path never reaches
    ``install_error_handlers``; this middleware gives those answers the same ``{code, message, details}``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def replacing_send(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and _is_plain_routing_error(message):
                replaced = True
                await _routing_error(scope, message)(scope, receive, send)
                return
            if replaced:
                return  # the plain-text body of the replaced answer
            await send(message)

        await self.app(scope, receive, replacing_send)


def _is_plain_routing_error(start: Message) -> bool:
    headers = Headers(raw=start.get("headers", []))
    return start["status"] in (404, 405) and headers.get("content-type", "").startswith("text/plain")


def _routing_error(scope: Scope, start: Message) -> JSONResponse:
    method, path = scope["method"], scope["path"]
    if start["status"] == 404:
        body = error_body("not_found", f"no route {method} {path}; the API is listed at /openapi.json", {})
        return JSONResponse(body, status_code=404)
    declared = Headers(raw=start.get("headers", [])).get("allow", "")
    allowed = sorted(m.strip() for m in declared.split(",") if m.strip())  # sorted: Starlette's order is a set's
    allow = ", ".join(allowed)
    body = error_body(
        "method_not_allowed", f"{method} is not allowed on {path}; allowed: {allow}", {"allowed": allowed}
    )
    return JSONResponse(body, status_code=405, headers={"Allow": allow})


class NotReadyBody:
    """Around BentoML's own app: ``/readyz`` on a worker that is not ready answers 503 with the error body saying
    why (shutting down, registry unreachable, a replica that only trains), where BentoML's says only "not ready".

    ``reason()`` is the runtime's ``not_ready_reason``; None (ready, or no runtime yet) leaves the answer to BentoML,
    which asks ``Graft.__is_ready__`` as before. ``/livez`` is never touched: a replica that is not ready is alive.
    """

    def __init__(self, app: ASGIApp, reason: Callable[[], str | None], path: str = "/readyz") -> None:
        self.app = app
        self.reason = reason
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path and scope["method"] in ("GET", "HEAD"):
            reason = self.reason()
            if reason is not None:
                response = JSONResponse(error_body(errors.Unavailable.code, reason, {}), status_code=503)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
