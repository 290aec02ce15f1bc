"""Opaque page tokens for List methods (AIP-158).

A token is the sort key of the last item on the previous page, JSON-encoded and
base64url'd. Clients must treat it as opaque; anything that does not decode to
the expected shape is an InvalidArgument, never a server error: not deeply
nested JSON (RecursionError), not a timestamp past year 9999 (OverflowError).
"""

import base64
import binascii
import json
from datetime import UTC, datetime

from service.errors import InvalidArgument

MAX_PAGE_SIZE = 1000
MAX_TOKEN_CHARS = 4096  # a real token holds a timestamp and an id or two: far less


def check_page_size(page_size: int) -> None:
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {page_size}")


def encode_token(*keys: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(keys)).encode()).decode().rstrip("=")


def decode_token(token: str, arity: int) -> list[str]:
    """Return the ``arity`` string keys inside ``token``.

    Only a flat JSON list of strings is parsed: a nested one is refused before ``json.loads`` can recurse.
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise malformed_token(token)
    try:
        padded = token + "=" * (-len(token) % 4)
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
        if text.count("[") + text.count("{") > 1:  # a string key holding brackets is refused too: ids never do
            raise malformed_token(token)
        keys = json.loads(text)
    except (ValueError, binascii.Error, UnicodeError, RecursionError):
        raise malformed_token(token) from None
    if not (isinstance(keys, list) and len(keys) == arity and all(isinstance(k, str) for k in keys)):
        raise malformed_token(token)
    if any(_has_control(k) for k in keys):
        raise malformed_token(token)
    return keys


def decode_time(token: str, value: str) -> datetime:
    """A timestamp key of ``token`` (as ``encode_token`` wrote it), in UTC, or InvalidArgument for anything else.

    Converted here, so that an offset near year 1 or 9999 overflows now and not when the query binds it.
    """
    try:
        moment = datetime.fromisoformat(value)
        return moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise malformed_token(token) from None


def malformed_token(token: str) -> InvalidArgument:
    return InvalidArgument(
        f"page_token {token[:64]!r} is malformed; pass the next_page_token from the previous response unchanged"
    )


def _has_control(value: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in value)
