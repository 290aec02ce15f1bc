"""A multipart/form-data body generated part by part: one image in memory at a time.

httpx would open every file of a dataset at once; this writes each part as it is
sent and reports progress. The length is declared when every size is known up
front (files), else the body goes chunked (in-memory iterables).
"""

import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from client.sources import Example

CHUNK = 1 << 20


class MultipartBody:
    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.boundary = f"graft-{secrets.token_hex(16)}"
        self._fields = fields

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _field(self, name: str, value: str) -> bytes:
        return (f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n').encode()

    def _file_head(self, name: str, file_name: str) -> bytes:
        safe = file_name.replace('"', "%22").replace("\r", "").replace("\n", "")
        return (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{safe}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()

    def _head(self) -> bytes:
        return b"".join(self._field(name, value) for name, value in self._fields)

    def _tail(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    def examples(
        self, examples: Iterable[Example], progress: Callable[[int, int], None] | None
    ) -> tuple[Iterator[bytes], int | None]:
        """The body of ``files`` + ``labels`` parts, and its length if every example's size is known."""
        length = None
        if isinstance(examples, list) and all(e.size is not None for e in examples):
            length = (
                len(self._head())
                + len(self._tail())
                + sum(
                    len(self._file_head("files", e.file_name)) + e.size + 2 + len(self._field("labels", e.label))
                    for e in examples
                )
            )

        def body() -> Iterator[bytes]:
            sent = 0
            yield self._head()
            for count, example in enumerate(examples, start=1):
                data = example.read()
                yield (
                    self._file_head("files", example.file_name) + data + b"\r\n" + self._field("labels", example.label)
                )
                sent += len(data)
                if progress is not None:
                    progress(sent, count)
            yield self._tail()

        return body(), length

    def archive(
        self, path: Path, progress: Callable[[int, int], None] | None, images: int
    ) -> tuple[Iterator[bytes], int]:
        """The body with one ``archive`` part streamed from disk; progress counts images as bytes go."""
        size = path.stat().st_size
        head = self._head() + self._file_head("archive", path.name)
        tail = b"\r\n" + self._tail()

        def body() -> Iterator[bytes]:
            yield head
            sent = 0
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent, images * sent // max(size, 1))
                    yield chunk
            yield tail

        return body(), len(head) + size + len(tail)
