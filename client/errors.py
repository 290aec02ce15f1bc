"""Errors the client raises: the server's code and message, whichever transport carried them.

The HTTP door answers ``{code, message, details}`` with a status; the gRPC door a
status code with a message (and a ``retry-after`` trailer). Both become one
``GraftError`` subclass per kind, so callers catch ``NotFound`` whatever the transport.
"""

from typing import Any


class GraftError(Exception):
    """An error the server (or the way to it) reported; ``str()`` is one line a person can act on."""

    code = "unknown"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.details = details or {}
        self.status = status
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(GraftError):
    code = "invalid_argument"


class Unauthenticated(GraftError):
    code = "unauthenticated"


class PermissionDenied(GraftError):
    code = "permission_denied"


class NotFound(GraftError):
    code = "not_found"


class AlreadyExists(GraftError):
    code = "already_exists"


class FailedPrecondition(GraftError):
    code = "failed_precondition"


class ResourceExhausted(GraftError):
    """A quota, rate or queue limit; ``retry_after_s`` says when trying again may work."""

    code = "resource_exhausted"


class Unavailable(GraftError):
    """The server is down, unreachable or draining, or the way to it broke.

    ``may_have_run``: False when the call certainly never ran (no connection was made, or graft itself refused
    it: draining), True when it may have (a reset connection, a proxy's 502 after the request was sent). Only
    calls that are safe to repeat (reads, or creating calls that carry an idempotency key) are retried then.
    """

    code = "unavailable"

    def __init__(self, message: str, *, may_have_run: bool = True, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.may_have_run = may_have_run


class DeadlineExceeded(GraftError):
    code = "deadline_exceeded"


class Cancelled(GraftError):
    code = "cancelled"


class Internal(GraftError):
    code = "internal"


_BY_CODE: dict[str, type[GraftError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}
_BY_STATUS: dict[int, type[GraftError]] = {
    400: InvalidArgument,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    408: DeadlineExceeded,
    409: FailedPrecondition,
    413: InvalidArgument,
    422: InvalidArgument,
    429: ResourceExhausted,
    502: Unavailable,
    503: Unavailable,
    504: DeadlineExceeded,
}


def error_for(code: str, message: str, **kwargs: Any) -> GraftError:
    """The exception for a server error code (``not_found``, or a gRPC ``NOT_FOUND``)."""
    code = code.lower()
    return _BY_CODE.get(code, GraftError)(message, code=code, **kwargs)


def error_for_status(status: int, code: str | None, message: str, **kwargs: Any) -> GraftError:
    """The exception for an HTTP answer: by its body's code, else by its status."""
    if code in _BY_CODE:
        return _BY_CODE[code](message, code=code, status=status, **kwargs)
    cls = _BY_STATUS.get(status, Internal if status >= 500 else GraftError)
    return cls(message, code=code, status=status, **kwargs)
