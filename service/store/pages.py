"""Opaque page tokens for List methods (AIP-158).

A token is the sort key of the last item on the previous page, JSON-encoded and
base64url'd. Clients must treat it as opaque; anything that does not decode to
the expected shape is an InvalidArgument, never a server error.
"""

import base64
import binascii
import json

from service.errors import InvalidArgument

MAX_PAGE_SIZE = 1000


def check_page_size(page_size: int) -> None:
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {page_size}")


def encode_token(*keys: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(keys)).encode()).decode().rstrip("=")


def decode_token(token: str, arity: int) -> list[str]:
    """Return the ``arity`` string keys inside ``token``."""
    try:
        padded = token + "=" * (-len(token) % 4)
        keys = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        raise malformed_token(token) from None
    if not (isinstance(keys, list) and len(keys) == arity and all(isinstance(k, str) for k in keys)):
        raise malformed_token(token)
    return keys


def malformed_token(token: str) -> InvalidArgument:
    return InvalidArgument(
        f"page_token '{token[:64]}' is malformed; pass the next_page_token from the previous response unchanged"
    )
