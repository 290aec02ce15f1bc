"""Retries only where they are safe: the call never ran, or running it again changes nothing.

UNAVAILABLE / 502 / 503 (down, unreachable, draining, or the connection broke) and
RESOURCE_EXHAUSTED / 429 (a queue or rate limit refused it at the door) are retried
with exponential backoff and jitter; a ``Retry-After`` the server sent is honoured
instead. An Unavailable that may have come after the server ran the call (a reset
connection, a proxy's 502) is retried only for a ``safe`` call: a read, or a creating
call that carries an idempotency key, which the server answers with what the first try
created (the client sends the same key on every try of one call). Nothing else is
retried: a failed call may have had effects.
"""

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from client.errors import GraftError, ResourceExhausted, Unavailable

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # tries in all; 1 means no retry
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0  # also the most a Retry-After may make the client wait

    def delay(self, attempt: int, error: GraftError) -> float:
        """Seconds to wait before try number ``attempt + 1``."""
        if error.retry_after_s is not None:
            return min(error.retry_after_s, self.max_delay_s)
        backoff = min(self.base_delay_s * 2**attempt, self.max_delay_s)
        return backoff * (0.5 + random.random() / 2)

    def call(
        self, attempt_once: Callable[[], T], *, sleep: Callable[[float], None] = time.sleep, safe: bool = True
    ) -> T:
        """``attempt_once()``, tried again on a retryable error until ``attempts`` are spent. ``safe``: running the
        call twice does no harm (a read; a creating call with an idempotency key), so a try that may have run is
        retried too."""
        for attempt in range(self.attempts):
            try:
                return attempt_once()
            except (Unavailable, ResourceExhausted) as error:
                if attempt + 1 == self.attempts or not retryable(error, safe=safe):
                    raise
                sleep(self.delay(attempt, error))
        raise AssertionError("unreachable")  # the loop returns or raises


def retryable(error: GraftError, *, safe: bool = True) -> bool:
    """429 is retried only when waiting can help: the server sends Retry-After then (a quota on storage does not);
    an Unavailable that may have run, only for a ``safe`` call."""
    if isinstance(error, Unavailable):
        return safe or not error.may_have_run
    return error.retry_after_s is not None


DEFAULT_RETRY = RetryPolicy()
