"""Training never starves serving (docs/architecture.md, decision 10).

Serving batches and training's feature extraction share one trunk. A serving
batch marks itself while it runs; extraction waits for a moment with no
serving batch before each of its chunks. The wait is bounded, so training
still moves forward under constant prediction load, one chunk at a time.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TrunkPriority:
    def __init__(self, max_wait_s: float = 2.0) -> None:
        self.max_wait_s = max_wait_s
        self._serving = 0
        self._idle = threading.Condition()

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Hold while a prediction batch uses the trunk."""
        with self._idle:
            self._serving += 1
        try:
            yield
        finally:
            with self._idle:
                self._serving -= 1
                self._idle.notify_all()

    def yield_to_serving(self) -> None:
        """Before a chunk of background work: wait (bounded) until no serving batch runs."""
        with self._idle:
            self._idle.wait_for(lambda: self._serving == 0, timeout=self.max_wait_s)
