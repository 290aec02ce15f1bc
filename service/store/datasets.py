"""Datasets: validated, labelled images owned by a tenant.

``create`` consumes an upload lazily and holds one image at a time: each image
is validated, pinned and written to the content-addressed blob store (identical
images are stored once, across tenants) as it arrives; the dataset's rows are
committed in one transaction at the end. A dataset either exists completely or
not at all: on any failure the images only this upload stored are removed
again. Which images may be deleted, and when, is ``service.store.collector``'s
business (mark and sweep), so a delete never races another tenant's upload.
"""

from __future__ import annotations

import builtins
import re
import unicodedata
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel
from sqlalchemy import ColumnElement, and_, delete, func, or_, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.errors import InvalidArgument, NotFound
from service.quotas import Quotas
from service.store.archives import Example, examples_from_folder, examples_from_zip
from service.store.blobs import BlobStore
from service.store.collector import BlobCollector, Pin
from service.store.db import Database, DatasetRow, ExampleRow, utcnow
from service.store.images import inspect_image
from service.store.pages import check_page_size, decode_time, decode_token, encode_token, malformed_token

MAX_LABEL_CHARS = 128
MAX_NAME_CHARS = 256
MAX_FILE_NAME_CHARS = 1024
MAX_CLIENT_ID_CHARS = 128
# A client id is addressed in a URL path (datasets/{dataset}/examples/{example}): URL-safe characters only, not
# all digits (those address an example by its position) and not '.' or '..' (path segments a URL resolves away).
CLIENT_ID_PATTERN = rf"^[A-Za-z0-9._~-]{{1,{MAX_CLIENT_ID_CHARS}}}$"

# An upload's image with the uploader's own id for it (None: none given).
IdentifiedExample = tuple[str, bytes, str | None, str | None]


class DatasetInfo(BaseModel):
    """``classes`` are the labels its labelled examples have, ``counts`` how many of each; ``num_unlabelled`` the
    examples without a label yet (a pool's)."""

    id: str
    name: str
    tenant: str
    created_at: datetime
    num_examples: int
    classes: list[str]
    counts: dict[str, int]
    num_labelled: int
    num_unlabelled: int


class ExampleInfo(BaseModel):
    """One example as its upload named it: ``file_name`` is None for examples uploaded before names were kept;
    ``label`` is None for an unlabelled example (a pool's image, not yet labelled)."""

    index: int
    file_name: str | None
    client_id: str | None
    label: str | None
    image_sha256: str


class UploadBudget:
    """The per-upload limits on image count and bytes, checked file by file as an upload arrives.

    Streaming doors use it too, so they can refuse before holding the rest.
    """

    def __init__(self, settings: Settings) -> None:
        self.max_images = settings.max_images_per_dataset
        self.max_bytes = settings.max_upload_bytes
        self.images = 0
        self.bytes = 0

    def take(self, file_name: str, size: int) -> None:
        if self.images == self.max_images:
            raise InvalidArgument(
                f"the upload has more than {self.max_images:,} images, the limit per dataset; "
                "split it into smaller datasets"
            )
        self.images += 1
        self.bytes += size
        if self.bytes > self.max_bytes:
            raise InvalidArgument(
                f"the upload exceeds the limit of {self.max_bytes:,} bytes at file '{file_name}'; "
                "split it into smaller datasets"
            )


