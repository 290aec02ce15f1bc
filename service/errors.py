"""One error taxonomy for the whole core.

The engine raises these; each transport maps them to its own status codes in
one place (HTTP statuses, gRPC status codes). Messages are written for the
person who has to act on them.
"""

import logging
import re
import uuid
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


class PayloadTooLarge(InvalidArgument):
    """A body or upload over its size limit (HTTP 413), refused before it was read whole."""

    code = "payload_too_large"


class ResourceExhausted(GraftError):
    """A quota, rate or queue is full. ``retry_after_s``, when known, says when trying again may work."""

    code = "resource_exhausted"

    def __init__(self, message: str, *, retry_after_s: float | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class Unavailable(GraftError):
    """This replica cannot serve now (draining, or its registry is unreachable): retry, maybe elsewhere."""

    code = "unavailable"


class DeadlineExceeded(GraftError):
    code = "deadline_exceeded"


class Cancelled(GraftError):
    code = "cancelled"


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")


def reason(exc: BaseException, *, limit: int = 200) -> str:
    """A library exception's text, fit for a client: no object reprs or heap addresses, at most ``limit`` chars.

    (PIL says "cannot identify image file <_io.BytesIO object at 0x7f...>": the address tells an attacker about
    the server's memory layout and tells the user nothing.)
    """
    text = _ADDRESS.sub("", _OBJECT_REPR.sub("", str(exc)))
    text = " ".join(text.split()).strip(" :;,") or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def log_internal_error(log: logging.Logger, where: str, exc: BaseException) -> tuple[str, str]:
    """Log an unexpected exception under a fresh reference; returns (message for the client, reference).

    The client sees only the reference, never the exception's text; the log has both.
    """
    reference = uuid.uuid4().hex[:12]
    log.error("internal error in %s (reference %s)", where, reference, exc_info=exc)
    return f"internal error (reference {reference})", reference
