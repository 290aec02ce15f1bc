"""Labelling a dataset's examples after upload: one, a batch, or an import of ``file,label`` CSV rows.

Every call is all-or-nothing: one transaction that holds the dataset's row (PostgreSQL ``FOR UPDATE``, SQLite's
write lock), so two label calls at once apply one after the other and the class bound (GRAFT_MAX_CLASSES) holds
for their sum. A label of None unlabels the example again (it returns to the pool).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.errors import InvalidArgument, NotFound
from service.store.datasets import (
    MAX_CLIENT_ID_CHARS,
    MAX_FILE_NAME_CHARS,
    ExampleInfo,
    check_label,
    example_info,
    example_position,
    owned_dataset,
)
from service.store.db import Database, DatasetRow, ExampleRow, begin_immediate


class LabelUpdate(BaseModel):
    """Set one example's label: ``example`` is its client id or its position (all digits); None unlabels it."""

    example: str
    label: str | None


class LabelImport(BaseModel):
    """What an import changed: how many rows it applied, and the dataset's labelled and unlabelled counts after."""

    rows: int
    num_labelled: int
    num_unlabelled: int


class DatasetLabels:
    """Label updates and imports; the bounds come from the settings (GRAFT_MAX_LABEL_UPDATES,
    GRAFT_MAX_LABEL_IMPORT_BYTES, GRAFT_MAX_CLASSES)."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    def update(self, tenant: str, dataset_id: str, updates: Sequence[LabelUpdate]) -> list[ExampleInfo]:
        """Apply every update or none; the examples as they are after, in the order of ``updates``."""
        limit = self.settings.max_label_updates
        if not updates:
            raise InvalidArgument("no label updates given; send at least one {example, label}")
        if len(updates) > limit:
            raise InvalidArgument(
                f"{len(updates):,} label updates in one call, over the limit of {limit:,} "
                "(GRAFT_MAX_LABEL_UPDATES); send them in several calls, or import a CSV of file,label rows"
            )
        for i, update in enumerate(updates):
            _check_new_label(f"update {i + 1} (example '{update.example[:MAX_CLIENT_ID_CHARS]}')", update.label)
        with self.db.session() as session:
            dataset = _locked(session, tenant, dataset_id)
            rows = [_addressed(session, dataset_id, update.example) for update in updates]
            _check_distinct([(f"update {i + 1}", row) for i, row in enumerate(rows)])
            for row, update in zip(rows, updates, strict=True):
                row.label = update.label
            self._recount(session, dataset)
            return [example_info(row) for row in rows]

    def import_csv(self, tenant: str, dataset_id: str, text: bytes) -> LabelImport:
        """``file,label`` rows (an optional ``file,label`` header first); ``file`` is an example's file name or
        client id, an empty label unlabels it. All rows apply or none."""
        limit = self.settings.max_label_import_bytes
        if len(text) > limit:
            raise InvalidArgument(
                f"the label import is {len(text):,} bytes, over the limit of {limit:,} (GRAFT_MAX_LABEL_IMPORT_BYTES); "
                "split it into several imports"
            )
        rows = _parse_csv(text)
        if len(rows) > self.settings.max_images_per_dataset:
            raise InvalidArgument(
                f"the label import has {len(rows):,} rows, more than a dataset's examples may be "
                f"({self.settings.max_images_per_dataset:,}); each row labels one example once"
            )
        with self.db.session() as session:
            dataset = _locked(session, tenant, dataset_id)
            by_name = _ExampleIndex(session, dataset_id)
            targets = [(f"row {line}", by_name.find(line, key), label) for line, key, label in rows]
            _check_distinct([(where, row) for where, row, _ in targets])
            for _, row, label in targets:
                row.label = label
            counts = self._recount(session, dataset)
        return LabelImport(rows=len(targets), num_labelled=counts[0], num_unlabelled=counts[1])

    def _recount(self, session: Session, dataset: DatasetRow) -> tuple[int, int]:
        """Refresh the dataset's classes after a change, within the class bound; (labelled, unlabelled)."""
        session.flush()
        query = (
            select(ExampleRow.label, func.count()).where(ExampleRow.dataset_id == dataset.id).group_by(ExampleRow.label)
        )
        counts = {label: count for label, count in session.execute(query)}
        classes = sorted(label for label in counts if label is not None)
        if len(classes) > self.settings.max_classes:
            raise InvalidArgument(
                f"these labels would give the dataset {len(classes):,} classes, over the limit of "
                f"{self.settings.max_classes:,} (GRAFT_MAX_CLASSES); nothing was changed. Merge classes first"
            )
        dataset.classes = classes
        unlabelled = counts.get(None, 0)
        return sum(counts.values()) - unlabelled, unlabelled


