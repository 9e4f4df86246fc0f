"""Writing shard stores: curated samples -> Zarr v3 shards + one parquet index.

Layout under ``SHARDS_DIR`` (default ``OUTPUT_DIR/shards``; paths owned by :mod:`pipeline.core.layout`)::

    index.parquet                 one row per curated sample (all stores)
    neurocurate_config.toml       resolved config of the last run
    fmri-<atlas>/                 one store per atlas (a zarr v3 group)
        zarr.json                 attributes: kind, atlas, roi_names, ...
        gradients/                zarr array [R, k] (when gradients exist)
        norm.json                 per-ROI median / IQR of the training split
        catalog.parquet           every sample ever published in this store
        shards/shard-000000/      one zarr v3 group = one immutable shard
            data/                 [sum(T), R] frames of all runs, one shard file
            offsets/              [N + 1] first frame of every run
            norm_frames/          a few frames per run for the statistics
            norm_position/        which run each of those frames came from
    anat/
        zarr.json, catalog.parquet
        shards/shard-000000/
            x/                    [N, D, H, W] float16 volumes cropped to the box
            mask/                 [N, D, H, W] uint8 brain masks

Every shard is written whole into a hidden temporary directory and renamed
into place, by exactly one writer, and is never modified afterwards: a rerun
only adds shards for samples it has not published yet (or whose source file
changed), so existing shard files stay byte-identical. ``catalog.parquet`` and
``index.parquet`` are replaced atomically after the shards they point to are
in place, so a crash leaves at worst unpublished shard directories, which the
next run deletes.

The core, :func:`write_shards`, takes a :class:`pandas.DataFrame` of samples and
a ``read_sample`` callable, so it works without the rest of the pipeline;
:mod:`pipeline.store.collect` builds that table from an OUTPUT_DIR.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.atomic import atomic_dir, atomic_path, atomic_write_text
from pipeline.core.config import ShardsConfig
from pipeline.core.errors import InputError, NeurocurateError
from pipeline.core.faults import crash_point
from pipeline.core.layout import (
    CATALOG_NAME,
    INDEX_NAME,
    NORM_NAME,
    shard_path,
    store_gradients,
    store_shards_dir,
)
from pipeline.store.collect import default_read_sample
from pipeline.store.read import (
    _INDEX_META_KEY,
    _LOCATION_COLUMNS,
    SPLITS,
    _read_catalog,
    read_store_meta,
)

__all__ = ["ReadSample", "assign_splits", "center_crop_pad", "write_shards"]

log = logging.getLogger(__name__)


ReadSample = Callable[[Mapping[str, Any]], dict[str, Any]]

def _unit_hash(*parts: object) -> float:
    """Deterministic number in [0, 1) from ``parts`` (stable across processes)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64

