"""The one place where errors become HTTP statuses and a JSON body ``{code, message, details}``.

Anything that is not a GraftError, a validation error or an HTTPException is a
defect: the client gets ``internal error (reference <id>)`` and the log gets the
details under that reference, never the response.
"""

import logging
import math
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
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


def error_body(code: str, message: str, details: dict) -> dict:
    return {"code": code, "message": message, "details": details}


def error_response(exc: errors.GraftError) -> JSONResponse:
    status = next((s for cls, s in HTTP_STATUS.items() if isinstance(exc, cls)), 500)
    headers = {}
    if isinstance(exc, errors.ResourceExhausted) and exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=status, headers=headers)


async def _graft_error(_: Request, exc: errors.GraftError) -> JSONResponse:
    return error_response(exc)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "invalid_argument" if exc.status_code < 500 else "internal")
    return JSONResponse(error_body(code, str(exc.detail), {}), status_code=exc.status_code, headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
    problems = [
        {"field": ".".join(str(part) for part in e["loc"]), "problem": e["msg"]} for e in exc.errors()
    ]
    message = "; ".join(f"{p['field']}: {p['problem']}" for p in problems) or "invalid request"
    return JSONResponse(error_body("invalid_argument", message, {"problems": problems}), status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.GraftError, _graft_error)
    app.add_exception_handler(HTTPException, _http_error)
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
            reference = uuid.uuid4().hex[:12]
            log.error("internal error in %s %s (reference %s)", scope["method"], scope["path"], reference,
                      exc_info=exc)
            if started:
                raise  # the response is under way: all that can be done is to break it off
            body = error_body("internal", f"internal error (reference {reference})", {"reference": reference})
            await JSONResponse(body, status_code=500)(scope, receive, send)
