"""A batch prediction's results as a file: JSON Lines or CSV, rendered row by row as the download streams.

Each row names its example (``index`` in upload order, ``file_name``, ``client_id``, ``image_sha256``) and
gives each head's answer: the version, the best label and its score, whether it abstained and the top-k.
In CSV a head's columns are prefixed by its position and reference (``1:name@3 label``), and its top-k is
one cell of ``label=score`` pairs separated by ``;``.
"""

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from enum import Enum
from typing import Any

ROWS_PER_PIECE = 100  # rows per piece of the stream (an HTTP chunk, a gRPC message)
EXAMPLE_COLUMNS = ("index", "file_name", "client_id", "image_sha256")
HEAD_COLUMNS = ("version", "label", "score", "abstained", "top")


class ResultsFormat(str, Enum):
    JSONL = "jsonl"
    CSV = "csv"

    @property
    def media_type(self) -> str:
        return "application/jsonl" if self is ResultsFormat.JSONL else "text/csv"


def render(rows: Iterable[dict[str, Any]], format: ResultsFormat, heads: list[str]) -> Iterator[bytes]:
    """The file in pieces of ``ROWS_PER_PIECE`` rows (CSV: the header first); ``heads`` are the job's references."""
    line = _jsonl_line if format is ResultsFormat.JSONL else _csv_line
    if format is ResultsFormat.CSV:
        header = list(EXAMPLE_COLUMNS)
        for position, ref in enumerate(heads, start=1):
            header += [f"{position}:{ref} {column}" for column in HEAD_COLUMNS]
        yield _csv_text(header).encode()
    piece: list[str] = []
    for row in rows:
        piece.append(line(row))
        if len(piece) == ROWS_PER_PIECE:
            yield "".join(piece).encode()
            piece = []
    if piece:
        yield "".join(piece).encode()


def _jsonl_line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


def _csv_line(row: dict[str, Any]) -> str:
    cells: list[object] = [row["index"], row["file_name"] or "", row["client_id"] or "", row["image_sha256"]]
    for answer in row["heads"]:
        top = ";".join(f"{item['label']}={item['score']:.6g}" for item in answer["top"])
        cells += [answer["version"], answer["label"], f"{answer['score']:.6g}", answer["abstained"], top]
    return _csv_text(cells)


def _csv_text(cells: Sequence[object]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(cells)
    return out.getvalue()
