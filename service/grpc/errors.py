"""The one place where core errors become gRPC status codes (with messages a person can act on)."""

import functools
import inspect
import logging
from collections.abc import Callable

import grpc
from pydantic import ValidationError

from service import errors

log = logging.getLogger(__name__)

GRPC_STATUS: dict[type[errors.GraftError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
}


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message for an error raised by the core or by request validation."""
    if isinstance(exc, errors.GraftError):
        code = next((c for cls, c in GRPC_STATUS.items() if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
        return code, exc.message
    if isinstance(exc, ValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return grpc.StatusCode.INVALID_ARGUMENT, problems
    log.exception("unexpected error in a gRPC call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def mapped_errors(method: Callable) -> Callable:
    """Wrap a servicer method (unary or server-streaming) so core errors abort with their status."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except (errors.GraftError, ValidationError) as exc:
                await context.abort(*status_of(exc))

        return streaming

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except (errors.GraftError, ValidationError) as exc:
            await context.abort(*status_of(exc))

    return unary
