"""A one-line progress bar for a terminal; on a pipe, nothing until the end (logs stay clean)."""

import shutil
import sys
import time
from typing import TextIO

WIDTH = 28


class ProgressBar:
    def __init__(self, total: float, stream: TextIO = sys.stderr, min_interval_s: float = 0.1) -> None:
        self.total = max(total, 1e-9)
        self.stream = stream
        self.live = stream.isatty()
        self.min_interval_s = min_interval_s
        self._last_draw = 0.0
        self._last_line = ""
        self.started = time.monotonic()

    def update(self, done: float, text: str, force: bool = False) -> None:
        """Redraw with ``done`` of ``total`` and a text after the bar (at most every ``min_interval_s``)."""
        now = time.monotonic()
        if not self.live or (not force and now - self._last_draw < self.min_interval_s):
            self._last_line = self._line(done, text)
            return
        self._last_draw = now
        self._last_line = self._line(done, text)
        columns = shutil.get_terminal_size((100, 20)).columns
        self.stream.write("\r" + self._last_line[: columns - 1].ljust(columns - 1))
        self.stream.flush()

    def _line(self, done: float, text: str) -> str:
        fraction = min(max(done / self.total, 0.0), 1.0)
        filled = round(fraction * WIDTH)
        return f"[{'#' * filled}{'.' * (WIDTH - filled)}] {fraction:4.0%} {text}"

    def close(self) -> None:
        """End the bar's line (a pipe gets the last state once)."""
        if self.live:
            self.stream.write("\n")
        elif self._last_line:
            self.stream.write(self._last_line + "\n")
        self.stream.flush()


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")
