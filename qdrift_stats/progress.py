"""Progress of long commands: a bar on a terminal, one line per item elsewhere (logs, CI, ``nohup``).

:func:`progress` returns a wrapper for an iterable of runs, batches or folds. On a terminal it is a
tqdm bar; off a terminal it writes one line per finished item to stderr::

    qdrift record: run 3/25 done, elapsed 1m02s, ETA 7m48s

``quiet`` silences both. Standard library only (tqdm is imported on a terminal).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO


def format_seconds(seconds: float) -> str:
    """``42.0s``, ``3m07s`` or ``1h02m``."""
    if not seconds == seconds or seconds < 0:  # NaN
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def progress_lines(
    items: Iterable, label: str, unit: str, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic
) -> Iterator:
    """Yield ``items``; after each one write ``label: unit k/n done, elapsed ..., ETA ...`` to ``stream``."""
    items = list(items)
    total = len(items)
    start = clock()
    for k, item in enumerate(items, 1):
        yield item
        elapsed = clock() - start
        eta = elapsed / k * (total - k)
        out = stream if stream is not None else sys.stderr
        print(
            f"{label}: {unit} {k}/{total} done, elapsed {format_seconds(elapsed)}, ETA {format_seconds(eta)}",
            file=out,
            flush=True,
        )


def progress(label: str, unit: str = "item", quiet: bool = False) -> Callable[[Iterable], Iterator]:
    """A wrapper for the items of a long loop (see the module docstring)."""

    def wrap(items: Iterable) -> Iterator:
        if quiet:
            return iter(items)
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            return iter(tqdm(list(items), desc=label, unit=unit, leave=False))
        return progress_lines(items, label, unit)

    return wrap


__all__ = ["format_seconds", "progress", "progress_lines"]
