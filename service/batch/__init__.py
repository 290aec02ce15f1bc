"""Batch predictions: heads x a stored dataset, as background jobs below online predictions (store, execution,
runner, results)."""

from service.batch.runner import BatchRunner
from service.batch.store import BatchInfo, BatchOptions

__all__ = ["BatchInfo", "BatchOptions", "BatchRunner"]
