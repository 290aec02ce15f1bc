"""Mark-and-sweep collection of dataset images (content-addressed blobs, one ``BlobRow`` each).

An image file is shared by every dataset of every tenant that uploaded the same
bytes, so it may go only when no example refers to it *and* no upload in flight
is about to. The protocol:

- an upload pins each image (``pinned_until`` = now + ``GRAFT_BLOB_GRACE_S``)
  and commits the pin *before* it writes the file, then makes sure the file
  exists (a sweep may have removed it just before the pin);
- the transaction that commits the dataset's rows refreshes its pins, and fails
  if one was collected meanwhile (an upload slower than the grace); after the
  commit each pin is put back to what it overwrote, unless another upload
  re-pinned the image since (then that upload's pin stands);
- a sweep deletes only rows no example refers to whose pin has expired (or was
  released), and unlinks their files *before* its transaction commits, so a pin
  racing it waits for the commit and then rewrites the file.

Files with no row (from before pins existed, or temp files of a crashed write)
are adopted once they are older than the grace, and then swept like any other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice
from typing import TypeVar

from sqlalchemy import ColumnElement, bindparam, delete, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import DeadlineExceeded
from service.store.blobs import BlobStore
from service.store.db import BlobRow, Database, ExampleRow, utcnow

log = logging.getLogger(__name__)

BATCH = 500  # rows per statement (SQLite binds at most 32,766 parameters) and per sweep transaction
_T = TypeVar("_T")


@dataclass(frozen=True)
class Pin:
    """One upload's pin on one image: the value it wrote, and what to put back when it is done."""

    sha: str
    until: datetime
    restore: datetime | None


