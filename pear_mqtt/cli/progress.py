"""Progress bars for long command-line work (rich), on a terminal only: in a pipe, a log file
or a container nothing is drawn and the commands' own status lines are all there is."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID
else:
    TaskID = int  # rich's own is a NewType of int; rich itself loads only to draw

__all__ = ["Bars", "TaskID", "bars", "follow"]

_REFRESH = 0.2  # seconds between two reads of the counters a bar follows


class Bars:
    """Bars on one terminal; every method does nothing when it is not drawing."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    @property
    def drawing(self) -> bool:
        return self._progress is not None

    def add(self, description: str, *, total: float | None = None) -> TaskID | None:
        """A bar (a spinner with a count when ``total`` is unknown)."""
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=total)

    def update(self, task: TaskID | None, *, completed: float,
               total: float | None = None) -> None:
        if self._progress is not None and task is not None:
            if total is not None:
                self._progress.update(task, completed=completed, total=total)
            else:
                self._progress.update(task, completed=completed)

    def advance(self, task: TaskID | None, *, by: float = 0, total_by: float = 0) -> None:
        """Move ``task`` on by ``by`` and its total by ``total_by`` (work found on the way)."""
        if self._progress is None or task is None:
            return
        total = None
        if total_by:
            known = next(t for t in self._progress.tasks if t.id == task).total
            total = (known or 0) + total_by
        self._progress.update(task, advance=by, total=total)


@contextlib.contextmanager
def bars(*, stream: TextIO | None = None, transient: bool = False) -> Iterator[Bars]:
    """Draw bars on ``stream`` (default stderr) while the block runs, when it is a terminal;
    with count, rate and time left where the total is known."""
    out = stream if stream is not None else sys.stderr
    if not out.isatty():
        yield Bars(None)
        return
    with _progress(out, transient=transient) as progress:
        yield Bars(progress)


def _progress(out: TextIO, *, transient: bool) -> Progress:
    """rich's bars on ``out``: count, rate and time left where the total is known. rich is
    imported here, on a terminal only, so a command in a pipe or a container (an edge agent)
    does not carry its ~2.5 MB."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        """Items per second, once rich has measured a speed."""

        def render(self, task: Task) -> Text:
            return Text("" if not task.speed else f"{task.speed:,.0f}/s")

    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        Rate(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(file=out), transient=transient, refresh_per_second=5,
        # Output printed meanwhile goes above the bars, but stdout only when it is a terminal
        # too: piped or redirected, it stays the command's result, untouched.
        redirect_stdout=sys.stdout.isatty(), redirect_stderr=out is sys.stderr)


@contextlib.asynccontextmanager
async def follow(b: Bars, task: TaskID | None, read: Callable[[], float], *,
                 total: Callable[[], float | None] | None = None) -> AsyncIterator[None]:
    """Keep ``task`` at ``read()`` (and its total at ``total()``) while the block runs."""
    if not b.drawing:
        yield
        return

    async def loop() -> None:
        while True:
            b.update(task, completed=read(), total=None if total is None else total())
            await asyncio.sleep(_REFRESH)  # a display refresh, not a wait for a message

    runner = asyncio.create_task(loop())
    try:
        yield
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        b.update(task, completed=read(), total=None if total is None else total())
