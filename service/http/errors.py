"""The one place where core errors become HTTP statuses and a JSON body ``{code, message, details}``."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from service import errors

HTTP_STATUS: dict[type[errors.GraftError], int] = {
    errors.InvalidArgument: 400,
    errors.Unauthenticated: 401,
    errors.PermissionDenied: 403,
    errors.NotFound: 404,
    errors.AlreadyExists: 409,
    errors.FailedPrecondition: 409,
    errors.Cancelled: 409,
    errors.ResourceExhausted: 429,
}


def error_body(code: str, message: str, details: dict) -> dict:
    return {"code": code, "message": message, "details": details}


async def _graft_error(_: Request, exc: errors.GraftError) -> JSONResponse:
    status = next((s for cls, s in HTTP_STATUS.items() if isinstance(exc, cls)), 500)
    return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=status)


async def _validation_error(_: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
    problems = [
        {"field": ".".join(str(part) for part in e["loc"]), "problem": e["msg"]} for e in exc.errors()
    ]
    message = "; ".join(f"{p['field']}: {p['problem']}" for p in problems) or "invalid request"
    return JSONResponse(error_body("invalid_argument", message, {"problems": problems}), status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.GraftError, _graft_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
