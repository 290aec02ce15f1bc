"""A dataset's label audit (adapters/audit.py) on one backbone's pooled features, read through the feature cache.

Bounds: the dataset's size is bounded at upload; the work of one audit is
k linear-probe fits and a blocked similarity search on those features, which
stops (truncated) after ``MAX_DUPLICATE_CANDIDATES`` pairs; a worker runs at most
``GRAFT_MAX_CONCURRENT_AUDITS`` at once (its runtime's audit slots; a busy one
answers ResourceExhausted with a retry hint), so audits cannot crowd out training
or serving; and a slot is held no longer than ``GRAFT_MAX_AUDIT_SECONDS``, or
until the caller goes away: extraction, fits and search check a stop flag
between their steps.
"""

import threading
from collections.abc import Callable

import torch
from pydantic import BaseModel, Field

from adapters.audit import DEFAULT_DUPLICATE_SIMILARITY, LabelAudit, audit_labels
from service.engine.backbones import Backbone
from service.engine.extraction import FeatureExtractor
from service.feature_work import audit_slot, stop_check
from service.labelled_set import labelled_set
from service.store.datasets import DatasetStore, ExampleInfo
from service.training import adapter_errors_translated

DEFAULT_AUDIT_ITEMS = 50
MAX_AUDIT_ITEMS = 1000


class AuditRequest(BaseModel):
    """What a caller asks of an audit; 0 for a limit means its default."""

    dataset_id: str
    backbone: str | None = None  # None: the server's GRAFT_DEFAULT_BACKBONE
    max_suspects: int = Field(DEFAULT_AUDIT_ITEMS, ge=0, le=MAX_AUDIT_ITEMS)
    max_duplicates: int = Field(DEFAULT_AUDIT_ITEMS, ge=0, le=MAX_AUDIT_ITEMS)
    duplicate_similarity: float = Field(DEFAULT_DUPLICATE_SIMILARITY, gt=0.0, le=1.0)


class AuditedDataset(BaseModel):
    """The adapters' audit with what it was run on: the labelled examples (images, labels, names and positions);
    the audit's indices are into ``examples``, each of which knows its position in the dataset."""

    dataset_id: str
    backbone: str
    classes: list[str]
    examples: list[ExampleInfo]
    audit: LabelAudit


class DatasetAuditor:
    def __init__(
        self,
        datasets: DatasetStore,
        extractor: FeatureExtractor,
        backbone: Callable[[str], Backbone],
        default_backbone: str,
        max_seconds: float,
    ) -> None:
        self.datasets = datasets
        self.extractor = extractor
        self.backbone = backbone  # the trainer's lookup: InvalidArgument naming the loaded ones
        self.default_backbone = default_backbone  # GRAFT_DEFAULT_BACKBONE: for a request that names none
        self.max_seconds = max_seconds  # GRAFT_MAX_AUDIT_SECONDS

    @adapter_errors_translated()
    def audit(
        self,
        tenant: str,
        request: AuditRequest,
        cancel: threading.Event | None = None,
        slots: threading.Semaphore | None = None,
    ) -> AuditedDataset:
        """Blocking (features may need the trunk): call it off the event loop. Setting ``cancel`` (the caller
        went away) stops it at its next check with Cancelled; past GRAFT_MAX_AUDIT_SECONDS it fails with
        DeadlineExceeded. ``slots`` are the serving worker's audit slots (its runtime's): with none free the audit
        is refused, and its slot is free again once this returns. Without them (a benchmark, a test of the core)
        nothing bounds how many run at once."""
        dataset = labelled_set(self.datasets, tenant, request.dataset_id)  # NotFound first, for another tenant's too
        backbone = self.backbone(request.backbone or self.default_backbone)
        stop = stop_check(
            cancel,
            self.max_seconds,
            "audit",
            ". A duplicate_similarity near 1 (the default 0.98) keeps the search short",
        )
        with audit_slot(slots):
            shas = [example.image_sha256 for example in dataset.examples]
            labels = torch.tensor(dataset.labels)
            features = self.extractor.features(backbone, backbone.num_blocks, shas, tenant=tenant, cancelled=stop)
            audit = audit_labels(
                features,
                labels,
                len(dataset.classes),
                keys=shas,
                max_suspects=request.max_suspects,
                max_duplicates=request.max_duplicates,
                duplicate_similarity=request.duplicate_similarity,
                cancelled=stop,
            )
        return AuditedDataset(
            dataset_id=dataset.dataset_id,
            backbone=backbone.name,
            classes=dataset.classes,
            examples=dataset.examples,
            audit=audit,
        )
