"""What bounds the feature work a caller waits on (a label audit, a ranking of images to label next): one of the
worker's audit slots (GRAFT_MAX_CONCURRENT_AUDITS), and a wall-clock limit (GRAFT_MAX_AUDIT_SECONDS) checked,
with the caller's cancellation, between steps."""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from service.errors import Cancelled, DeadlineExceeded, ResourceExhausted

RETRY_S = 10.0  # the retry hint of a refusal for want of a slot

Stop = Callable[[], bool]  # True: the caller went away; raises DeadlineExceeded past the limit


@contextmanager
def audit_slot(slots: threading.Semaphore | None) -> Iterator[None]:
    """Hold one of the worker's slots while the block runs; with none free, refuse at once. Without slots (a
    benchmark, a test of the core) nothing bounds how many run at once."""
    if slots is not None and not slots.acquire(blocking=False):
        raise ResourceExhausted(
            "this worker is already running as many audits and suggestions as it may at once "
            "(GRAFT_MAX_CONCURRENT_AUDITS); retry shortly",
            retry_after_s=RETRY_S,
        )
    try:
        yield
    finally:
        if slots is not None:
            slots.release()


def stop_check(cancel: threading.Event | None, max_seconds: float, what: str, advice: str = "") -> Stop:
    """The check the work's steps call: whether ``cancel`` is set, and DeadlineExceeded once ``max_seconds`` from
    now have passed (``what`` names the work in the message, ``advice`` ends it)."""
    deadline = time.monotonic() + max_seconds

    def stop() -> bool:
        if cancel is not None and cancel.is_set():
            return True
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"the {what} ran longer than {max_seconds:g} s, the limit of one (GRAFT_MAX_AUDIT_SECONDS); "
                f"features computed so far stay cached, so asking again goes on from there{advice}"
            )
        return False

    return stop


def check(stop: Stop, what: str) -> None:
    """Between steps that do not check ``stop`` themselves: Cancelled once the caller went away (and, from ``stop``,
    DeadlineExceeded past the limit), even when every feature was already cached."""
    if stop():
        raise Cancelled(f"the {what} stopped: its caller went away")