class DatasetStore:
    def __init__(self, db: Database, blobs: BlobStore, settings: Settings, quotas: Quotas) -> None:
        self.db = db
        self.blobs = blobs
        self.settings = settings
        self.quotas = quotas
        self.collector = BlobCollector(db, blobs, settings.blob_grace_s)

    # -- create ------------------------------------------------------------------

    def create(self, tenant: str, name: str, examples: Iterable[Example | IdentifiedExample]) -> DatasetInfo:
        """Validate and store each (file name, image bytes, label[, client id]) as it arrives, then commit."""
        upload = self.begin(tenant, name)
        try:
            for example in examples:
                upload.add(*example)
            return upload.commit()
        except BaseException:
            upload.abandon()
            raise

    def begin(self, tenant: str, name: str) -> DatasetUpload:
        """An upload taken one image at a time (``add``), then ``commit`` or ``abandon``: a streaming door
        calls each step when its image has arrived, so no thread waits for a client between images."""
        return DatasetUpload(self, tenant, name)

    def _check_class_count(self, classes: int, file_name: str, label: str) -> None:
        limit = self.settings.max_classes
        if classes > limit:
            raise InvalidArgument(
                f"the upload has more than {limit:,} classes (class {label!r} of file '{file_name}' is one too "
                "many), the limit per dataset (GRAFT_MAX_CLASSES); merge classes or split the dataset"
            )

    def create_from_labelled(
        self,
        tenant: str,
        name: str,
        files: Sequence[tuple[str, bytes | BinaryIO]],
        labels: Sequence[str],
        client_ids: Sequence[str] = (),
    ) -> DatasetInfo:
        """Multipart uploads: files (bytes, or file objects read one at a time), labels and, optionally, client ids
        as parallel lists (an empty client id: that file has none). No labels at all, or an empty one for a file,
        leaves those files unlabelled (a pool, labelled later)."""
        if labels and len(labels) != len(files):
            raise InvalidArgument(
                f"{len(labels)} labels for {len(files)} files; send exactly one label per file, in the same order "
                "(an empty one for a file to leave unlabelled), or none for an unlabelled pool"
            )
        if client_ids and len(client_ids) != len(files):
            raise InvalidArgument(
                f"{len(client_ids)} client ids for {len(files)} files; send none, or exactly one per file in the "
                "same order (an empty one for a file without)"
            )
        ids = [client_id or None for client_id in client_ids] if client_ids else [None] * len(files)
        return self.create(tenant, name, self._read_labelled(files, labels or [""] * len(files), ids))

    def _read_labelled(
        self, files: Sequence[tuple[str, bytes | BinaryIO]], labels: Sequence[str], client_ids: Sequence[str | None]
    ) -> Iterator[IdentifiedExample]:
        limit = self.settings.max_image_bytes + 1  # one byte more tells "over the limit" from "at the limit"
        for (file_name, data), label, client_id in zip(files, labels, client_ids, strict=True):
            yield file_name, data if isinstance(data, bytes) else data.read(limit), label, client_id

    def create_from_zip(self, tenant: str, name: str, archive: bytes | Path | BinaryIO) -> DatasetInfo:
        """A class-folder zip: bytes, a path, or a seekable file object (never read whole)."""
        return self.create(tenant, name, examples_from_zip(archive, self.settings))

    def create_from_folder(self, tenant: str, name: str, root: Path) -> DatasetInfo:
        return self.create(tenant, name, examples_from_folder(root, self.settings))

    # -- read ----------------------------------------------------------------------

    def get(self, tenant: str, id: str) -> DatasetInfo:
        with self.db.session() as session:
            row = owned_dataset(session, tenant, id)
            return _info(row, _counts(session, [row.id])[row.id])

    def list(
        self, tenant: str, page_size: int = 50, page_token: str | None = None
    ) -> tuple[list[DatasetInfo], str | None]:
        """Oldest first; the token is the (created_at, id) of the last dataset returned."""
        check_page_size(page_size)
        query = select(DatasetRow).where(DatasetRow.tenant == tenant)
        if page_token:
            created_at, last_id = decode_token(page_token, 2)
            after = decode_time(page_token, created_at)
            query = query.where(
                or_(
                    DatasetRow.created_at > after,
                    and_(DatasetRow.created_at == after, DatasetRow.id > last_id),
                )
            )
        query = query.order_by(DatasetRow.created_at, DatasetRow.id).limit(page_size + 1)
        with self.db.session() as session:
            rows = list(session.scalars(query))
            page, more = rows[:page_size], len(rows) > page_size
            counts = _counts(session, [row.id for row in page])
            infos = [_info(row, counts[row.id]) for row in page]
        next_token = encode_token(page[-1].created_at.isoformat(), page[-1].id) if more else None
        return infos, next_token

    def labelled_examples(self, tenant: str, id: str) -> builtins.list[ExampleInfo]:
        """The examples that have a label, in upload order (what training and audits read)."""
        return self._examples_where(tenant, id, ExampleRow.label.is_not(None))

    def unlabelled_examples(self, tenant: str, id: str) -> builtins.list[ExampleInfo]:
        """The examples still without a label, in upload order (the pool a labelling suggestion picks from)."""
        return self._examples_where(tenant, id, ExampleRow.label.is_(None))

    def _examples_where(self, tenant: str, id: str, condition: ColumnElement[bool]) -> builtins.list[ExampleInfo]:
        with self.db.session() as session:
            owned_dataset(session, tenant, id)
            query = select(ExampleRow).where(ExampleRow.dataset_id == id, condition).order_by(ExampleRow.position)
            return [example_info(row) for row in session.scalars(query)]

    def list_examples(
        self, tenant: str, id: str, page_size: int = 50, page_token: str | None = None
    ) -> tuple[builtins.list[ExampleInfo], str | None]:
        """In upload order; the token is the position of the last example returned."""
        check_page_size(page_size)
        query = select(ExampleRow).where(ExampleRow.dataset_id == id)
        if page_token:
            (last,) = decode_token(page_token, 1)
            position = example_position(last)
            if position is None:
                raise malformed_token(page_token)
            query = query.where(ExampleRow.position > position)
        with self.db.session() as session:
            owned_dataset(session, tenant, id)
            rows = list(session.scalars(query.order_by(ExampleRow.position).limit(page_size + 1)))
            page, more = rows[:page_size], len(rows) > page_size
            infos = [example_info(row) for row in page]
        return infos, encode_token(str(page[-1].position)) if more else None

    def get_example(self, tenant: str, id: str, example: str) -> ExampleInfo:
        """By its client id, or (all digits) by its position in upload order."""
        position = example_position(example)
        where = ExampleRow.client_id == example if position is None else ExampleRow.position == position
        with self.db.session() as session:
            owned_dataset(session, tenant, id)
            row = session.scalar(select(ExampleRow).where(ExampleRow.dataset_id == id, where))
            if row is None:
                raise NotFound(
                    f"dataset '{id}' has no example '{example}' (a client id, or a position from 0); "
                    "list its examples to see them",
                    dataset_id=id,
                )
            return example_info(row)

    def examples(self, tenant: str, id: str) -> builtins.list[tuple[str, str]]:
        """(image sha256, label) pairs of the labelled examples, in upload order."""
        labelled = self.labelled_examples(tenant, id)
        return [(example.image_sha256, example.label) for example in labelled if example.label is not None]

    def read_image(self, sha: str) -> bytes:
        return self.blobs.get(sha)

    # -- delete ----------------------------------------------------------------------

    def delete(self, tenant: str, id: str) -> None:
        """Drop the dataset's rows, then collect its images that nothing refers to or pins any more."""
        with self.db.session() as session:
            owned_dataset(session, tenant, id)
            shas = set(session.scalars(select(ExampleRow.image_sha256).where(ExampleRow.dataset_id == id)))
            session.execute(delete(ExampleRow).where(ExampleRow.dataset_id == id))
            session.execute(delete(DatasetRow).where(DatasetRow.id == id))
        self.collector.collect(shas)

    def collect_garbage(self) -> int:
        """Sweep every unreferenced image whose pin expired, and files a crash left; how many were removed.

        The runtime calls this every ``GRAFT_GC_INTERVAL_S``, in a thread.
        """
        return self.collector.collect_garbage()


