"""Progress of long stages: a live bar with ETA on a terminal, a one-line summary at the end.

The bar (tqdm) is drawn on standard error only when it is a terminal and progress is not switched off
(``--no-progress``, :func:`set_progress` or ``NEUROCURATE_NO_PROGRESS=1``); the summary line
(``prep: 4/4 scans in 3m12s, 0 failed``) always goes to :data:`pipeline.core.console.USER_LOG`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from pipeline.core.console import USER_LOG

__all__ = ["Progress", "format_duration", "progress_enabled", "set_progress"]

_SWITCH: bool | None = None


def set_progress(enabled: bool | None) -> None:
    """Force progress bars on (True), off (False) or back to automatic (None: only on a terminal)."""
    global _SWITCH
    _SWITCH = enabled


def progress_enabled() -> bool:
    """Whether a bar is drawn now: not switched off, and standard error is a terminal (unless forced on)."""
    if _SWITCH is not None:
        return _SWITCH
    if os.environ.get("NEUROCURATE_NO_PROGRESS", "") not in ("", "0"):
        return False
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def format_duration(seconds: float) -> str:
    """``3h02m``, ``4m05s`` or ``12.3s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


class Progress:
    """A counter of finished items with failures, shown as a tqdm bar when :func:`progress_enabled`.

    Thread-safe; use as a context manager. On exit one summary line is logged to ``USER_LOG``
    (``<label>: <done>/<total> <unit>s in <time>, <failed> failed``) when ``label`` is set and ``summary``.

    Parameters
    ----------
    label : str or None
        Name shown before the bar and in the summary; None disables both.
    total : int
        Items expected.
    unit : str
        What an item is (``scan``, ``shard``, ``step``).
    enabled : bool
        False: count only, no bar and no summary.
    summary : bool
        Log the summary line on exit.
    mininterval : float
        Least seconds between two redraws of the bar.
    """

    def __init__(self, label: str | None, total: int, unit: str = "item", *, enabled: bool = True,
                 summary: bool = True, mininterval: float = 0.5):
        self.label = label
        self.total = int(total)
        self.unit = unit
        self.done = 0
        self.failed = 0
        self.summary = summary and enabled and label is not None
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._bar: Any = None
        if enabled and label is not None and progress_enabled():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=label, unit=unit, file=sys.stderr, dynamic_ncols=True,
                             leave=False, smoothing=0.1, mininterval=mininterval, miniters=1)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_total(self, total: int) -> None:
        """Change the number of items expected."""
        with self._lock:
            self.total = int(total)
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.refresh()

    def update(self, n: int = 1, *, failed: bool | int = False) -> None:
        """Count ``n`` finished items, ``failed`` (bool or count) of them failed."""
        with self._lock:
            self.done += n
            self.failed += int(failed)
            if self._bar is not None:
                if failed:
                    self._bar.set_postfix_str(f"{self.failed} failed", refresh=False)
                self._bar.update(n)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def close(self) -> None:
        """Remove the bar and log the summary line (once)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.summary:
            self.summary = False
            USER_LOG.info(f"{self.label}: {self.done}/{self.total} {self.unit}(s) in {format_duration(self.elapsed)}, "
                          f"{self.failed} failed")