class BlobCollector:
    def __init__(self, db: Database, blobs: BlobStore, grace_s: float) -> None:
        self.db = db
        self.blobs = blobs
        self.grace = timedelta(seconds=grace_s)

    # -- pins (uploads) -----------------------------------------------------------

    def pin(self, sha: str, size: int) -> Pin:
        """Pin ``sha`` in its own committed transaction; call before writing its file."""
        until = utcnow() + self.grace
        while True:
            try:
                with self.db.session() as session:
                    _lock(session, [sha])
                    row = session.get(BlobRow, sha)
                    if row is None:
                        session.add(BlobRow(sha256=sha, size=size, pinned_until=until))
                        return Pin(sha, until, None)
                    previous = row.pinned_until
                    if previous is not None and previous >= until:
                        return Pin(sha, previous, previous)  # a longer pin already holds it
                    row.pinned_until = until
                    return Pin(sha, until, previous)
            except IntegrityError:
                continue  # another upload inserted the row first: pin that row

    def refresh(self, session: Session, pins: Sequence[Pin]) -> list[Pin]:
        """Inside the transaction that commits the rows: extend ``pins``; the pins to release after the commit.

        Raises DeadlineExceeded if an image was collected meanwhile (its pin had expired).
        """
        until = utcnow() + self.grace
        refreshed: list[Pin] = []
        for chunk in _batched(pins, BATCH):
            shas = [pin.sha for pin in chunk]
            _lock(session, shas)
            rows = {row.sha256: row for row in session.scalars(select(BlobRow).where(BlobRow.sha256.in_(shas)))}
            for pin in chunk:
                row = rows.get(pin.sha)
                if row is None:
                    raise DeadlineExceeded(
                        f"the upload took longer than GRAFT_BLOB_GRACE_S ({self.grace.total_seconds():g} s), so "
                        "images it had stored were collected; upload it again, in smaller parts if it is slow"
                    )
                # Someone else pinned it since ours: put theirs back on release, not what ours overwrote.
                restore = pin.restore if row.pinned_until == pin.until else row.pinned_until
                row.pinned_until = max(until, row.pinned_until or until)
                refreshed.append(Pin(pin.sha, row.pinned_until, restore))
        return refreshed

    def release(self, pins: Sequence[Pin]) -> None:
        """Put each pin back to what it overwrote, unless another upload pinned the image since.

        Best effort: a pin left in place only delays collection until it expires.
        """
        statement = (
            update(BlobRow)
            .where(BlobRow.sha256 == bindparam("b_sha"), BlobRow.pinned_until == bindparam("b_until"))
            .values(pinned_until=bindparam("b_restore"))
        )
        try:
            for chunk in _batched(pins, BATCH):
                with self.db.session() as session:
                    session.connection().execute(
                        statement, [{"b_sha": p.sha, "b_until": p.until, "b_restore": p.restore} for p in chunk]
                    )
        except Exception:
            log.exception("could not release upload pins; the images are collectable once the pins expire")

    def abandon(self, pins: Sequence[Pin]) -> None:
        """A failed upload: release its pins and remove the images nothing else uses or pins.

        Best effort, called while another error propagates: whatever is left is
        collected by the periodic sweep once the pins expire.
        """
        self.release(pins)
        try:
            self.collect(pin.sha for pin in pins)
        except Exception:
            log.exception("could not remove the images of a failed upload; the periodic sweep will")

    # -- sweep ----------------------------------------------------------------------

    def collect(self, shas: Iterable[str]) -> int:
        """Remove those of ``shas`` that no example refers to and nobody pins; how many went."""
        return sum(self._sweep(BlobRow.sha256.in_(chunk)) for chunk in _batched(sorted(set(shas)), BATCH))

    def collect_garbage(self) -> int:
        """Every unreferenced blob whose pin expired, and files left without a row; how many went."""
        removed = self._adopt_leftovers()
        while (swept := self._sweep(None)) > 0:
            removed += swept
        return removed

    def _sweep(self, among: ColumnElement[bool] | None) -> int:
        """One transaction: delete up to BATCH collectable rows, unlinking their files before the commit."""
        now = utcnow()
        collectable = [
            ~exists().where(ExampleRow.image_sha256 == BlobRow.sha256),
            or_(BlobRow.pinned_until.is_(None), BlobRow.pinned_until <= now),
        ]
        if among is not None:
            collectable.append(among)
        with self.db.session() as session:
            candidates = list(session.scalars(select(BlobRow.sha256).where(*collectable).limit(BATCH)))
            if not candidates:
                return 0
            # The DELETE checks the conditions again, under the write lock: the SELECT was only a hint.
            deleted = list(
                session.scalars(
                    delete(BlobRow)
                    .where(BlobRow.sha256.in_(candidates), *collectable)
                    .returning(BlobRow.sha256)
                    .execution_options(synchronize_session=False)
                )
            )
            for sha in deleted:
                self.blobs.delete(sha)
            return len(deleted)

    def _adopt_leftovers(self) -> int:
        """Give rows (unpinned) to sha files older than the grace that have none; delete stale temp files."""
        cutoff = time.time() - self.grace.total_seconds()
        removed = 0
        orphans: dict[str, int] = {}
        for path in self.blobs.content_files():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # a write renamed it, or a sweep removed it, meanwhile
            if stat.st_mtime > cutoff:
                continue  # maybe an upload in flight
            if path.name.startswith("."):  # temp file of a write that crashed
                path.unlink(missing_ok=True)
                removed += 1
            else:
                orphans[path.name] = stat.st_size
        for chunk in _batched(sorted(orphans), BATCH):
            with self.db.session() as session:
                known = set(session.scalars(select(BlobRow.sha256).where(BlobRow.sha256.in_(chunk))))
            for sha in chunk:
                if sha not in known:
                    self._adopt(sha, orphans[sha])
        return removed

    def _adopt(self, sha: str, size: int) -> None:
        try:
            with self.db.session() as session:
                session.add(BlobRow(sha256=sha, size=size, pinned_until=None))
        except IntegrityError:
            pass  # an upload pinned it meanwhile: it has a row now


def _lock(session: Session, shas: list[str]) -> None:
    """Take the rows' write locks (and SQLite's database lock) so that what is read next stays true until commit."""
    session.execute(
        update(BlobRow)
        .where(BlobRow.sha256.in_(shas))
        .values(size=BlobRow.size)
        .execution_options(synchronize_session=False)
    )


def _batched(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
