"""The one place where errors become gRPC status codes (with messages a person can act on).

Anything that is not a GraftError or a validation error is a defect: its text
stays in the log under a reference the client gets, never in the response.
"""

import functools
import inspect
import logging
import math
from collections.abc import Callable

import grpc
from pydantic import ValidationError

from service import errors

log = logging.getLogger(__name__)

GRPC_STATUS: dict[type[errors.GraftError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,  # PayloadTooLarge too
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
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
    message, _ = errors.log_internal_error(log, "a gRPC call", exc)
    return grpc.StatusCode.INTERNAL, message


def trailers_of(exc: Exception) -> tuple[tuple[str, str], ...]:
    """``retry-after`` (whole seconds, rounded up) when the error says when retrying may work."""
    retry_after = getattr(exc, "retry_after_s", None)
    if isinstance(exc, errors.ResourceExhausted) and retry_after is not None:
        return (("retry-after", str(max(1, math.ceil(retry_after)))),)
    return ()


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code, message = status_of(exc)
    await context.abort(code, message, trailing_metadata=trailers_of(exc))


def mapped_errors(method: Callable) -> Callable:
    """Wrap a servicer method (unary or server-streaming) so every error aborts with its status."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort_with(context, exc)

        return streaming

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc)

    return unary
