"""Give an ANTs call the number of ITK threads it is asked for.

ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once per process, at the
first ITK filter antspyx runs (its thread pool is built then): setting the
variable later has no effect, and antspyx exposes no setter. So a nipype worker that
ran a 1-thread node keeps 1 thread for a later 8-thread node, and a lone
subject's chain does not use the cores it was given.

:func:`call_with_threads` runs a function in this process when ITK here was
started with the wanted count (or is not started yet: then it is started with
it), and otherwise in a fresh interpreter started with that count (about 2 s
of start-up, paid only on a mismatch). The function must be importable by
module and name, and take and return picklable values (file paths and
scalars in this package).
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ENV", "call_with_threads", "itk_threads", "thread_report"]

ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
_started_with: int | None = None


def _env_threads() -> int:
    value = os.environ.get(ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else (os.cpu_count() or 1)


def itk_threads() -> int | None:
    """The ITK thread count of this process, or None while antspyx is not imported yet.

    When antspyx was imported outside this module the count is taken from the
    environment variable as it is now (what ITK reads at its first filter).
    """
    global _started_with
    if _started_with is None and "ants" in sys.modules:
        _started_with = _env_threads()
    return _started_with


def thread_report() -> tuple[int, int | None, int]:
    """``(process id, ITK thread count, OS threads of the process)`` where it is called (Linux for the last).

    ITK builds its pool of worker threads at its first filter (run by
    :func:`call_with_threads` on start), so two processes with the same
    imports differ in OS threads by the difference of their ITK counts.
    """
    task = Path("/proc/self/task")
    return os.getpid(), itk_threads(), len(list(task.iterdir())) if task.is_dir() else -1


def _start(n: int) -> None:
    global _started_with
    os.environ[ENV] = str(n)
    import ants
    import numpy as np

    # ITK reads the variable and builds its pool at the first filter it runs: run one now, so the count is fixed.
    ants.smooth_image(ants.from_numpy(np.zeros((8, 8, 8), dtype=np.float32)), 1.0)
    _started_with = n


def call_with_threads(n: int, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` with ITK running ``n`` threads.

    Parameters
    ----------
    n : int
        Threads (values below 1 count as 1).
    func : callable
        A module-level function (it may have to be imported in a child process).

    Returns
    -------
    Whatever ``func`` returns. An exception raised by ``func`` in a child
    process is raised again here, with its type when it can be pickled.
    """
    n = max(1, int(n))
    current = itk_threads()
    if current is None:
        _start(n)
        current = n
    if current == n:
        return func(*args, **kwargs)
    return _call_in_child(n, func, args, kwargs)


def _call_in_child(n: int, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    env = {**os.environ, ENV: str(n)}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="nc_itk_") as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job.write_bytes(pickle.dumps((func.__module__, func.__qualname__, args, kwargs, n)))
        proc = subprocess.run([sys.executable, "-m", __name__, str(job), str(result)], env=env,
                              capture_output=True, text=True, check=False)
        if not result.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{func.__module__}.{func.__qualname__} in a {n}-thread child process "
                               f"failed (exit {proc.returncode}): {tail[0]}")
        ok, value = pickle.loads(result.read_bytes())
    if ok:
        return value
    raise value


def _child(job: str, result: str) -> None:
    module, name, args, kwargs, n = pickle.loads(Path(job).read_bytes())
    _start(n)
    func: Any = importlib.import_module(module)
    for part in name.split("."):
        func = getattr(func, part)
    try:
        out = (True, func(*args, **kwargs))
    except Exception as exc:  # handed back to the parent, which raises it
        try:
            pickle.loads(pickle.dumps(exc))
            out = (False, exc)
        except Exception:  # e.g. an exception class whose __init__ takes other arguments than its args
            out = (False, RuntimeError(f"{type(exc).__name__}: {exc}"))
    Path(result).write_bytes(pickle.dumps(out))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
