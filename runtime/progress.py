"""Progress bars (rich) on a terminal, one line per finished cell elsewhere."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=self.console, transient=False, disable=not self.live,
        )
        self._cells = None

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def start_cells(self, total: int, description: str = "cells") -> None:
        self._cells = self._progress.add_task(description, total=total)

    def cell_done(self, label: str, outcome: str, count: int = 1) -> None:
        """``count`` cell results finished under one ``label`` (a dask point reports all of its own)."""
        if self._cells is not None:
            self._progress.advance(self._cells, count)
        if not self.live and not self.quiet:
            self.console.print(f"{label}: {outcome}", highlight=False)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False)

    @contextlib.contextmanager
    def task(self, total: int, description: str):
        task_id = self._progress.add_task(f"  {description}", total=total)
        progress = self._progress

        class _Handle:
            def advance(self, n: int = 1) -> None:
                progress.advance(task_id, n)

        try:
            yield _Handle()
        finally:
            progress.remove_task(task_id)


def stderr_console() -> Console:
    return Console(stderr=True, file=sys.stderr)
