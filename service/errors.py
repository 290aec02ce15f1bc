"""One error taxonomy for the whole core.

The engine raises these; each transport maps them to its own status codes in
one place (HTTP statuses, gRPC status codes). Messages are written for the
person who has to act on them.
"""

from typing import Any


class GraftError(Exception):
    """Base of every error a client can cause or needs to know about."""

    code: str = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidArgument(GraftError):
    code = "invalid_argument"


class NotFound(GraftError):
    code = "not_found"


class AlreadyExists(GraftError):
    code = "already_exists"


class PermissionDenied(GraftError):
    code = "permission_denied"


class Unauthenticated(GraftError):
    code = "unauthenticated"


class FailedPrecondition(GraftError):
    code = "failed_precondition"


class ResourceExhausted(GraftError):
    code = "resource_exhausted"


class Cancelled(GraftError):
    code = "cancelled"