def _check_new_label(where: str, label: str | None) -> None:
    if label is not None:
        check_label(f"the label of {where}", label)


def _locked(session: Session, tenant: str, dataset_id: str) -> DatasetRow:
    """The tenant's dataset, held until the commit: label calls on one dataset run one after the other."""
    begin_immediate(session)
    owned_dataset(session, tenant, dataset_id)
    row = session.scalar(select(DatasetRow).where(DatasetRow.id == dataset_id).with_for_update())
    assert row is not None  # owned_dataset found it, and this transaction holds the write lock
    return row


def _addressed(session: Session, dataset_id: str, example: str) -> ExampleRow:
    position = example_position(example)
    where = ExampleRow.client_id == example if position is None else ExampleRow.position == position
    row = session.scalar(select(ExampleRow).where(ExampleRow.dataset_id == dataset_id, where))
    if row is None:
        raise NotFound(
            f"dataset '{dataset_id}' has no example '{example[:MAX_CLIENT_ID_CHARS]}' (a client id, or a position "
            "from 0); nothing was changed. List its examples to see them",
            dataset_id=dataset_id,
        )
    return row


def _check_distinct(targets: Sequence[tuple[str, ExampleRow]]) -> None:
    """Each example at most once per call: two labels for one example leave it unclear which one counts."""
    first: dict[int, str] = {}
    for where, row in targets:
        if row.position in first:
            raise InvalidArgument(
                f"{where} labels example {row.position} again ({first[row.position]} already does); "
                "give each example one label per call"
            )
        first[row.position] = where


class _ExampleIndex:
    """An import's lookup, read once (a dataset holds at most GRAFT_MAX_IMAGES_PER_DATASET examples): a key is an
    example's client id, else its file name, which must name only one."""

    def __init__(self, session: Session, dataset_id: str) -> None:
        rows = session.scalars(select(ExampleRow).where(ExampleRow.dataset_id == dataset_id))
        self.by_client_id: dict[str, ExampleRow] = {}
        self.by_file_name: dict[str, list[ExampleRow]] = defaultdict(list)
        for row in sorted(rows, key=lambda row: row.position):
            if row.client_id is not None:
                self.by_client_id[row.client_id] = row
            if row.file_name is not None:
                self.by_file_name[row.file_name].append(row)

    def find(self, line: int, key: str) -> ExampleRow:
        if key in self.by_client_id:
            return self.by_client_id[key]
        found = self.by_file_name.get(key, [])
        if not found:
            raise InvalidArgument(
                f"row {line}: the dataset has no example with file name or client id '{key}'; nothing was changed. "
                "List its examples to see their names"
            )
        if len(found) > 1:
            positions = ", ".join(str(row.position) for row in found[:5]) + (", …" if len(found) > 5 else "")
            raise InvalidArgument(
                f"row {line}: file name '{key}' names several examples (positions {positions}); nothing was "
                "changed. Label those by client id or position instead"
            )
        return found[0]


def _parse_csv(text: bytes) -> list[tuple[int, str, str | None]]:
    """(line, file, label or None) rows; an optional ``file,label`` header is skipped, blank lines too."""
    try:
        decoded = text.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"the label import is not UTF-8 text (byte {exc.start}); save the CSV as UTF-8") from None
    rows: list[tuple[int, str, str | None]] = []
    try:
        reader = csv.reader(io.StringIO(decoded, newline=""))
        for fields in reader:
            line = reader.line_num
            if not fields or fields == [""]:
                continue
            if len(fields) != 2:
                raise InvalidArgument(
                    f"row {line} has {len(fields)} fields; each row is file,label (quote a value with a comma)"
                )
            key, label = (field.strip() for field in fields)
            if not rows and (key, label) == ("file", "label"):
                continue
            if not key or len(key) > MAX_FILE_NAME_CHARS:
                raise InvalidArgument(
                    f"row {line}: the file is empty or over {MAX_FILE_NAME_CHARS} characters; give the example's "
                    "file name or client id"
                )
            _check_new_label(f"row {line} ('{key}')", label or None)
            rows.append((line, key, label or None))
    except csv.Error as exc:
        raise InvalidArgument(f"the label import is not valid CSV ({exc}); write rows of file,label") from None
    if not rows:
        raise InvalidArgument("the label import has no rows; send rows of file,label")
    return rows
