"""What both doors do around a call: authenticate and reach the store off the event loop, re-check open streams.

The event loop also runs the batcher, so one database round trip on it stalls
every prediction in flight. Store calls (authentication included) run in their
own small pool, so image decoding in the default pool cannot starve them.
"""

import asyncio
import contextvars
import functools
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from service.auth import Tenants
from service.errors import Unauthenticated

P = ParamSpec("P")
T = TypeVar("T")

_STORE_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="store")


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` in the store pool, awaited from the event loop."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_STORE_POOL, call)


async def authenticate(tenants: Tenants, authorization: str | None) -> str:
    """The caller's tenant; the key lookup hits the database, so it runs in the store pool."""
    return await in_thread(tenants.authenticate, authorization)


class KeyCheck:
    """The key of an open stream, checked again every ``every_s`` so that revoking it ends the stream."""

    def __init__(self, tenants: Tenants, authorization: str | None, tenant: str, every_s: float) -> None:
        self.tenants = tenants
        self.authorization = authorization
        self.tenant = tenant
        self.every_s = every_s
        self.checked_at = time.monotonic()

    def seconds_left(self) -> float:
        return max(0.0, self.checked_at + self.every_s - time.monotonic())

    async def recheck_if_due(self) -> None:
        """Raise Unauthenticated if the key was revoked (or now names another tenant)."""
        if self.seconds_left() > 0:
            return
        if await authenticate(self.tenants, self.authorization) != self.tenant:
            raise Unauthenticated("invalid API key")
        self.checked_at = time.monotonic()


async def while_key_valid(stream: AsyncIterator[T], key: KeyCheck) -> AsyncIterator[T]:
    """The items of ``stream``; ends with Unauthenticated once ``key`` stops working, even while no item comes."""
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(stream))
            done, _ = await asyncio.wait({pending}, timeout=key.seconds_left())
            await key.recheck_if_due()
            if not done:
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
