"""Each tenant's cache of trunk features, keyed by (tenant, image sha256, backbone, split point).

Training reads features from here instead of re-running the backbone, so a
second job or a hyper-parameter search on the same images costs almost nothing.
Entries are float16 ``.npy`` files (half the disk of float32; ample precision
for training a head) at ``<root>/tenants/<tenant dir>/<backbone>/<split>/<sha[:2]>/<sha>.npy``,
where the tenant dir is a hash of the tenant's name (names need not be path-safe and stay off the disk).

Per tenant, never shared: whether a job hits the cache (and so how long it
takes) depends only on what the same tenant computed before, so it tells no
tenant which images another one uploaded. Each entry has a ``FeatureRow``
(written before the file, deleted after the file is unlinked, in one
transaction) so a tenant's cached bytes are counted: over
``GRAFT_QUOTA_FEATURE_BYTES`` its least recently used entries are evicted (a job
never fails for it: it holds its features in memory). ``collect_garbage`` removes
entries of images none of the tenant's datasets holds any more once unused for
``GRAFT_BLOB_GRACE_S``, files without a row, and the old shared layout.

The cache is disposable: writes are atomic but not fsynced, and an unreadable
entry (torn, corrupt, not float16) counts as a miss and is removed, to be
recomputed. So whether an entry is there is only known by reading it: there is
no "is it cached" check that could disagree with what a read returns.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from sqlalchemy import ColumnElement, and_, delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import InvalidArgument
from service.store.blobs import atomic_write
from service.store.db import Database, DatasetRow, ExampleRow, FeatureRow, rows_changed, utcnow

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
TENANTS = "tenants"  # the one folder under the root; anything else is the old shared layout
BATCH = 500  # keys per statement (SQLite binds at most 32,766 parameters)
_T = TypeVar("_T")


def tenant_dir(tenant: str) -> str:
    """The folder of ``tenant``'s entries: a hash, so any tenant name maps to a safe, fixed-length name."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:32]


