"""Parallel execution: the machine's resources and one way to map a pure function over items.

Everything that runs the same function over many independent items (shards, the group QC metrics of each
scan, the connectome of each run) goes through :func:`parallel_map`: in order, on local threads or processes,
or on a dask.distributed cluster (a running scheduler at ``[dask] scheduler`` / ``--dask-scheduler``, or a
LocalCluster started for the run). :func:`available_cpus` and :func:`available_memory_gb` are the defaults of
``prep`` (every core this process may use, as fMRIPrep does).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pipeline.core.config import DaskConfig, ExecutionConfig

__all__ = ["MapError", "Star", "available_cpus", "available_memory_gb", "dask_session", "parallel_map",
           "parse_plugin_value", "resolve_execution"]

LOG = logging.getLogger(__name__)

Backend = Literal["threads", "processes", "synchronous"]


# --------------------------------------------------------------------------- resources


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def available_cpus(environ: dict[str, str] | None = None, cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the smallest of its CPU affinity, the cgroup quota and a SLURM allocation.

    Parameters
    ----------
    environ : dict, optional
        Environment to read ``SLURM_CPUS_PER_TASK`` / ``SLURM_CPUS_ON_NODE`` from (default ``os.environ``).
    cgroup_root : Path
        Mount point of the cgroup file system.

    Returns
    -------
    int
        At least 1.
    """
    env = os.environ if environ is None else environ
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = env.get(key, "")
        if value.isdigit() and int(value) > 0:
            n = min(n, int(value))
            break
    return max(1, n)