class DatasetUpload:
    """One dataset in the making: each ``add`` validates, pins and stores one image; ``commit`` writes the rows
    in one transaction (the dataset exists completely or not at all); ``abandon`` (also after a failed
    ``commit``) releases the images only this upload stored. Steps run one at a time, in any thread."""

    def __init__(self, store: DatasetStore, tenant: str, name: str) -> None:
        _check_text("dataset name", name, MAX_NAME_CHARS)
        self.store = store
        self.tenant = tenant
        self.name = name
        self.pins: dict[str, Pin] = {}
        self.added: list[tuple[str, str | None, str, str | None]] = []  # (sha256, label, file name, client id)
        self.client_ids: set[str] = set()
        self.counts: Counter[str | None] = Counter()  # None: the unlabelled examples
        self.stored_bytes = 0
        self.budget = UploadBudget(store.settings)
        self._ended = False

    def add(self, file_name: str, data: bytes, label: str | None, client_id: str | None = None) -> None:
        """One image; a label that is None or empty leaves it unlabelled (a pool's image, labelled later)."""
        settings = self.store.settings
        self.budget.take(file_name, len(data))
        _check_text("file name", file_name, MAX_FILE_NAME_CHARS)
        label = label or None
        if label is not None:
            check_label(f"label of file '{file_name}'", label)
        if client_id is not None:
            self._check_client_id(file_name, client_id)
        if label is not None and label not in self.counts:
            self.store._check_class_count(len(set(self.counts) - {None}) + 1, file_name, label)
        info = inspect_image(
            data, name=file_name, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )
        if info.sha256 not in self.pins:
            self.pins[info.sha256] = self.store.collector.pin(info.sha256, len(data))
            self.store.blobs.put(data)  # pinned first, so no sweep can take the file away now
            self.stored_bytes += len(data)
        self.added.append((info.sha256, label, file_name, client_id))
        self.counts[label] += 1

    def _check_client_id(self, file_name: str, client_id: str) -> None:
        if re.fullmatch(CLIENT_ID_PATTERN, client_id) is None or client_id.isdigit() or client_id in (".", ".."):
            raise InvalidArgument(
                f"client id {client_id[:MAX_CLIENT_ID_CHARS]!r} of file '{file_name}' is not 1 to "
                f"{MAX_CLIENT_ID_CHARS} of the characters A-Z a-z 0-9 . _ ~ - (and not all digits, which address an "
                "example by its position, nor '.' or '..', which a URL path drops); choose another"
            )
        if client_id in self.client_ids:
            raise InvalidArgument(
                f"client id '{client_id}' of file '{file_name}' is given to an earlier file of this upload too; "
                "client ids are unique within a dataset"
            )
        self.client_ids.add(client_id)

    def commit(self) -> DatasetInfo:
        _check_classes(self.counts)
        row = DatasetRow(
            id=f"ds_{uuid.uuid4().hex}",
            tenant=self.tenant,
            name=self.name,
            created_at=utcnow(),
            num_examples=len(self.added),
            classes=sorted(label for label in self.counts if label is not None),
            stored_bytes=self.stored_bytes,
        )
        row.examples = [
            ExampleRow(image_sha256=sha, label=label, position=i, file_name=file_name, client_id=client_id)
            for i, (sha, label, file_name, client_id) in enumerate(self.added)
        ]
        collector = self.store.collector
        with self.store.db.session() as session:
            held = collector.refresh(session, list(self.pins.values()))
            self.store.quotas.check_new_dataset(session, self.tenant, self.stored_bytes)
            session.add(row)
        self._ended = True
        collector.release(held)  # the example rows hold the images now
        return _info(row, self.counts)

    def abandon(self) -> None:
        """Release what this upload stored, unless it was committed; safe to call more than once."""
        if not self._ended:
            self._ended = True
            self.store.collector.abandon(list(self.pins.values()))


