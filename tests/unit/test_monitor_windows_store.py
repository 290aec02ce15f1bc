"""The registry side of monitoring (service/store/windows.py, the reference's blob in service/store/heads.py), on
SQLite and PostgreSQL: what replicas on one database share."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from adapters.monitoring import MonitoringReference
from service.config import Settings
from service.errors import NotFound
from service.quotas import Quotas
from service.store.blobs import BlobStore
from service.store.db import Database
from service.store.heads import HeadRegistry
from service.store.windows import ClosedWindow, DriftStatus, MonitorWindows
from tests.unit.test_registry import TENANT, create, named_blob_files

START = datetime(2026, 1, 1, tzinfo=UTC)
DRIFT = {"statistic": 0.5, "threshold": 0.1, "p_value": 0.005, "drifting": True, "window": 4, "test": "t"}


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def registry(registry_url: str, blobs: BlobStore, tmp_path: Path) -> HeadRegistry:
    return HeadRegistry(Database(registry_url), blobs, Quotas(Settings(data_dir=tmp_path)))


def reference_tensors() -> dict[str, torch.Tensor]:
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    return MonitoringReference.fit(x[:30], torch.arange(30) % 3, x[30:], 3).to_tensors()


def window(version: int, minutes: int, drift: dict | None = None) -> ClosedWindow:
    summary = {
        "predictions": 4,
        "label_counts": [2, 1, 1],
        "label_total_variation": 0.1,
        "confidence_histogram": [0] * 9 + [4],
        "abstention_rate": 0.0,
        "ood_rate": 0.25,
        "mean_ood_score": 1.5,
        "drift": drift,
    }
    return ClosedWindow(TENANT, "cats", version, START + timedelta(minutes=minutes), summary)


def test_the_reference_is_a_blob_of_its_own_and_goes_with_its_version(registry, blobs):
    stored = create(registry, monitoring=reference_tensors())
    info = registry.resolve(TENANT, "cats@1")
    assert info.monitor_blob_key is not None and info.monitor_blob_key != info.blob_key
    loaded = MonitoringReference.from_tensors(registry.load_monitoring(info) or {})
    assert torch.equal(loaded.components, MonitoringReference.from_tensors(reference_tensors()).components)
    assert len(named_blob_files(blobs)) == 2 and registry.collect_orphans(grace_s=0) == 0
    registry.delete_version(TENANT, "cats", stored.version)
    assert named_blob_files(blobs) == []


def test_each_version_keeps_its_newest_windows_of_every_replica_oldest_first(registry):
    create(registry)
    first, second = (MonitorWindows(registry.db, replica, kept=3) for replica in ("a", "b"))
    first.add([window(1, 0), window(1, 2)])
    second.add([window(1, 1), window(1, 3)])
    windows = first.windows(TENANT, "cats", 1)
    assert [w.end_time for w in windows] == [START + timedelta(minutes=m) for m in (1, 2, 3)]
    assert windows[0].label_distance == 0.1 and windows[0].drift is None


def test_the_first_drifting_window_marks_the_version_until_cleared(registry):
    create(registry)
    store = MonitorWindows(registry.db, "a", kept=10)
    store.add([window(1, 0), window(1, 1, DRIFT), window(1, 2, DRIFT)])
    state = store.drift_state(TENANT, "cats", 1)
    assert state.status is DriftStatus.DRIFTING and state.drifting_since == START + timedelta(minutes=1)
    assert state.evidence is not None and state.evidence.drift is not None and state.evidence.drift.p_value == 0.005
    store.clear_drift(TENANT, "cats", 1)
    assert store.drift_state(TENANT, "cats", 1).status is DriftStatus.OK
    store.add([window(1, 3, DRIFT)])
    assert store.drift_state(TENANT, "cats", 1).drifting_since == START + timedelta(minutes=3)


def test_windows_of_a_deleted_or_unknown_version_are_not_written_nor_read(registry):
    create(registry)
    store = MonitorWindows(registry.db, "a", kept=10)
    store.add([window(2, 0, DRIFT)])
    assert store.windows(TENANT, "cats", 2) == []
    with pytest.raises(NotFound):
        store.drift_state(TENANT, "cats", 2)
    with pytest.raises(NotFound):
        store.clear_drift(TENANT, "cats", 2)
    store.add([window(1, 0)])
    registry.delete_head(TENANT, "cats")
    assert store.windows(TENANT, "cats", 1) == []