def available_memory_gb(cgroup_root: Path = Path("/sys/fs/cgroup")) -> float:
    """Memory this process may use in GB: the cgroup limit when there is one, else the machine's RAM."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in (cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
            break
    return total / 1024**3


def resolve_execution(ex: ExecutionConfig) -> ExecutionConfig:
    """``[execution]`` with the automatic values (0) made concrete for this machine.

    ``nprocs`` 0 → :func:`available_cpus`; ``omp_nthreads`` 0 → ``min(nprocs - 1, 8)`` (at least 1), never more
    than ``nprocs``; ``mem_gb`` 0 → 90 % of :func:`available_memory_gb`.
    """
    if ex.nprocs < 0 or ex.omp_nthreads < 0 or ex.mem_gb < 0:
        from pipeline.core.config import ConfigError

        raise ConfigError(f"execution: nprocs, omp_nthreads and mem_gb must be >= 0 (got {ex.nprocs}, "
                          f"{ex.omp_nthreads}, {ex.mem_gb})")
    nprocs = ex.nprocs or available_cpus()
    omp = ex.omp_nthreads or max(1, min(nprocs - 1, 8))
    omp = min(omp, nprocs)
    mem = ex.mem_gb or round(0.9 * available_memory_gb(), 2)
    return replace(ex, nprocs=nprocs, omp_nthreads=omp, mem_gb=mem)


def parse_plugin_value(text: str) -> Any:
    """A ``--plugin-arg`` value as nipype expects it: int, float, bool or None when it reads as one, else the text.

    ``"10"`` → 10, ``"2.5"`` → 2.5, ``"true"``/``"false"`` (any case) → bool, ``"none"`` → None; quotes around
    a value keep it a string (``"'10'"`` → ``"10"``).
    """
    stripped = text.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        return stripped[1:-1]
    low = stripped.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return int(stripped)
    except ValueError:
        pass
    try:
        value = float(stripped)
    except ValueError:
        return text
    return value if math.isfinite(value) else text


# --------------------------------------------------------------------------- dask


_SESSION: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("neurocurate_dask_session", default=None)


@dataclass
class _Session:
    cfg: DaskConfig
    client: Any = None
    cluster: Any = None

    @property
    def distributed(self) -> bool:
        return bool(self.cfg.scheduler) or self.cfg.local_cluster

    def get_client(self) -> Any:
        """The dask.distributed client, connected (or its LocalCluster started) on first use."""
        if self.client is None:
            from distributed import Client, LocalCluster

            if self.cfg.scheduler:
                from pipeline.core.errors import NeurocurateError

                try:
                    self.client = Client(self.cfg.scheduler, timeout="20s")
                except (OSError, TimeoutError) as exc:
                    raise NeurocurateError(f"dask scheduler {self.cfg.scheduler}: cannot connect ({exc})") from None
                LOG.info("dask: connected to %s (%d workers)", self.cfg.scheduler,
                         len(self.client.scheduler_info().get("workers", {})))
            else:
                workers = self.cfg.workers or available_cpus()
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=self.cfg.threads_per_worker,
                                            processes=True, dashboard_address=None)
                self.client = Client(self.cluster)
                LOG.info("dask: LocalCluster of %d worker process(es)", workers)
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None


@contextlib.contextmanager
def dask_session(cfg: DaskConfig | None) -> Iterator[None]:
    """Use ``cfg`` for every :func:`parallel_map` inside the block; a cluster it starts is shut down at the end.

    Nested sessions reuse the outer one (one LocalCluster per run).
    """
    if cfg is None or _SESSION.get() is not None:
        yield
        return
    session = _Session(cfg)
    token = _SESSION.set(session)
    try:
        yield
    finally:
        _SESSION.reset(token)
        session.close()


# --------------------------------------------------------------------------- map


@dataclass(frozen=True)
class MapError:
    """An item whose call raised one of the ``catch`` exceptions of :func:`parallel_map`."""

    message: str
    type_name: str


class _Guarded:
    """``func`` returning a :class:`MapError` instead of raising ``catch`` (picklable for processes and dask)."""

    def __init__(self, func: Callable[[Any], Any], catch: tuple[type[BaseException], ...]):
        self.func = func
        self.catch = catch

    def __call__(self, item: Any) -> Any:
        if not self.catch:
            return self.func(item)
        try:
            return self.func(item)
        except self.catch as exc:
            return MapError(str(exc), type(exc).__name__)


def parallel_map(
    func: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int = 0,
    backend: Backend = "threads",
    dask: DaskConfig | None = None,
    catch: tuple[type[BaseException], ...] = (),
    progress: str | None = None,
    unit: str = "item",
) -> list[Any]:
    """``[func(item) for item in items]``, in parallel, in the order of ``items``.

    Parameters
    ----------
    func : callable
        A pure function of one item (module-level or a ``functools.partial`` of one when the work leaves the
        process).
    items : sequence
    workers : int
        Local workers; 0 = every available core. 1 (or one item) runs in this thread.
    backend : {"threads", "processes", "synchronous"}
        Local pool when no dask.distributed cluster is in use.
    dask : DaskConfig, optional
        Cluster to use; default the enclosing :func:`dask_session`. A ``scheduler`` address or
        ``local_cluster`` sends the items to dask.distributed workers.
    catch : tuple of exception types
        Exceptions of one item that become a :class:`MapError` result instead of stopping the map.
    progress : str, optional
        Label of a progress bar (:mod:`pipeline.core.progress`); None shows none.
    unit : str
        Unit of the progress bar.

    Returns
    -------
    list
        One result (or :class:`MapError`) per item, in order.
    """
    from pipeline.core.progress import Progress

    items = list(items)
    call = _Guarded(func, tuple(catch))
    session = _SESSION.get()
    own_session = None
    if dask is not None and (session is None or session.cfg != dask):
        own_session = session = _Session(dask)
    try:
        with Progress(progress, total=len(items), unit=unit, enabled=progress is not None) as bar:
            if session is not None and session.distributed and items:
                return _map_distributed(call, items, session.get_client(), bar)
            n = min(workers or available_cpus(), len(items))
            if backend == "synchronous" or n <= 1:
                out = []
                for item in items:
                    out.append(call(item))
                    bar.update(1, failed=isinstance(out[-1], MapError))
                return out
            return _map_local(call, items, n, backend, bar)
    finally:
        if own_session is not None:
            own_session.close()


def _map_local(call: _Guarded, items: list[Any], n: int, backend: Backend, bar: Any) -> list[Any]:
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed

    pool_cls = ProcessPoolExecutor if backend == "processes" else ThreadPoolExecutor
    out: list[Any] = [None] * len(items)
    with pool_cls(max_workers=n) as pool:
        futures = {pool.submit(call, item): i for i, item in enumerate(items)}
        try:
            for fut in as_completed(futures):
                out[futures[fut]] = fut.result()
                bar.update(1, failed=isinstance(out[futures[fut]], MapError))
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return out


def task_name(func: Callable[..., Any]) -> str:
    """Name of the function under :class:`_Guarded`, :class:`Star` and ``functools.partial`` wrappers
    (the prefix of the dask task keys: ``neurocurate_<name>-<token>``)."""
    while True:
        inner = getattr(func, "func", None)
        if inner is None:
            return getattr(func, "__name__", type(func).__name__)
        func = inner


def _map_distributed(call: _Guarded, items: list[Any], client: Any, bar: Any) -> list[Any]:
    from distributed import as_completed

    futures = client.map(call, items, pure=False, key=f"neurocurate_{task_name(call)}")
    index = {fut.key: i for i, fut in enumerate(futures)}
    out: list[Any] = [None] * len(items)
    try:
        for fut in as_completed(futures):
            out[index[fut.key]] = fut.result()
            bar.update(1, failed=isinstance(out[index[fut.key]], MapError))
    except BaseException:
        client.cancel(futures)
        raise
    return out


class Star:
    """``Star(func, **kw)(item)`` is ``func(*item, **kw)``: a picklable adapter for items that are argument tuples."""

    def __init__(self, func: Callable[..., Any], **kwargs: Any):
        self.func = func
        self.kwargs = kwargs

    def __call__(self, item: Sequence[Any]) -> Any:
        return self.func(*item, **self.kwargs)
