"""Storage: registry database, blobs, datasets, feature cache and head registry.

Everything here is backend-neutral: SQLAlchemy for rows (SQLite or PostgreSQL)
and a directory for blobs. Callers pass a tenant to every call; nothing here
returns another tenant's data.
"""

from service.store.blobs import BlobStore
from service.store.datasets import DatasetInfo, DatasetStore
from service.store.db import Database
from service.store.features import FeatureCache
from service.store.heads import HeadInfo, HeadRegistry, HeadVersionInfo

__all__ = [
    "BlobStore",
    "Database",
    "DatasetInfo",
    "DatasetStore",
    "FeatureCache",
    "HeadInfo",
    "HeadRegistry",
    "HeadVersionInfo",
]
