"""Trunk features for training, computed once per (tenant, image, backbone, split point).

Training never runs the trunk on an image whose features the same tenant already has
cached (docs/architecture.md, decision 4): retraining, searches and new heads on the same
images only read the cache. Each chunk first yields to running prediction batches.

The cache is per tenant (``service/store/features.py``): another tenant's jobs never warm
it, so neither the time a job takes nor its progress tells a tenant which images another
one uploaded. Progress still counts all of a request's images (a cached one is done at
once), at chunk boundaries of the request's own images. An extraction without a tenant
(``tenant=None``) neither reads nor writes the cache.
"""

from collections.abc import Callable

import torch
from PIL import Image

from service.engine.backbones import Backbone
from service.errors import Cancelled
from service.store.blobs import BlobStore
from service.store.features import FeatureCache
from service.store.images import decode_rgb

# (images done, images in the request) while extracting.
ExtractionProgress = Callable[[int, int], None]


class FeatureExtractor:
    def __init__(self, blobs: BlobStore, cache: FeatureCache, *, batch_size: int, max_pixels: int) -> None:
        self.blobs = blobs
        self.cache = cache
        self.batch_size = batch_size
        self.max_pixels = max_pixels

    def features(
        self,
        backbone: Backbone,
        split: int,
        shas: list[str],
        *,
        tenant: str | None = None,
        progress: ExtractionProgress | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Features of ``shas`` in order, [N, D] or [N, C, H, W], float32 on CPU.

        Read from and written to ``tenant``'s cache; with no tenant, all computed and nothing cached.
        """
        key = backbone.feature_key(split)
        unique = list(dict.fromkeys(shas))
        # What reads back; a corrupt entry is a miss.
        found = {} if tenant is None else self.cache.get_many(tenant, unique, backbone.name, key)
        todo = [sha for sha in unique if sha not in found]
        reporter = _Reporter(unique, found, self.batch_size, progress)
        reporter.advance()
        for start in range(0, len(todo), self.batch_size):
            if cancelled is not None and cancelled():
                raise Cancelled("job cancelled while extracting features")
            backbone.priority.yield_to_serving()
            chunk = todo[start : start + self.batch_size]
            batch = torch.stack([backbone.preprocess(self._decode(sha)) for sha in chunk])
            # Rounded as the cache stores them, so results never depend on whether the cache was warm.
            feats = backbone.features(batch, split, side_by_side=True).cpu().to(torch.float16).to(torch.float32)
            computed = dict(zip(chunk, feats, strict=True))
            if tenant is not None:
                self.cache.put_many(tenant, computed, backbone.name, key)
            found.update(computed)
            reporter.advance()
        return torch.stack([found[sha] for sha in shas])

    def _decode(self, sha: str) -> Image.Image:
        return decode_rgb(self.blobs.get(sha), max_pixels=self.max_pixels, name=f"image {sha}")


class _Reporter:
    """Reports (done, total) at each multiple of the batch size, once, as the done prefix of ``unique`` passes it."""

    def __init__(
        self, unique: list[str], done: dict[str, torch.Tensor], step: int, progress: ExtractionProgress | None
    ) -> None:
        self.unique = unique
        self.done = done
        self.step = step
        self.progress = progress
        self.prefix = 0  # unique[:prefix] are all done
        self.reported = 0

    def advance(self) -> None:
        while self.prefix < len(self.unique) and self.unique[self.prefix] in self.done:
            self.prefix += 1
        total = len(self.unique)
        while self.progress is not None and self.reported < total:
            point = min(self.reported + self.step, total)
            if point > self.prefix:
                break
            self.progress(point, total)
            self.reported = point
