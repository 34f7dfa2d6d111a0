"""Progress display for long steps (merge, conversion, build, batch translation).

On a terminal it is a ``rich`` progress bar; in logs (CI, Kubernetes Jobs) it
prints a plain line every few seconds instead, so that progress is visible there too.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from bayling.sizes import format_bytes


class _LogProgress:
    def __init__(self, description: str, total: float | None, unit: str, every_s: float = 5.0):
        self.description, self.total, self.unit, self.every_s = description, total, unit, every_s
        self.done = 0.0
        self.start = self.last = time.monotonic()

    def _fmt(self, n: float) -> str:
        return format_bytes(n) if self.unit == "B" else f"{n:g} {self.unit}"

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        of = f" of {self._fmt(self.total)}" if self.total else ""
        print(f"{self.description}: {self._fmt(self.done)}{of} ({self._fmt(rate)}/s)", file=sys.stderr, flush=True)

    def finish(self) -> None:
        self._print(time.monotonic())


class _RichProgress:
    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def finish(self) -> None:
        pass


@contextmanager
def progress(description: str, total: float | None = None, unit: str = "B") -> Iterator[_LogProgress | _RichProgress]:
    """Yield an object with ``advance(n)``; ``unit="B"`` shows bytes and bytes/s."""
    if not sys.stderr.isatty():
        p = _LogProgress(description, total, unit)
        yield p
        p.finish()
        return
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if unit == "B" else [MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as bar:
        yield _RichProgress(bar, bar.add_task(description, total=total))
