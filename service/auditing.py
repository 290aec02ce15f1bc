"""A dataset's label audit (adapters/audit.py) on one backbone's pooled features, read through the feature cache.

Bounds: the dataset's size is bounded at upload; the work of one audit is
k linear-probe fits and a blocked similarity search on those features; and a
worker runs at most ``MAX_CONCURRENT_AUDITS`` at once (a busy one answers
ResourceExhausted with a retry hint), so audits cannot crowd out training or serving.
"""

import threading
from collections.abc import Callable

import torch
from pydantic import BaseModel, Field

from adapters.audit import DEFAULT_DUPLICATE_SIMILARITY, LabelAudit, audit_labels
from service.engine.backbones import Backbone
from service.engine.extraction import FeatureExtractor
from service.errors import ResourceExhausted
from service.store.datasets import DatasetStore
from service.training import adapter_errors_translated

DEFAULT_AUDIT_BACKBONE = "mobilenet_v2"
DEFAULT_AUDIT_ITEMS = 50
MAX_AUDIT_ITEMS = 1000
MAX_CONCURRENT_AUDITS = 1
AUDIT_RETRY_S = 10.0

_running = threading.BoundedSemaphore(MAX_CONCURRENT_AUDITS)


class AuditRequest(BaseModel):
    """What a caller asks of an audit; 0 for a limit means its default."""

    dataset_id: str
    backbone: str = DEFAULT_AUDIT_BACKBONE
    max_suspects: int = Field(DEFAULT_AUDIT_ITEMS, ge=0, le=MAX_AUDIT_ITEMS)
    max_duplicates: int = Field(DEFAULT_AUDIT_ITEMS, ge=0, le=MAX_AUDIT_ITEMS)
    duplicate_similarity: float = Field(DEFAULT_DUPLICATE_SIMILARITY, gt=0.0, le=1.0)


class AuditedDataset(BaseModel):
    """The adapters' audit with what it was run on: the examples' images and labels, by position."""

    dataset_id: str
    backbone: str
    classes: list[str]
    shas: list[str]
    labels: list[str]
    audit: LabelAudit


class DatasetAuditor:
    def __init__(
        self, datasets: DatasetStore, extractor: FeatureExtractor, backbone: Callable[[str], Backbone]
    ) -> None:
        self.datasets = datasets
        self.extractor = extractor
        self.backbone = backbone  # the trainer's lookup: InvalidArgument naming the loaded ones

    @adapter_errors_translated()
    def audit(self, tenant: str, request: AuditRequest) -> AuditedDataset:
        """Blocking (features may need the trunk): call it off the event loop."""
        dataset = self.datasets.get(tenant, request.dataset_id)  # NotFound first, for another tenant's too
        backbone = self.backbone(request.backbone)
        if not _running.acquire(blocking=False):
            raise ResourceExhausted(
                f"this worker is already running {MAX_CONCURRENT_AUDITS} audit(s); retry shortly",
                retry_after_s=AUDIT_RETRY_S,
            )
        try:
            examples = self.datasets.examples(tenant, request.dataset_id)
            shas = [sha for sha, _ in examples]
            class_index = {name: i for i, name in enumerate(dataset.classes)}
            labels = torch.tensor([class_index[label] for _, label in examples])
            features = self.extractor.features(backbone, backbone.num_blocks, shas)
            audit = audit_labels(
                features,
                labels,
                len(dataset.classes),
                keys=shas,
                max_suspects=request.max_suspects,
                max_duplicates=request.max_duplicates,
                duplicate_similarity=request.duplicate_similarity,
            )
        finally:
            _running.release()
        return AuditedDataset(
            dataset_id=dataset.id,
            backbone=backbone.name,
            classes=dataset.classes,
            shas=shas,
            labels=[label for _, label in examples],
            audit=audit,
        )
