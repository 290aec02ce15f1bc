"""Head lookups read what they serve: one reference reads one version's serving columns, lists read summaries.

A version's metrics can be megabytes (a 1,000-class confusion matrix); a head may have hundreds of versions.
Checked by the SQL each lookup sends, on SQLite and a real PostgreSQL.
"""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from sqlalchemy import event

from service.config import Settings
from service.quotas import Quotas
from service.store.blobs import BlobStore
from service.store.db import Database
from service.store.heads import HeadRegistry

TENANT = "acme"
VERSIONS = 12
CONFUSION = [[7] * 200 for _ in range(200)]  # a 200-class confusion matrix: about 80 KB of JSON per version
# The full metrics column, not metrics_summary (quoted or not, with or without the table's name).
FULL_METRICS = re.compile(r'(^|[\s,."])metrics("?)(\s|,|$)', re.IGNORECASE)


@pytest.fixture
def registry(registry_url: str, tmp_path: Path) -> HeadRegistry:
    registry = HeadRegistry(Database(registry_url), BlobStore(tmp_path / "blobs"), Quotas(Settings(data_dir=tmp_path)))
    for version in range(1, VERSIONS + 1):
        registry.create_version(
            TENANT, "big", tensors={"weight": torch.zeros(2, 4)}, backbone="mobilenet_v2", split_point=None,
            kind="linear", classes=["a", "b"], config={"v": version}, hyperparams={"lr": 0.1},
            metrics={"accuracy": version / 100, "confusion_matrix": CONFUSION}, dataset_id="ds_1",
        )  # fmt: skip
    registry.set_alias(TENANT, "big", "prod", 3)
    return registry


@contextmanager
def selects(registry: HeadRegistry) -> Iterator[list[str]]:
    """The SELECT statements sent while the block runs."""
    sent: list[str] = []

    def record(_conn, _cursor, statement: str, *_args) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append(statement)

    event.listen(registry.db.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(registry.db.engine, "before_cursor_execute", record)


def reads_full_metrics(statement: str) -> bool:
    columns = statement.split(" FROM ")[0]
    return bool(FULL_METRICS.search(columns))


@pytest.mark.parametrize(("ref", "version"), [("big", VERSIONS), ("big@5", 5), ("big:prod", 3), ("big:latest", 12)])
def test_resolving_a_reference_never_reads_any_versions_metrics(registry, ref, version):
    with selects(registry) as sent:
        info = registry.resolve(TENANT, ref)
    assert info.version == version and info.config == {"v": version}
    assert sent and not [s for s in sent if reads_full_metrics(s)], sent


def test_a_list_of_heads_reads_summaries_not_every_versions_full_metrics(registry):
    with selects(registry) as sent:
        heads, _ = registry.list(TENANT)
    assert not [s for s in sent if reads_full_metrics(s)], sent
    (head,) = heads
    assert len(head.versions) == VERSIONS
    assert head.versions[4].metrics == {"accuracy": 0.05}  # the summary: its top-level numbers


def test_one_heads_page_and_one_version_still_have_their_full_metrics(registry):
    assert registry.get(TENANT, "big").versions[0].metrics["confusion_matrix"] == CONFUSION