def assign_splits(subjects: pd.Series, fractions: tuple[float, float, float], seed: int) -> pd.Series:
    """Assign train/val/test per subject from a seeded hash of the subject label.

    Hashing (rather than permuting the current subject list) keeps every
    existing subject in its split when new subjects are added, and all runs of
    a subject share one split by construction.

    Parameters
    ----------
    subjects : pandas.Series
        Subject labels, one per sample.
    fractions : tuple of float
        Expected train, val and test fractions; must sum to 1.
    seed : int
        Changing it reshuffles subjects between splits.

    Returns
    -------
    pandas.Series
        ``"train"``, ``"val"`` or ``"test"`` aligned with ``subjects``.
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or np.any(fr < 0) or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {fractions}")
    edges = np.cumsum(fr)
    cache: dict[str, str] = {}
    for s in pd.unique(subjects):
        u = _unit_hash("split", seed, s)
        cache[s] = SPLITS[min(int(np.searchsorted(edges, u, side="right")), 2)]
    return subjects.map(cache)

def center_crop_pad(volume: np.ndarray, box: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Crop or zero-pad a 3-D volume symmetrically to ``box``.

    Returns
    -------
    out : numpy.ndarray
        Array of shape ``box``.
    shift : tuple of int
        Voxel index in ``volume`` of ``out[0, 0, 0]`` (negative when padded),
        used to rebuild the affine of the box.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
    out = np.zeros(box, dtype=volume.dtype)
    src, dst, shift = [], [], []
    for size, target in zip(volume.shape, box):
        start = (size - target) // 2 if size >= target else -((target - size) // 2)
        shift.append(start)
        lo = max(start, 0)
        hi = min(start + target, size)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = volume[tuple(src)]
    return out, (shift[0], shift[1], shift[2])

def _compressors(cfg: ShardsConfig, kind: str) -> Any:
    import zarr

    if cfg.compressor == "none" or (cfg.compressor == "auto" and kind == "fmri"):
        return None
    return [zarr.codecs.ZstdCodec(level=cfg.compression_level)]

def _write_json_node(directory: Path, attributes: dict[str, Any]) -> None:
    """Write a zarr v3 group node (``zarr.json``) atomically."""
    node = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    atomic_write_text(directory / "zarr.json", json.dumps(node, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _exclusive(shards_dir: Path) -> Iterator[None]:
    """One ``neurocurate shards`` run per SHARDS_DIR at a time."""
    shards_dir.mkdir(parents=True, exist_ok=True)
    with open(shards_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NeurocurateError(f"{shards_dir}: another 'neurocurate shards' run is writing here") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

@dataclass(frozen=True)
class _ShardJob:
    """Everything one writer needs to produce one shard (picklable for dask processes)."""

    store_dir: str
    shard: int
    kind: str
    rows: tuple[dict[str, Any], ...]
    cfg: ShardsConfig
    roi_names: tuple[str, ...] | None

def _check_roi_names(job: _ShardJob, row: Mapping[str, Any], names: list[str], n_cols: int) -> None:
    if n_cols != len(names):
        raise InputError(row.get("path", row["sample_id"]), f"{n_cols} columns but {len(names)} ROI names")
    if job.roi_names is not None and tuple(names) != job.roi_names:
        raise InputError(
            row.get("path", row["sample_id"]),
            f"ROI names differ from the store {Path(job.store_dir).name} (atlas order must be identical)",
        )

def _fmri_arrays(job: _ShardJob, read_sample: ReadSample) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    dtype = np.dtype(job.cfg.fmri_dtype)
    series, locations, norm_frames, norm_pos = [], [], [], []
    offset = 0
    for pos, row in enumerate(job.rows):
        sample = read_sample(row)
        x_TR = np.asarray(sample["x_TR"], dtype=np.float32)
        if x_TR.ndim != 2 or x_TR.shape[0] == 0:
            raise InputError(row.get("path", row["sample_id"]), f"expected a [time, ROI] matrix, got {x_TR.shape}")
        _check_roi_names(job, row, list(sample.get("roi_names") or job.roi_names or []), x_TR.shape[1])
        series.append(x_TR.astype(dtype))
        # A few frames per run feed the training-split statistics without rereading whole shards.
        k = min(job.cfg.norm_frames_per_sample, x_TR.shape[0])
        rng = np.random.default_rng(int(_unit_hash("norm", row["sample_id"]) * 2**63))
        pick = np.sort(rng.choice(x_TR.shape[0], size=k, replace=False))
        norm_frames.append(x_TR[pick])
        norm_pos.append(np.full(k, pos, dtype=np.int32))
        locations.append({"position": pos, "offset": offset, "length": int(x_TR.shape[0])})
        offset += x_TR.shape[0]
    n_rois = series[0].shape[1]
    arrays = {
        "data": np.concatenate(series, axis=0),
        "offsets": np.array([loc["offset"] for loc in locations] + [offset], dtype=np.int64),
        "norm_frames": np.concatenate(norm_frames, axis=0).reshape(-1, n_rois).astype(np.float32),
        "norm_position": np.concatenate(norm_pos),
    }
    return arrays, locations

def _anat_arrays(job: _ShardJob, read_sample: ReadSample) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], list]:
    box = tuple(job.cfg.crop_box)
    n = len(job.rows)
    x = np.zeros((n, *box), dtype=np.dtype(job.cfg.anat_dtype))
    mask = np.zeros((n, *box), dtype=np.uint8)
    locations, geometry = [], []
    for pos, row in enumerate(job.rows):
        sample = read_sample(row)
        vol, shift = center_crop_pad(np.asarray(sample["volume"], dtype=np.float32), box)
        m, _ = center_crop_pad((np.asarray(sample["mask"]) > 0).astype(np.uint8), box)
        x[pos] = vol
        mask[pos] = m
        affine = np.asarray(sample.get("affine", np.eye(4)), dtype=float)
        # Affine of the box: the source affine moved to voxel ``shift``.
        box_affine = affine.copy()
        box_affine[:3, 3] = affine[:3, :3] @ np.asarray(shift, dtype=float) + affine[:3, 3]
        geometry.append({"source_shape": list(np.shape(sample["volume"])), "affine": box_affine.tolist()})
        locations.append({"position": pos, "offset": 0, "length": 1})
    return {"x": x, "mask": mask}, locations, geometry

def _write_shard(job: _ShardJob, read_sample: ReadSample) -> list[dict[str, Any]]:
    """Write one shard whole into a temporary directory and rename it into place.

    Returns the location rows (sample_id, shard, position, offset, length).
    """
    import zarr

    final = shard_path(job.store_dir, job.shard)
    if final.exists():
        raise NeurocurateError(f"{final}: shard already exists; refusing to overwrite a published shard")
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    attrs: dict[str, Any] = {"shard": job.shard, "kind": job.kind, "sample_ids": [r["sample_id"] for r in job.rows]}
    try:
        if job.kind == "fmri":
            arrays, locations = _fmri_arrays(job, read_sample)
            attrs["roi_names"] = list(job.roi_names) if job.roi_names else None
            cf = job.cfg.chunk_frames
            layout = {
                "data": ((cf, arrays["data"].shape[1]), (-(-arrays["data"].shape[0] // cf) * cf, arrays["data"].shape[1])),
            }
        else:
            arrays, locations, geometry = _anat_arrays(job, read_sample)
            attrs["geometry"] = geometry
            one = (1, *job.cfg.crop_box)
            n = arrays["x"].shape[0]
            layout = {"x": (one, (n, *job.cfg.crop_box)), "mask": (one, (n, *job.cfg.crop_box))}
        with _zarr_io_settled():
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes=attrs)
            for name, values in arrays.items():
                chunks, shards = layout.get(name, (values.shape, None))
                arr = group.create_array(
                    name, shape=values.shape, dtype=values.dtype, chunks=chunks, shards=shards,
                    compressors=_compressors(job.cfg, job.kind), fill_value=0,
                )
                arr[...] = values
        os.replace(tmp, final)
        crash_point("shards.shard_published")
    except OSError as exc:
        # A full disk or a lost mount: nothing was published, so the store and the index stay as they were.
        shutil.rmtree(tmp, ignore_errors=True)
        raise NeurocurateError(
            f"{final}: could not write the shard ({exc.strerror or exc}); nothing was published and the "
            "existing shards and index are unchanged"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for loc, row in zip(locations, job.rows):
        loc.update(sample_id=row["sample_id"], shard=job.shard, fingerprint=row.get("fingerprint", ""))
    return locations

@contextlib.contextmanager
def _zarr_io_settled() -> Iterator[None]:
    """On any exception inside, wait for zarr's pending IO before it propagates to the cleanup.

    SIGTERM / Ctrl-C (or a failed write) raise in the middle of a zarr call whose other writes go on in
    zarr's IO thread; removed before they land, a temporary folder would be recreated in part by them.
    """
    try:
        yield
    except BaseException:
        _wait_for_zarr_io()
        raise

def _wait_for_zarr_io(timeout: float = 60.0) -> None:
    """Block until the coroutines pending on zarr's IO event loop (if it runs) have finished (every
    thread's: the loop is shared)."""
    import asyncio

    from zarr.core import sync as zsync

    loop = zsync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def _drain() -> None:
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    try:
        asyncio.run_coroutine_threadsafe(_drain(), loop).result(timeout + 5)
    except Exception as exc:  # the cleanup that follows is still worth doing
        log.warning("zarr writes still pending after %.0f s (%s); removing the temporary shard anyway", timeout, exc)

