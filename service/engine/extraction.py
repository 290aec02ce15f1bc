"""Trunk features for training, computed once per (image, backbone, split point).

Training never runs the trunk on an image whose features are already cached
(DESIGN.md decision 4): retraining, searches and new heads on the same images
only read the cache. Each chunk first yields to running prediction batches.
"""

from collections.abc import Callable

import torch

from service.engine.backbones import Backbone
from service.errors import Cancelled
from service.store.blobs import BlobStore
from service.store.features import FeatureCache
from service.store.images import decode_rgb

# (images done, images to do) while extracting.
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
        progress: ExtractionProgress | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Features of ``shas`` in order, [N, D] or [N, C, H, W], float32 on CPU."""
        key = Backbone.split_key(split, backbone.num_blocks)
        unique = list(dict.fromkeys(shas))
        todo = self.cache.missing(unique, backbone.name, key)
        for start in range(0, len(todo), self.batch_size):
            if cancelled is not None and cancelled():
                raise Cancelled("job cancelled while extracting features")
            backbone.priority.yield_to_serving()
            chunk = todo[start : start + self.batch_size]
            batch = torch.stack(
                [backbone.preprocess(decode_rgb(self.blobs.get(sha), max_pixels=self.max_pixels)) for sha in chunk]
            )
            feats = backbone.features(batch, split).cpu()
            self.cache.put_many(dict(zip(chunk, feats, strict=True)), backbone.name, key)
            if progress is not None:
                progress(start + len(chunk), len(todo))
        cached = self.cache.get_many(unique, backbone.name, key)
        return torch.stack([cached[sha] for sha in shas])
