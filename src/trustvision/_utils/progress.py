"""Progress of long work, one contract for the audit, ``explain`` and the checks.

A *tracker* is ``track(iterable, total=None, description="", weight=None)``: it yields the items
of ``iterable`` and reports each one as done once the caller asks for the next. ``total`` is the
number of units (items, or images when ``weight`` is given); ``weight(item)`` says how many units
an item is (e.g. the images of a chunk), so that a bar over chunks counts images and its ETA is
per image.

Three modes, as the command line offers them:

* ``True``: a rich progress bar with elapsed time and ETA on stderr (:func:`progress_bar`,
  :func:`bar_tracker`);
* ``"lines"`` (``--no-progress``): one plain line on stderr per finished item,
  ``"igos++: 4/16 images, 12.3s, eta 36.9s"`` (:func:`line_tracker`);
* ``False``: silent (:func:`silent_tracker`).

Example:
    >>> lines = []
    >>> track = line_tracker(lines.append, unit="images")
    >>> [len(c) for c in track([[1, 2], [3, 4], [5]], total=5, description="rise", weight=len)]
    [2, 2, 1]
    >>> [line.split(",")[0] for line in lines]
    ['rise: 2/5 images', 'rise: 4/5 images', 'rise: 5/5 images']
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Tracker = Callable[..., Iterable]


def silent_tracker(iterable: Iterable, total: int | None = None, description: str = "",
                   weight: Callable[[Any], int] | None = None) -> Iterable:
    """The tracker that reports nothing."""
    return iterable


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min"


def line_tracker(emit: Callable[[str], Any] | None = None, unit: str = "", lines: int | None = None) -> Tracker:
    """A tracker that writes one plain line per finished item with the units done, the elapsed
    time and (when ``total`` is known) the estimated time left, to ``emit`` (default: stderr).
    ``lines``: at most about this many lines when ``total`` is known (every ``ceil(total /
    lines)`` items, and the last one), e.g. 10 for the epochs of a long fit."""
    if emit is None:
        def emit(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

    def track(iterable: Iterable, total: int | None = None, description: str = "",
              weight: Callable[[Any], int] | None = None) -> Iterator:
        t0, done, shown = time.perf_counter(), 0, 0
        step = -(-total // lines) if lines and total else 1
        for item in iterable:
            yield item
            done += weight(item) if weight is not None else 1
            if done - shown < step and not (total and done >= total):
                continue
            shown = done
            elapsed = time.perf_counter() - t0
            of = f"/{total}" if total else ""
            eta = (f", eta {_fmt_seconds(elapsed / done * (total - done))}"
                   if total and done and done < total else "")
            emit(f"{description}: {done}{of}{(' ' + unit) if unit else ''}, {_fmt_seconds(elapsed)}{eta}")

    return track


def progress_bar(enabled: bool | str = True):
    """A rich ``Progress`` on stderr (spinner, description, bar, M/N, elapsed, ETA), shown only when
    ``enabled is True`` (it is a no-op display otherwise, so callers need no branches)."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=Console(stderr=True, log_path=False), disable=enabled is not True, transient=False)


def bar_tracker(progress, indent: str = "") -> Tracker:
    """A tracker that shows each tracked loop as a task of ``progress`` (removed when it ends)."""
    def track(iterable: Iterable, total: int | None = None, description: str = "",
              weight: Callable[[Any], int] | None = None) -> Iterator:
        task = progress.add_task(f"{indent}{description}", total=total)
        try:
            for item in iterable:
                yield item
                progress.advance(task, weight(item) if weight is not None else 1)
        finally:
            progress.remove_task(task)

    return track
