"""The core graft assembles from its settings: storage, backbones and the trainer.

Both doors (HTTP and gRPC), benchmarks and tests build exactly this object, so
there is one wiring of the parts and no transport-specific logic.
"""

from dataclasses import dataclass

from service.auditing import DatasetAuditor
from service.config import Settings
from service.engine.backbones import Backbone, BackboneInfo, TrunkOptions, load_backbone
from service.engine.device import Placement, choose_placement, configure_cpu_threads
from service.engine.extraction import FeatureExtractor
from service.errors import NotFound
from service.quotas import Quotas
from service.store.blobs import BlobStore
from service.store.datasets import DatasetStore
from service.store.db import Database
from service.store.features import FeatureCache
from service.store.heads import HeadRegistry
from service.store.labels import DatasetLabels
from service.suggestions import ExampleSuggester
from service.training import Trainer


@dataclass
class Core:
    settings: Settings
    placement: Placement
    db: Database
    quotas: Quotas
    blobs: BlobStore
    datasets: DatasetStore
    heads: HeadRegistry
    extractor: FeatureExtractor
    backbones: dict[str, Backbone]
    trainer: Trainer
    auditor: DatasetAuditor
    suggester: ExampleSuggester
    labels: DatasetLabels

    def backbone_info(self, name: str) -> BackboneInfo:
        """The ``backbones/{name}`` resource, for either door; NotFound if this service does not load it."""
        if name not in self.backbones:
            raise NotFound(f"backbone '{name}' is not served here; served: {', '.join(sorted(self.backbones))}")
        return self.backbones[name].info()

    @classmethod
    def open(cls, settings: Settings | None = None, backbones: list[str] | None = None) -> "Core":
        """Open storage under ``settings.data_dir`` and load the backbones (default: ``settings.backbones``)."""
        settings = settings or Settings()
        placement = choose_placement(settings.device, settings.trunk_precision)
        if placement.device.type == "cpu":
            configure_cpu_threads(settings.torch_threads)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.resolved_registry_url, settings.blob_dir)
        quotas = Quotas(settings)
        blobs = BlobStore(settings.blob_dir)
        datasets = DatasetStore(db, blobs, settings, quotas)
        heads = HeadRegistry(db, blobs, quotas)
        extractor = FeatureExtractor(
            blobs,
            FeatureCache(
                settings.feature_dir, db, quota_bytes=settings.quota_feature_bytes, grace_s=settings.blob_grace_s
            ),
            batch_size=settings.feature_batch_size,
            max_pixels=settings.max_image_pixels,
        )
        names = settings.backbones if backbones is None else backbones
        options = TrunkOptions(runtime=settings.trunk_runtime, cache_dir=settings.trunk_cache_dir)
        loaded = {name: load_backbone(name, placement, settings.weights_dir, options) for name in names}
        trainer = Trainer(loaded, datasets, extractor, heads, settings.default_backbone)
        auditor = DatasetAuditor(
            datasets, extractor, trainer.backbone, settings.default_backbone, settings.max_audit_seconds
        )
        labels = DatasetLabels(db, settings)
        suggester = ExampleSuggester(datasets, heads, extractor, loaded, settings.max_audit_seconds)
        return cls(
            settings,
            placement,
            db,
            quotas,
            blobs,
            datasets,
            heads,
            extractor,
            loaded,
            trainer,
            auditor,
            suggester,
            labels,
        )
