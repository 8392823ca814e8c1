"""Progress reporting for long-running commands.

A :class:`Progress` receives steps (one-line announcements) and tasks (work with a known or
unknown total, advanced in units such as bytes). Three renderings exist:

- :class:`BarProgress` redraws a single status line with a bar, for a terminal;
- :class:`LineProgress` prints one plain line when a step or task starts and when a task
  ends, for logs and pipes;
- :class:`Progress` itself prints nothing, for library callers and ``--quiet``.

Library code takes a ``progress`` argument and never decides which one it gets; the CLI picks
with :func:`for_stream`. Messages must never contain key material: they are printed as given.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = [
    "BarProgress",
    "LineProgress",
    "Progress",
    "Task",
    "for_stream",
    "format_bytes",
]


def format_bytes(count: float) -> str:
    """Format a byte count with a binary unit, as in ``12.3 MiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _format_amount(count: float, unit: str) -> str:
    if unit == "B":
        return format_bytes(count)
    return f"{int(count)} {unit}".rstrip()


class Task:
    """One piece of work with an optional total; :meth:`advance` reports units done."""

    def __init__(self, owner: Progress, label: str, total: int | None, unit: str) -> None:
        self.owner = owner
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.started = time.monotonic()

    def advance(self, amount: int) -> None:
        self.done += amount
        self.owner._advanced(self)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Progress:
    """Progress sink that reports nothing; the base of the renderings that do."""

    def step(self, message: str) -> None:
        """Announce the start of a step that has no measurable amount of work."""

    @contextmanager
    def task(self, label: str, total: int | None = None, unit: str = "B") -> Iterator[Task]:
        """Run a task; the caller advances the yielded :class:`Task` as work completes."""
        task = Task(self, label, total, unit)
        self._started(task)
        try:
            yield task
        finally:
            self._finished(task)

    def reporter(self, unit: str = "B") -> _Reporter:
        """Return a ``(done, total, label)`` callback that shows the work as tasks.

        A new label starts a new task; a task ends when ``done`` reaches ``total``, when
        another label arrives, or when the callback's ``close()`` is called.
        """
        return _Reporter(self, unit)

    def _started(self, task: Task) -> None:
        pass

    def _advanced(self, task: Task) -> None:
        pass

    def _finished(self, task: Task) -> None:
        pass


class LineProgress(Progress):
    """Plain lines: one per step, one when a task starts and one when it ends."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def step(self, message: str) -> None:
        self._write(message)

    def _started(self, task: Task) -> None:
        if task.total is not None:
            self._write(f"{task.label} ({_format_amount(task.total, task.unit)})")
        else:
            self._write(task.label)

    def _finished(self, task: Task) -> None:
        self._write(
            f"{task.label}: {_format_amount(task.done, task.unit)} in {task.elapsed():.1f} s"
        )

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


class BarProgress(LineProgress):
    """A status line redrawn in place with a bar; finished tasks stay as plain lines."""

    WIDTH = 28
    # Redrawing on every chunk would cost more than the work it reports on.
    INTERVAL = 0.1

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._last_draw = 0.0
        self._drawn = False

    def _started(self, task: Task) -> None:
        self._draw(task, force=True)

    def _advanced(self, task: Task) -> None:
        self._draw(task, force=False)

    def _finished(self, task: Task) -> None:
        self._clear()
        super()._finished(task)

    def _write(self, line: str) -> None:
        self._clear()
        super()._write(line)

    def _draw(self, task: Task, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.INTERVAL:
            return
        self._last_draw = now
        amount = _format_amount(task.done, task.unit)
        if task.total:
            fraction = min(1.0, task.done / task.total)
            filled = int(fraction * self.WIDTH)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            text = f"{task.label} [{bar}] {fraction * 100:5.1f}% {amount}"
        else:
            text = f"{task.label} {amount}"
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


class _Reporter:
    """Adapts a ``(done, total, label)`` progress callback to :class:`Task` objects."""

    def __init__(self, owner: Progress, unit: str) -> None:
        self.owner = owner
        self.unit = unit
        self.task: Task | None = None

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.task is not None and self.task.label != label:
            self.close()
        if self.task is None:
            self.task = Task(self.owner, label, total or None, self.unit)
            self.owner._started(self.task)
        self.task.total = total or None
        self.task.advance(done - self.task.done)
        if total and done >= total:
            self.close()

    def close(self) -> None:
        """End the current task, if any."""
        if self.task is not None:
            task, self.task = self.task, None
            self.owner._finished(task)


def for_stream(stream: TextIO | None = None, *, quiet: bool = False, bars: bool = True) -> Progress:
    """Pick the rendering for ``stream`` (stderr by default).

    ``quiet`` silences everything; bars are drawn only when ``bars`` is true and the stream is
    a terminal, otherwise plain lines are printed.
    """
    if stream is None:
        stream = sys.stderr
    if quiet:
        return Progress()
    if bars and stream.isatty():
        return BarProgress(stream)
    return LineProgress(stream)