class FeatureCache:
    def __init__(self, root: Path, db: Database, *, quota_bytes: int, grace_s: float) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = db
        self.quota_bytes = quota_bytes
        self.grace = timedelta(seconds=grace_s)

    # -- reads and writes ---------------------------------------------------------

    def get_many(self, tenant: str, shas: list[str], backbone: str, split: str) -> dict[str, torch.Tensor]:
        """``tenant``'s cached features (float32, CPU) for the shas that have them; misses are left out.

        A hit counts as a use (it moves the entry to the back of the eviction order).
        """
        paths = {sha: self._path(tenant, sha, backbone, split) for sha in shas}
        found: dict[str, torch.Tensor] = {}
        for chunk in _batched(list(dict.fromkeys(shas)), BATCH):
            with self.db.session() as session:  # only entries with a row: those are the ones counted
                listed = set(
                    session.scalars(
                        update(FeatureRow)
                        .where(_keys(tenant, backbone, split, chunk))
                        .values(used_at=utcnow())
                        .returning(FeatureRow.sha256)
                        .execution_options(synchronize_session=False)
                    )
                )
            for sha in chunk:
                if sha not in listed:
                    continue
                array = _load(paths[sha])
                if array is None:  # gone, torn or not ours: recompute it
                    self._drop(tenant, backbone, split, sha)
                    continue
                found[sha] = torch.from_numpy(array.astype(np.float32))
        return found

    def put_many(self, tenant: str, items: dict[str, torch.Tensor], backbone: str, split: str) -> None:
        """Store ``tenant``'s features, then evict its least recently used entries while it is over its quota."""
        for chunk in _batched(list(items.items()), BATCH):
            encoded: dict[str, bytes] = {}
            for sha, tensor in chunk:
                self._path(tenant, sha, backbone, split)  # validates the key before anything is written
                buffer = io.BytesIO()
                np.save(buffer, tensor.detach().to("cpu", torch.float16).numpy(), allow_pickle=False)
                encoded[sha] = buffer.getvalue()
            self._account(tenant, backbone, split, {sha: len(data) for sha, data in encoded.items()})
            for sha, data in encoded.items():  # counted first: what is on disk is never more than what is counted
                atomic_write(self._path(tenant, sha, backbone, split), data, durable=False)
        self.evict(tenant)

    def bytes_used(self, tenant: str) -> int:
        """``tenant``'s cached feature bytes, as its quota counts them."""
        with self.db.session() as session:
            used = session.scalar(
                select(func.coalesce(func.sum(FeatureRow.size), 0)).where(FeatureRow.tenant == tenant)
            )
        return int(used or 0)

    def evict(self, tenant: str) -> int:
        """Remove ``tenant``'s least recently used entries until it is within ``quota_bytes``; how many went."""
        with self.db.session() as session:
            rows = session.execute(
                select(FeatureRow.backbone, FeatureRow.split, FeatureRow.sha256, FeatureRow.size, FeatureRow.used_at)
                .where(FeatureRow.tenant == tenant)
                .order_by(FeatureRow.used_at, FeatureRow.sha256)
            ).all()
            excess = sum(row.size for row in rows) - self.quota_bytes
            removed = 0
            for row in rows:
                if excess <= 0:
                    break
                # Only if unused since it was read here: a job that just read or wrote it keeps it.
                removed += self._delete(session, tenant, row.backbone, row.split, row.sha256, used_at=row.used_at)
                excess -= row.size
        return removed

    # -- collection -----------------------------------------------------------------

    def collect_garbage(self) -> int:
        """Entries of images none of their tenant's datasets holds, unused for the grace; files left without a
        row; the old shared layout. How many entries went."""
        removed = self._remove_old_layout()
        while (swept := self._sweep()) > 0:
            removed += swept
        return removed + self._remove_unlisted_files()

    def _sweep(self) -> int:
        """One transaction: delete up to BATCH unreferenced, unused entries, unlinking their files first."""
        cutoff = utcnow() - self.grace
        referenced = exists().where(
            ExampleRow.dataset_id == DatasetRow.id,
            DatasetRow.tenant == FeatureRow.tenant,
            ExampleRow.image_sha256 == FeatureRow.sha256,
        )
        with self.db.session() as session:
            candidates = session.execute(
                select(FeatureRow.tenant, FeatureRow.backbone, FeatureRow.split, FeatureRow.sha256, FeatureRow.used_at)
                .where(~referenced, FeatureRow.used_at <= cutoff)
                .limit(BATCH)
            ).all()
            removed = 0
            for row in candidates:
                removed += self._delete(session, row.tenant, row.backbone, row.split, row.sha256, used_at=row.used_at)
        return removed

    def _remove_old_layout(self) -> int:
        """The shared cache of before (``<root>/<backbone>/...``): no tenant owns it, so it goes."""
        removed = 0
        for child in self.root.iterdir():
            if child.name == TENANTS:
                continue
            if child.is_dir():
                removed += sum(1 for path in child.rglob("*.npy"))
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        return removed

    def _remove_unlisted_files(self) -> int:
        """Files older than the grace with no row (a write racing an eviction, a crash) and stale temp files."""
        cutoff = time.time() - self.grace.total_seconds()
        stale: list[Path] = []
        for path in (self.root / TENANTS).rglob("*"):
            try:
                if path.is_file() and path.stat().st_mtime <= cutoff:
                    stale.append(path)
            except FileNotFoundError:
                continue
        removed = 0
        for chunk in _batched(stale, BATCH):
            entries = [p for p in chunk if not p.name.startswith(".")]
            shas = sorted({p.stem for p in entries})
            with self.db.session() as session:
                listed = {
                    (tenant_dir(row.tenant), row.backbone, row.split, row.sha256)
                    for row in session.execute(
                        select(FeatureRow.tenant, FeatureRow.backbone, FeatureRow.split, FeatureRow.sha256).where(
                            FeatureRow.sha256.in_(shas)
                        )
                    )
                }
            for path in chunk:
                # <root>/tenants/<tenant dir>/<backbone>/<split>/<sha[:2]>/<sha>.npy
                key = (path.parents[3].name, path.parents[2].name, path.parents[1].name, path.stem)
                if path.name.startswith(".") or key not in listed:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    # -- rows -------------------------------------------------------------------------

    def _account(self, tenant: str, backbone: str, split: str, sizes: dict[str, int]) -> None:
        """Upsert the rows of entries about to be written (size, used now)."""
        while True:
            now = utcnow()
            try:
                with self.db.session() as session:
                    shas = list(sizes)
                    present = set(
                        session.scalars(select(FeatureRow.sha256).where(_keys(tenant, backbone, split, shas)))
                    )
                    for sha in present:
                        session.execute(
                            update(FeatureRow)
                            .where(_keys(tenant, backbone, split, [sha]))
                            .values(size=sizes[sha], used_at=now)
                            .execution_options(synchronize_session=False)
                        )
                    session.add_all(
                        FeatureRow(tenant=tenant, backbone=backbone, split=split, sha256=sha, size=size, used_at=now)
                        for sha, size in sizes.items()
                        if sha not in present
                    )
                return
            except IntegrityError:
                continue  # another job of the tenant inserted one of them first: update that row

    def _drop(self, tenant: str, backbone: str, split: str, sha: str) -> None:
        with self.db.session() as session:
            self._delete(session, tenant, backbone, split, sha, used_at=None)

    def _delete(
        self, session: Session, tenant: str, backbone: str, split: str, sha: str, *, used_at: datetime | None
    ) -> int:
        """Delete one row (if still ``used_at``) and unlink its file before the transaction commits."""
        statement = delete(FeatureRow).where(_keys(tenant, backbone, split, [sha]))
        if used_at is not None:
            statement = statement.where(FeatureRow.used_at == used_at)
        if rows_changed(session.execute(statement.execution_options(synchronize_session=False))) == 0:
            return 0
        self._path(tenant, sha, backbone, split).unlink(missing_ok=True)
        return 1

    def _path(self, tenant: str, sha: str, backbone: str, split: str) -> Path:
        for what, value in (("backbone", backbone), ("split point", split)):
            if not _NAME.match(value):
                raise InvalidArgument(f"{what} '{value}' is not a valid cache key; use letters, digits, '_', '-', '.'")
        if not _SHA256.match(sha):
            raise InvalidArgument(f"'{sha}' is not a sha256 hex digest (64 lowercase hex characters)")
        return self.root / TENANTS / tenant_dir(tenant) / backbone / split / sha[:2] / f"{sha}.npy"


def _keys(tenant: str, backbone: str, split: str, shas: Iterable[str]) -> ColumnElement[bool]:
    return and_(
        FeatureRow.tenant == tenant,
        FeatureRow.backbone == backbone,
        FeatureRow.split == split,
        FeatureRow.sha256.in_(list(shas)),
    )


def _load(path: Path) -> np.ndarray | None:
    """The entry's array, or None (after removing the file) if it is missing, torn or not float16."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (ValueError, OSError, EOFError):  # torn or corrupt entry
        path.unlink(missing_ok=True)
        return None
    if array.dtype != np.float16:  # not written by put_many
        path.unlink(missing_ok=True)
        return None
    return array


def _batched(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
