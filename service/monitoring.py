"""One replica's observations of what it serves: shadow comparisons, prediction records (for feedback) and
monitoring.

Every image answered gets a prediction id (a random URL-safe token); what each head version and its shadow
answered is recorded under it so that the caller can report the true label later (:meth:`Monitor.feedback`).

The predictor hands every answered request to :meth:`Monitor.observe`, on the event loop: it only adds to
in-memory counts (no database call, no allocation that grows with traffic beyond the bound), so serving never
waits for the registry. A background task (:meth:`Monitor.run`) adds the counts to the registry database every
GRAFT_MONITOR_FLUSH_S, additively (service/store/observations.py), so the figures of every replica combine;
reads (:compare, ...) flush this replica first, so a caller sees its own predictions at once. What one replica
holds between flushes is bounded by GRAFT_MONITOR_MAX_PENDING; a flush that fails (the database is away) is
logged and its counts are lost, never retried into unbounded memory.

With GRAFT_MONITORING on, every served version's images also go into that version's open window
(service/monitor_windows.py); a full window is summarised, drift test included, in the store thread at the next
flush and written as this replica's row (service/store/windows.py), which may mark the version drifting.
"""

import asyncio
import logging
import os
import secrets
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import torch

from adapters.errors import InvalidInput
from service.config import Settings
from service.engine.head_cache import IMAGENET_TENANT
from service.engine.predictor import Served
from service.monitor_windows import FullWindow, OpenWindows
from service.store.db import utcnow
from service.store.observations import (
    ComparisonKey,
    ComparisonTally,
    Feedback,
    Observations,
    PredictionRecord,
    RecordedHead,
)
from service.store.windows import ClosedWindow, MonitorWindows

log = logging.getLogger(__name__)

PREDICTION_ID_BYTES = 16  # random bytes of a prediction id: 22 URL-safe characters
# What a prediction id can look like (URL-safe base64, with room to grow): anything else is refused before a lookup.
PREDICTION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

T = TypeVar("T")
InThread = Callable[[Callable[[], T]], Awaitable[T]]


class ObservationMetrics(Protocol):
    """Where observations are counted for Prometheus (fixed-cardinality series only: service/metrics.py)."""

    def shadow_predictions(self, count: int) -> None: ...

    def feedback(self, correct: bool) -> None: ...

    def monitor_window(self, drifting: bool) -> None: ...


class Monitor:
    def __init__(
        self,
        observations: Observations,
        settings: Settings,
        in_thread: InThread,
        metrics: ObservationMetrics | None = None,
    ) -> None:
        """``in_thread(fn)`` runs a database write off the event loop (the runtime's store pool)."""
        self.metrics = metrics
        self.observations = observations
        self.settings = settings
        self._in_thread = in_thread
        self._comparisons: dict[ComparisonKey, ComparisonTally] = {}
        self._records: list[PredictionRecord] = []
        self._pending = 0  # observations held since the last flush
        self._flushing = asyncio.Lock()
        self.windows = OpenWindows(settings.monitor_window, settings.monitor_max_versions)
        replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.window_store = MonitorWindows(
            observations.db, replica, settings.monitor_windows_kept, settings.webhook_deliveries_kept
        )

    @property
    def keeps_embeddings(self) -> bool:
        """Monitoring compares served images' pooled features with the training data's."""
        return self.settings.monitoring

    def observe(self, tenant: str, served: list[Served], embeddings: dict[str, torch.Tensor]) -> list[str]:
        """Count each head's agreement with its shadow, record what every image was answered; its ids."""
        images = len(served[0].answers) if served else 0
        ids = [secrets.token_urlsafe(PREDICTION_ID_BYTES) for _ in range(images)]
        if self._room(images):
            now = utcnow()
            for index, prediction_id in enumerate(ids):
                heads = [_recorded(one, index) for one in served if one.head.key.tenant != IMAGENET_TENANT]
                self._records.append(PredictionRecord(tenant, prediction_id, heads, now))
        for one in served:
            if one.shadow is None or one.shadow_answers is None:
                continue
            if self.metrics is not None:
                self.metrics.shadow_predictions(len(one.answers))
            if not self._room(len(one.answers)):
                break
            key = ComparisonKey(tenant, one.head.name, one.head.version, one.shadow.version)
            tally = self._comparisons.setdefault(key, ComparisonTally())
            for answer, shadow in zip(one.answers, one.shadow_answers, strict=True):
                tally.add(answer.top[0].label, shadow.top[0].label, answer.top[0].score, shadow.top[0].score)
        if self.settings.monitoring:
            for one in served:
                if one.head.key.tenant != IMAGENET_TENANT:
                    self._watch(one, embeddings.get(one.head.backbone))
        return ids

    def _watch(self, served: Served, embeddings: torch.Tensor | None) -> None:
        """Count the answers into the version's window; what monitoring cannot count (a broken head's NaN scores)
        is logged and left out, never failing the request it only watches."""
        try:
            self.windows.add(served.head, served.answers, embeddings)
        except InvalidInput as exc:
            log.warning("%s version %d: not monitored: %s", served.head.name, served.head.version, exc)

    def _room(self, count: int) -> bool:
        """Take ``count`` places of GRAFT_MONITOR_MAX_PENDING, or say there are none."""
        if self._pending + count > self.settings.monitor_max_pending:
            return False
        self._pending += count
        return True

    async def flush(self) -> None:
        """Add what this replica observed to the database; returns once everything observed before the call is
        there (a flush already under way is waited for)."""
        async with self._flushing:
            comparisons, self._comparisons = self._comparisons, {}
            records, self._records = self._records, []
            self._pending = 0
            full = self.windows.take_full()
            await self._in_thread(lambda: self.observations.add_comparisons(comparisons))
            await self._in_thread(lambda: self.observations.add_records(records))
            closed = await self._in_thread(lambda: self._write_windows(full))
            if self.metrics is not None:
                for window in closed:
                    self.metrics.monitor_window(window.drifting)

    def _write_windows(self, full: list[FullWindow]) -> list[ClosedWindow]:
        """Summarise (drift-test) the full windows and write them: in the store thread, never on the loop."""
        closed = [ClosedWindow(*window.key, window.end_time, window.summary()) for window in full]
        self.window_store.add(closed)
        return closed

    async def feedback(self, tenant: str, prediction_id: str, label: str) -> Feedback:
        """The true label of a prediction, counted for each version that answered it (this replica's pending
        records flushed first, so an id it answered a moment ago is found)."""
        await self.flush()
        feedback = await self._in_thread(lambda: self.observations.feedback(tenant, prediction_id, label))
        if self.metrics is not None:
            for verdict in feedback.heads:
                self.metrics.feedback(verdict.correct)
        return feedback

    async def run(self) -> None:
        """Flush every GRAFT_MONITOR_FLUSH_S until cancelled."""
        while True:
            await asyncio.sleep(self.settings.monitor_flush_s)
            try:
                await self.flush()
            except Exception:
                log.exception("could not write observations to the registry; they are dropped")


def _recorded(served: Served, index: int) -> RecordedHead:
    answer = served.answers[index]
    shadow = served.shadow_answers[index] if served.shadow_answers is not None else None
    return RecordedHead(
        head=served.head.name,
        version=served.head.version,
        label=answer.top[0].label,
        shadow_version=None if shadow is None else shadow.version,
        shadow_label=None if shadow is None else shadow.top[0].label,
    )