def _remove_unpublished(store_dir: Path, catalog: pd.DataFrame) -> None:
    """Delete temporary and never-published shard directories left by a crash."""
    shards = store_shards_dir(store_dir)
    if not shards.is_dir():
        return
    published = {shard_path(store_dir, s).name for s in pd.unique(catalog["shard"])}
    for entry in shards.iterdir():
        if entry.name.startswith(".") and ".tmp" in entry.name:
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith("shard-") and entry.name not in published:
            log.info("removing unpublished shard %s left by an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)

def _run_jobs(jobs: list[_ShardJob], read_sample: ReadSample, cfg: ShardsConfig) -> list[list[dict[str, Any]]]:
    """Write the shards of ``jobs``: on the dask cluster of the enclosing ``dask_session`` (``[dask]``) when
    there is one, else ``cfg.workers`` local threads/processes (one shard per task)."""
    from functools import partial

    from pipeline.core.parallel import parallel_map

    workers = 1 if cfg.scheduler == "synchronous" else max(1, cfg.workers)
    return parallel_map(partial(_write_shard, read_sample=read_sample), jobs, workers=workers,
                        backend=cfg.scheduler, progress="shards", unit="shard")

def _store_attributes(samples: pd.DataFrame, kind: str, cfg: ShardsConfig, roi_names: list[str] | None,
                      gradient_columns: list[str] | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"kind": kind, "format": "neurocurate-shards", "format_version": 1}
    if kind == "fmri":
        attrs.update(atlas=str(samples["atlas"].iloc[0]), roi_names=roi_names, fmri_dtype=cfg.fmri_dtype,
                     gradient_columns=gradient_columns or [], layout="data[frames, roi] + offsets")
    else:
        attrs.update(crop_box=list(cfg.crop_box), anat_dtype=cfg.anat_dtype, layout="x[sample, d, h, w] + mask")
    return attrs

def _probe_roi_names(samples: pd.DataFrame, read_sample: ReadSample) -> list[str]:
    row = samples.iloc[0].to_dict()
    sample = read_sample(row)
    names = sample.get("roi_names")
    if not names:
        names = [f"roi{i + 1:03d}" for i in range(np.asarray(sample["x_TR"]).shape[1])]
    return [str(n) for n in names]

def _write_store(samples: pd.DataFrame, store_dir: Path, cfg: ShardsConfig, read_sample: ReadSample,
                 gradients: pd.DataFrame | None) -> pd.DataFrame:
    """Add the not-yet-published samples of one store; return the locations of all ``samples``."""
    kind = str(samples["kind"].iloc[0])
    catalog = _read_catalog(store_dir)
    _remove_unpublished(store_dir, catalog)
    latest = catalog.drop_duplicates("sample_id", keep="last").set_index("sample_id")
    fp = samples["fingerprint"].astype(str)
    known = samples["sample_id"].map(latest["fingerprint"]) if len(latest) else pd.Series(np.nan, index=samples.index)
    todo = samples[known.isna() | (known.astype(str) != fp)]

    meta_path = store_dir / "zarr.json"
    roi_names = None
    if kind == "fmri":
        if meta_path.exists():
            roi_names = read_store_meta(store_dir).get("roi_names")
        elif len(todo):
            roi_names = _probe_roi_names(todo, read_sample)
    if gradients is not None and roi_names is not None and list(gradients["roi"].astype(str)) != list(roi_names):
        raise InputError(gradients.attrs.get("path", "gradients"), "gradient ROI order differs from the time-series ROI names")
    grad_cols = [c for c in gradients.columns if c != "roi"] if gradients is not None else []

    if len(todo):
        store_dir.mkdir(parents=True, exist_ok=True)
        _write_json_node(store_dir, _store_attributes(samples, kind, cfg, roi_names, grad_cols))
        _write_json_node(store_shards_dir(store_dir), {})
        per = cfg.samples_per_shard if kind == "fmri" else cfg.anat_samples_per_shard
        if per < 1:
            raise ValueError(f"samples per shard must be >= 1, got {per}")
        first = int(catalog["shard"].max()) + 1 if len(catalog) else 0
        # Sorting keeps a subject's runs together, so a shard is mostly one site and stays readable in order.
        todo = todo.sort_values(["subject", "sample_id"])
        records = todo.to_dict("records")
        jobs = [
            _ShardJob(str(store_dir), first + i, kind, tuple(records[j:j + per]), cfg,
                      tuple(roi_names) if roi_names else None)
            for i, j in enumerate(range(0, len(records), per))
        ]
        written = [loc for locs in _run_jobs(jobs, read_sample, cfg) for loc in locs]
        new = pd.DataFrame(written)
        new["store"] = store_dir.name
        catalog = pd.concat([catalog, new[_LOCATION_COLUMNS]], ignore_index=True)
        with atomic_path(store_dir / CATALOG_NAME) as tmp:
            catalog.to_parquet(tmp, index=False)
        crash_point("shards.catalog_published")
    elif meta_path.exists():
        # Attributes that may change without touching shards (gradient columns) are refreshed.
        _write_json_node(store_dir, _store_attributes(samples, kind, cfg, roi_names, grad_cols))
    if gradients is not None:
        _write_gradients(store_dir, gradients, cfg)
    latest = catalog.drop_duplicates("sample_id", keep="last").set_index("sample_id")
    loc = latest.loc[samples["sample_id"], ["store", "shard", "position", "offset", "length"]]
    return loc.reset_index()

def _write_gradients(store_dir: Path, gradients: pd.DataFrame, cfg: ShardsConfig) -> None:
    import zarr

    values = gradients.drop(columns="roi").to_numpy(dtype=np.float32)
    # One rename publishes the new array (pipeline.core.atomic.atomic_dir): a loader never sees it missing.
    with atomic_dir(store_gradients(store_dir)) as tmp, _zarr_io_settled():
        arr = zarr.create_array(str(tmp), shape=values.shape, dtype=values.dtype, chunks=values.shape,
                                attributes={"columns": [c for c in gradients.columns if c != "roi"]}, overwrite=True)
        arr[...] = values

def _write_norm_stats(store_dir: Path, index: pd.DataFrame) -> None:
    """Per-ROI median and IQR over sampled frames of the training split."""
    import zarr

    train = index[(index["store"] == store_dir.name) & (index["split"] == "train")]
    if train.empty:
        # Without training runs the statistics fall back to the whole store (said in the file).
        train = index[index["store"] == store_dir.name]
        source = "all splits (no training samples)"
    else:
        source = "train"
    frames = []
    for shard, group in train.groupby("shard"):
        node = zarr.open_group(str(shard_path(store_dir, shard)), mode="r")
        pos = node["norm_position"][...]
        keep = np.isin(pos, group["position"].to_numpy())
        frames.append(node["norm_frames"][...][keep])
    x_NR = np.concatenate(frames, axis=0)
    q25, median, q75 = np.percentile(x_NR, [25, 50, 75], axis=0)
    stats = {
        "source": source, "n_samples": int(len(train)), "n_frames": int(x_NR.shape[0]),
        "roi_names": read_store_meta(store_dir).get("roi_names"),
        "median": median.astype(float).tolist(), "iqr": (q75 - q25).astype(float).tolist(),
    }
    atomic_write_text(store_dir / NORM_NAME, json.dumps(stats) + "\n")

def _prepare(samples: pd.DataFrame, cfg: ShardsConfig) -> pd.DataFrame:
    required = {"sample_id", "subject", "store", "kind"}
    missing = required - set(samples.columns)
    if missing:
        raise ValueError(f"samples table lacks column(s) {sorted(missing)}")
    if samples["sample_id"].duplicated().any():
        dup = samples.loc[samples["sample_id"].duplicated(), "sample_id"].iloc[0]
        raise ValueError(f"sample_id {dup!r} appears twice in the samples table")
    bad = set(samples["kind"]) - {"fmri", "anat"}
    if bad:
        raise ValueError(f"kind must be 'fmri' or 'anat', got {sorted(bad)}")
    if cfg.norm_frames_per_sample < 1:
        raise ValueError(f"norm_frames_per_sample must be >= 1, got {cfg.norm_frames_per_sample}")
    samples = samples.copy()
    samples["subject"] = samples["subject"].astype(str)
    if "fingerprint" not in samples:
        samples["fingerprint"] = ""
    samples["fingerprint"] = samples["fingerprint"].fillna("").astype(str)
    if "split" not in samples:
        samples["split"] = assign_splits(samples["subject"], cfg.split_fractions, cfg.split_seed)
    return samples

def write_shards(samples: pd.DataFrame, shards_dir: str | Path, cfg: ShardsConfig = ShardsConfig(), *,
                 read_sample: ReadSample = default_read_sample,
                 gradients: Mapping[str, pd.DataFrame] | None = None,
                 label_columns: list[str] | None = None, qc_columns: list[str] | None = None) -> pd.DataFrame:
    """Write the curated ``samples`` into shards and replace ``SHARDS_DIR/index.parquet``.

    Parameters
    ----------
    samples : pandas.DataFrame
        One row per curated sample with at least ``sample_id`` (unique),
        ``subject``, ``store`` (``fmri-<atlas>`` or ``anat``), ``kind``
        (``"fmri"``/``"anat"``) and, for fMRI, ``atlas``. Optional:
        ``fingerprint`` (a changed value rewrites the sample into a new
        shard), ``split`` (otherwise assigned per subject). Every other
        column (session, run, site, labels, QC metrics) is copied to the index.
    shards_dir : path-like
        Root of the stores.
    cfg : ShardsConfig
        Shard sizes, dtypes, crop box, split fractions.
    read_sample : callable
        ``read_sample(row_dict)`` returns ``{"x_TR": [T, R] array, "roi_names": [...]}``
        for fMRI or ``{"volume", "mask", "affine"}`` for anat. The default
        reads ``row["path"]`` (and ``row["mask_path"]``).
    gradients : mapping, optional
        Store name to a table with column ``roi`` then ``g1..gk``.
    label_columns, qc_columns : list of str, optional
        Recorded in the index metadata so the loader knows which columns are
        labels.

    Returns
    -------
    pandas.DataFrame
        The new index (also written atomically to ``index.parquet``).
    """
    shards_dir = Path(shards_dir)
    samples = _prepare(samples, cfg)
    with _exclusive(shards_dir):
        parts = []
        for store, group in samples.groupby("store", sort=True):
            grads = (gradients or {}).get(store)
            loc = _write_store(group, shards_dir / store, cfg, read_sample, grads)
            parts.append(group.drop(columns=["store"]).merge(loc, on="sample_id", how="left"))
        index = pd.concat(parts, ignore_index=True) if parts else samples.assign(
            shard=pd.Series(dtype="int64"), position=pd.Series(dtype="int64"),
            offset=pd.Series(dtype="int64"), length=pd.Series(dtype="int64"))
        for store in sorted(pd.unique(index.get("store", pd.Series(dtype=str)))):
            if (index.loc[index["store"] == store, "kind"] == "fmri").any():
                _write_norm_stats(shards_dir / store, index)
                crash_point("shards.norm_written")
        if "source_path" in index:
            # Absolute paths of this machine do not belong in a portable index.
            index = index.drop(columns=[c for c in ("path", "mask_path") if c in index])
        _write_index(shards_dir, index, label_columns or [], qc_columns or [])
    return index

def _write_index(shards_dir: Path, index: pd.DataFrame, label_columns: list[str], qc_columns: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    front = ["sample_id", "store", "kind", "shard", "position", "offset", "length", "subject", "split"]
    index = index[[c for c in front if c in index] + [c for c in index.columns if c not in front]]
    index = index.sort_values(["store", "shard", "position"]).reset_index(drop=True)
    # One dtype for text columns whichever way they arrived (built now, or read back from a catalog), so
    # an incremental rerun writes the same bytes as a fresh one.
    for col in index.columns:
        if index[col].dtype == object and index[col].map(lambda v: isinstance(v, str) or v is None or v != v).all():
            index[col] = index[col].astype("str")
    table = pa.Table.from_pandas(index, preserve_index=False)
    meta = {"label_columns": label_columns, "qc_columns": qc_columns, "stores": sorted(pd.unique(index["store"]))}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _INDEX_META_KEY: json.dumps(meta).encode()})
    with atomic_path(shards_dir / INDEX_NAME) as tmp:
        pq.write_table(table, tmp)
