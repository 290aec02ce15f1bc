"""One replica's open monitoring windows: each served head version's traffic, counted until a window is full.

:meth:`OpenWindows.add` runs on the event loop for every answered request, so it only counts (and scores OOD:
one [B, D] x [D, K] product); a full window is moved to the closed list, and the Monitor summarises it (the drift
test) in the store thread at its next flush. ``WindowStats`` is not thread-safe: a window is only ever added to
on the loop, and only read once closed, when nothing adds to it any more.

Memory is bounded whatever the tenants do: at most GRAFT_MONITOR_MAX_VERSIONS open windows (the least recently
served version's is dropped beyond it) and as many closed ones awaiting the flush (the oldest dropped beyond),
each at most GRAFT_MONITOR_WINDOW x D x 4 bytes of sampled embeddings. A version without a monitoring reference
keeps no embeddings at all (nothing would test them): one placeholder column is sampled instead.
"""

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch

from adapters.monitoring import MonitoringReference, WindowStats
from service.engine.head_cache import LoadedHead
from service.engine.predictor import HeadPrediction
from service.store.db import utcnow

log = logging.getLogger(__name__)

VersionKey = tuple[str, str, int]  # (tenant, head, version): version numbers are never reused


@dataclass
class _Window:
    stats: WindowStats
    reference: MonitoringReference | None


@dataclass(frozen=True)
class FullWindow:
    """A window closed on the loop, to be summarised (drift-tested) off it."""

    key: VersionKey
    stats: WindowStats
    reference: MonitoringReference | None
    end_time: datetime

    def summary(self) -> dict[str, Any]:
        """``WindowStats.summary``, drift test included; without a reference the OOD figures are None (no image
        was scored), not 0."""
        summary = self.stats.summary(self.reference)
        if self.reference is None:
            summary |= {"ood": None, "ood_rate": None, "mean_ood_score": None, "sampled": 0}
        return summary


class OpenWindows:
    def __init__(self, size: int, max_versions: int) -> None:
        """``size``: GRAFT_MONITOR_WINDOW; ``max_versions``: GRAFT_MONITOR_MAX_VERSIONS."""
        self.size = size
        self.max_versions = max_versions
        self._open: OrderedDict[VersionKey, _Window] = OrderedDict()
        self._full: deque[FullWindow] = deque()
        self.dropped = 0  # windows lost to the bounds (a partial one evicted, or a full one not flushed in time)

    def __len__(self) -> int:
        return len(self._open)

    def add(self, head: LoadedHead, answers: list[HeadPrediction], embeddings: torch.Tensor | None) -> None:
        """Count one request's answers of ``head`` ([images, D] pooled ``embeddings``: None when the batch did
        not compute them, as for a fine-tuned head, which then has no reference either)."""
        reference = head.monitoring
        if reference is not None and embeddings is None:
            log.debug("no pooled features for %s version %d: not monitored", head.name, head.version)
            return
        key = (head.key.tenant, head.name, head.version)
        index = {label: i for i, label in enumerate(head.classes)}
        labels = torch.tensor([index[answer.top[0].label] for answer in answers])
        scores = torch.tensor([answer.top[0].score for answer in answers], dtype=torch.float64)
        abstained = torch.tensor([answer.abstained for answer in answers])
        if reference is not None and embeddings is not None:
            rows = embeddings.float()
            ood = reference.ood_scores(rows)
            threshold = reference.ood_threshold
        else:
            rows = torch.zeros(len(answers), 1)
            ood = torch.zeros(len(answers))
            threshold = float("inf")
        start = 0
        while start < len(answers):
            window = self._window(key, head)
            end = start + min(len(answers) - start, self.size - window.stats.predictions)
            part = slice(start, end)
            window.stats.add(rows[part], labels[part], scores[part], abstained[part], ood[part], threshold)
            if window.stats.predictions >= self.size:
                self._close(key)
            start = end

    def _window(self, key: VersionKey, head: LoadedHead) -> _Window:
        window = self._open.get(key)
        if window is not None and (window.reference is None) != (head.monitoring is None):
            window = None  # its reference was found damaged, or loaded after all: the rows differ in width
        if window is None:
            if len(self._open) >= self.max_versions and key not in self._open:
                self._open.popitem(last=False)
                self.dropped += 1
            capacity = self.size if head.monitoring is not None else 1
            window = _Window(WindowStats(len(head.classes), capacity=capacity), head.monitoring)
            self._open[key] = window
        self._open.move_to_end(key)
        return window

    def _close(self, key: VersionKey) -> None:
        window = self._open.pop(key)
        if len(self._full) >= self.max_versions:
            self._full.popleft()
            self.dropped += 1
        self._full.append(FullWindow(key, window.stats, window.reference, utcnow()))

    def take_full(self) -> list[FullWindow]:
        """The windows closed since the last call, oldest first."""
        full, self._full = list(self._full), deque()
        return full
