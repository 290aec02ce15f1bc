"""Retries only where they are safe: the server said "not now" before doing anything.

UNAVAILABLE / 503 (down, unreachable or draining: the call never ran) and
RESOURCE_EXHAUSTED / 429 (a queue or rate limit refused it at the door) are retried
with exponential backoff and jitter; a ``Retry-After`` the server sent is honoured
instead. Nothing else is retried: a failed call may have had effects.
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

    def call(self, attempt_once: Callable[[], T], *, sleep: Callable[[float], None] = time.sleep) -> T:
        """``attempt_once()``, tried again on a retryable error until ``attempts`` are spent."""
        for attempt in range(self.attempts):
            try:
                return attempt_once()
            except (Unavailable, ResourceExhausted) as error:
                if attempt + 1 == self.attempts or not retryable(error):
                    raise
                sleep(self.delay(attempt, error))
        raise AssertionError("unreachable")  # the loop returns or raises


def retryable(error: GraftError) -> bool:
    """429 is retried only when waiting can help: the server sends Retry-After then (a quota on storage does not)."""
    return isinstance(error, Unavailable) or error.retry_after_s is not None


DEFAULT_RETRY = RetryPolicy()