def owned_dataset(session: Session, tenant: str, id: str) -> DatasetRow:
    """The tenant's dataset; another tenant's id gets the same NotFound as an unknown one."""
    row = session.scalar(select(DatasetRow).where(DatasetRow.id == id, DatasetRow.tenant == tenant))
    if row is None:
        raise NotFound(f"dataset '{id}' not found; list your datasets to see valid ids", dataset_id=id)
    return row


def example_info(row: ExampleRow) -> ExampleInfo:
    return ExampleInfo(
        index=row.position,
        file_name=row.file_name,
        client_id=row.client_id,
        label=row.label,
        image_sha256=row.image_sha256,
    )


def example_position(text: str) -> int | None:
    """A position written as ASCII digits, within the column's range; None for anything else."""
    if text.isascii() and text.isdigit() and len(text) <= 9:
        return int(text)
    return None


def _counts(session: Session, ids: list[str]) -> dict[str, Counter[str | None]]:
    """Per dataset, how many examples each label has; the None key counts the unlabelled ones."""
    counts: dict[str, Counter[str | None]] = {id: Counter() for id in ids}
    query = (
        select(ExampleRow.dataset_id, ExampleRow.label, func.count())
        .where(ExampleRow.dataset_id.in_(ids))
        .group_by(ExampleRow.dataset_id, ExampleRow.label)
    )
    for dataset_id, label, count in session.execute(query):
        counts[dataset_id][label] = count
    return counts


def _info(row: DatasetRow, counts: Counter[str | None]) -> DatasetInfo:
    labelled = {label: count for label, count in counts.items() if label is not None and count}
    return DatasetInfo(
        id=row.id,
        name=row.name,
        tenant=row.tenant,
        created_at=row.created_at,
        num_examples=row.num_examples,
        classes=sorted(labelled),
        counts={label: labelled[label] for label in sorted(labelled)},
        num_labelled=sum(labelled.values()),
        num_unlabelled=counts[None],
    )


def _check_text(what: str, value: object, max_chars: int) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{what} is empty; give it a non-blank text value")
    if len(value) > max_chars:
        raise InvalidArgument(f"{what} is {len(value)} characters, over the limit of {max_chars}; shorten it")
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise InvalidArgument(f"{what} {value!r} contains control characters; remove them")


def check_label(what: str, label: object) -> None:
    """A label as uploads and labelling calls accept it: non-blank text, at most MAX_LABEL_CHARS, no control
    characters."""
    _check_text(what, label, MAX_LABEL_CHARS)


def _check_classes(counts: Counter[str | None]) -> None:
    """An upload holds images; fully labelled, of two classes at least (a pool, with unlabelled images, may have
    fewer: it is labelled later)."""
    if not counts:
        raise InvalidArgument(
            "the dataset has no examples; upload labelled images of at least two classes, or unlabelled images"
        )
    if None not in counts and len(counts) < 2:
        (only,) = counts
        raise InvalidArgument(
            f"the dataset has only one class ('{only}'); add examples of at least one more class to train a "
            "classifier, or upload unlabelled images (no label; at a zip's root) to label later"
        )
