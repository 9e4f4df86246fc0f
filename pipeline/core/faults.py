"""Crash points: named moments of each stage where a test harness can kill the process, deterministically.

A stage calls :func:`crash_point` at the moments that matter for "nothing is lost" (a shard published, a
catalog written, a training step done, ...). Normally that is one dictionary lookup and nothing else.
With ``NEUROCURATE_CRASH_AT=<point>:<k>`` in the environment the process sends itself ``SIGKILL`` the
k-th time it reaches ``<point>`` — exactly what ``kill -9`` from outside does, at a moment chosen from
the stage's own progress instead of a timer (``tests/test_crash_harness.py``).
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_ENV", "crash_point"]

#: Environment variable naming the crash point and the count at which the process kills itself.
CRASH_ENV = "NEUROCURATE_CRASH_AT"
_COUNTS: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Reached moment ``name`` (``"<stage>.<event>"``); kill the process here if the environment says so."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, count = spec.rpartition(":")
    if point != name:
        return
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if str(_COUNTS[name]) == count:
        os.kill(os.getpid(), signal.SIGKILL)
