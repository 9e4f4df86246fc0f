"""Curated samples -> Zarr v3 shards + one parquet index.

Layout under ``SHARDS_DIR`` (default ``OUTPUT_DIR/shards``)::

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
:func:`build_shards` feeds it from the curation table of an ``OUTPUT_DIR``.
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

from pipeline.core.atomic import atomic_path, atomic_write_text
from pipeline.core.config import ShardsConfig
from pipeline.core.errors import InputError, NeurocurateError

__all__ = [
    "ANAT_STORE",
    "CATALOG_NAME",
    "FMRI_MODALITIES",
    "ANAT_MODALITIES",
    "INDEX_NAME",
    "NORM_NAME",
    "assign_splits",
    "build_shards",
    "center_crop_pad",
    "collect_samples",
    "default_read_sample",
    "file_fingerprint",
    "read_anat_files",
    "read_timeseries_tsv",
    "read_index",
    "read_store_meta",
    "read_anat_rows",
    "read_fmri_rows",
    "shard_path",
    "write_shards",
]

log = logging.getLogger(__name__)

INDEX_NAME = "index.parquet"
CATALOG_NAME = "catalog.parquet"
NORM_NAME = "norm.json"
ANAT_STORE = "anat"
FMRI_MODALITIES = ("bold", "timeseries")
ANAT_MODALITIES = ("T1w", "T2w", "FLAIR")
SPLITS = ("train", "val", "test")
# Columns of the curation table that are bookkeeping, not QC metrics.
_CURATION_ID_COLUMNS = {
    "subject", "session", "task", "acq", "run", "modality", "site", "path",
    "qc_pass", "failed_rules", "override", "override_comment", "include",
}
_LOCATION_COLUMNS = ["sample_id", "store", "shard", "position", "offset", "length", "fingerprint"]
_INDEX_META_KEY = b"neurocurate"

ReadSample = Callable[[Mapping[str, Any]], dict[str, Any]]


# --------------------------------------------------------------------------- small helpers


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


def shard_path(store_dir: str | Path, shard: int) -> Path:
    """Directory of shard number ``shard`` inside a store."""
    return Path(store_dir) / "shards" / f"shard-{int(shard):06d}"


def _compressors(cfg: ShardsConfig, kind: str) -> Any:
    import zarr

    if cfg.compressor == "none" or (cfg.compressor == "auto" and kind == "fmri"):
        return None
    return [zarr.codecs.ZstdCodec(level=cfg.compression_level)]


def _write_json_node(directory: Path, attributes: dict[str, Any]) -> None:
    """Write a zarr v3 group node (``zarr.json``) atomically."""
    node = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    atomic_write_text(directory / "zarr.json", json.dumps(node, indent=2, sort_keys=True) + "\n")


def file_fingerprint(path: str | Path) -> str:
    """SHA-1 of a file's bytes: a changed source is written again."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


# --------------------------------------------------------------------------- reading sources


def read_timeseries_tsv(path: str | Path) -> dict[str, Any]:
    """Read a ``_timeseries.tsv`` (header = ROI names) into ``{"x_TR", "roi_names"}``."""
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t")
    except FileNotFoundError:
        raise InputError(path, "ROI time-series file listed in the curation table does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable TSV ({exc})") from None
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise InputError(path, "ROI time series is empty")
    try:
        x_TR = table.to_numpy(dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(path, "ROI time series has non-numeric values") from None
    if not np.isfinite(x_TR).all():
        raise InputError(path, "ROI time series has NaN or infinite values")
    return {"x_TR": x_TR, "roi_names": [str(c) for c in table.columns]}


def read_anat_files(preproc: str | Path, mask: str | Path) -> dict[str, Any]:
    """Read an MNI anatomical image and its brain mask as ``{"volume", "mask", "affine"}``."""
    import nibabel as nib

    out: dict[str, Any] = {}
    for key, path in (("volume", Path(preproc)), ("mask", Path(mask))):
        try:
            img = nib.load(str(path))
        except FileNotFoundError:
            raise InputError(path, "anatomical derivative listed in the curation table does not exist") from None
        except Exception as exc:  # nibabel raises several unrelated types for corrupt files
            raise InputError(path, f"not a readable NIfTI image ({exc})") from None
        data = np.asarray(img.dataobj)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise InputError(path, f"expected a 3-D image, got shape {data.shape}")
        out[key] = data
        if key == "volume":
            out["affine"] = img.affine
    if out["volume"].shape != out["mask"].shape:
        raise InputError(mask, f"mask shape {out['mask'].shape} differs from image shape {out['volume'].shape}")
    return out


def default_read_sample(row: Mapping[str, Any]) -> dict[str, Any]:
    """Read one sample from the files named in its row (``path``, ``mask_path``)."""
    if row["kind"] == "fmri":
        return read_timeseries_tsv(row["path"])
    return read_anat_files(row["path"], row["mask_path"])


# --------------------------------------------------------------------------- writing one shard


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
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes=attrs)
        for name, values in arrays.items():
            chunks, shards = layout.get(name, (values.shape, None))
            arr = group.create_array(
                name, shape=values.shape, dtype=values.dtype, chunks=chunks, shards=shards,
                compressors=_compressors(job.cfg, job.kind), fill_value=0,
            )
            arr[...] = values
        os.replace(tmp, final)
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


# --------------------------------------------------------------------------- stores


def read_store_meta(store_dir: str | Path) -> dict[str, Any]:
    """Attributes of a store (kind, atlas, roi_names, gradient_columns, ...)."""
    node = Path(store_dir) / "zarr.json"
    try:
        return json.loads(node.read_text())["attributes"]
    except FileNotFoundError:
        raise InputError(node, "not a neurocurate shard store (zarr.json missing)") from None


def _read_catalog(store_dir: Path) -> pd.DataFrame:
    path = store_dir / CATALOG_NAME
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("shard", "position", "offset", "length") else "object")
                             for c in _LOCATION_COLUMNS})
    return pd.read_parquet(path)


def _remove_unpublished(store_dir: Path, catalog: pd.DataFrame) -> None:
    """Delete temporary and never-published shard directories left by a crash."""
    shards = store_dir / "shards"
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
    if cfg.workers <= 1 or len(jobs) <= 1 or cfg.scheduler == "synchronous":
        return [_write_shard(job, read_sample) for job in jobs]
    import dask

    tasks = [dask.delayed(_write_shard)(job, read_sample) for job in jobs]
    return list(dask.compute(*tasks, scheduler=cfg.scheduler, num_workers=cfg.workers))


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
        _write_json_node(store_dir / "shards", {})
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
    target = store_dir / "gradients"
    tmp = store_dir / f".gradients.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    arr = zarr.create_array(str(tmp), shape=values.shape, dtype=values.dtype, chunks=values.shape,
                            attributes={"columns": [c for c in gradients.columns if c != "roi"]})
    arr[...] = values
    old = store_dir / f".gradients.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


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


# --------------------------------------------------------------------------- the core


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
    table = pa.Table.from_pandas(index, preserve_index=False)
    meta = {"label_columns": label_columns, "qc_columns": qc_columns, "stores": sorted(pd.unique(index["store"]))}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _INDEX_META_KEY: json.dumps(meta).encode()})
    with atomic_path(shards_dir / INDEX_NAME) as tmp:
        pq.write_table(table, tmp)


def read_index(shards_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read ``index.parquet`` and its metadata (label_columns, qc_columns, stores)."""
    import pyarrow.parquet as pq

    path = Path(shards_dir) / INDEX_NAME
    if not path.exists():
        raise InputError(path, "no shard index here; run 'neurocurate shards OUTPUT_DIR' first")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise InputError(path, f"not a readable shard index ({type(exc).__name__}); rerun 'neurocurate shards'") from None
    meta = json.loads((table.schema.metadata or {}).get(_INDEX_META_KEY, b"{}"))
    return table.to_pandas(), meta


# --------------------------------------------------------------------------- reading shards back


_NO_CHUNK = 2**64 - 1


def _plain_layout(array_dir: Path) -> dict[str, Any] | None:
    """Layout of a one-shard, uncompressed 2-D array, or None when zarr has to decode it.

    Such shards (the fMRI default) are read straight from the shard file
    through its sharding index, which the zarr v3 spec fixes: ``n_chunks`` x
    (offset, nbytes) little-endian uint64 followed by a CRC32C, at the end
    (or start) of the file. That skips two copies and the async machinery and
    brings reads to raw-file speed. The index checksum is not verified on
    this path (zarr does verify it on the compressed path).
    """
    meta = json.loads((array_dir / "zarr.json").read_text())
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    conf = codecs[0]["configuration"]
    inner = conf.get("codecs", [])
    if len(inner) != 1 or inner[0]["name"] != "bytes" or inner[0].get("configuration", {}).get("endian", "little") != "little":
        return None
    if [c["name"] for c in conf.get("index_codecs", [])] != ["bytes", "crc32c"]:
        return None
    shape = meta["shape"]
    shard_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    chunk = conf["chunk_shape"]
    if len(shape) != 2 or shape[0] > shard_shape[0] or chunk[1] != shape[1] or shard_shape[1] != shape[1]:
        return None
    fill = meta.get("fill_value", 0)
    return {
        "n_cols": shape[1], "dtype": np.dtype(meta["data_type"]).newbyteorder("<"), "chunk_rows": chunk[0],
        "n_chunks": shard_shape[0] // chunk[0], "at_end": conf.get("index_location", "end") == "end",
        "fill": float(fill) if isinstance(fill, (int, float)) else np.nan,
    }


def _read_plain(array_dir: Path, layout: dict[str, Any], ranges: list[tuple[int, int]]) -> list[np.ndarray]:
    """Row ranges ``[(lo, hi), ...]`` of a plain one-shard array as float32, read with the sharding index.

    Each range is read straight into its own array: no shard-sized block is
    ever held, so memory stays at the size of what is asked for.
    """
    outs = [np.empty((hi - lo, layout["n_cols"]), dtype=np.float32) for lo, hi in ranges]
    path = array_dir / "c" / "0" / "0"
    if not path.exists():  # zarr leaves out a shard that is entirely fill value
        for out in outs:
            out[:] = layout["fill"]
        return outs
    n, rows = layout["n_chunks"], layout["chunk_rows"]
    row_bytes = layout["n_cols"] * layout["dtype"].itemsize
    size = path.stat().st_size
    if size < n * 16 + 4:
        raise InputError(path, f"corrupted shard: {size} bytes, smaller than its own chunk index")
    with open(path, "rb") as fh:
        if layout["at_end"]:
            fh.seek(-(n * 16 + 4), os.SEEK_END)
        index = np.frombuffer(fh.read(n * 16 + 4)[:-4], dtype="<u8").reshape(n, 2)
        stored = index[:, 0] != _NO_CHUNK
        # A truncated or overwritten file shows up as chunks that point past its end (or have the wrong size).
        if np.any(index[stored, 0] + index[stored, 1] > size) or np.any(index[stored, 1] != rows * row_bytes):
            raise InputError(path, "corrupted shard: its chunk index points outside the file (truncated?)")
        for (lo, hi), out in zip(ranges, outs):
            for c in range(lo // rows, (hi - 1) // rows + 1):
                r0, r1 = max(lo, c * rows), min(hi, (c + 1) * rows)
                offset = int(index[c, 0])
                if offset == _NO_CHUNK:  # an all-fill chunk is not stored
                    out[r0 - lo:r1 - lo] = layout["fill"]
                    continue
                fh.seek(offset + (r0 - c * rows) * row_bytes)
                if layout["dtype"] == np.float32:
                    fh.readinto(memoryview(out[r0 - lo:r1 - lo]).cast("B"))
                else:
                    raw = fh.read((r1 - r0) * row_bytes)
                    out[r0 - lo:r1 - lo] = np.frombuffer(raw, dtype=layout["dtype"]).reshape(r1 - r0, -1)
    return outs


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def read_fmri_rows(store_dir: str | Path, shard: int, offsets: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Read several runs of one fMRI shard.

    Returns one float32 ``[T, R]`` array per requested run, in request order;
    each owns its memory, so holding one run does not keep a whole read alive.
    Uncompressed shards are read run by run from the shard file; others with
    one zarr range read.
    """
    import zarr

    array_dir = shard_path(store_dir, shard) / "data"
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    try:
        layout = _plain_layout(array_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(array_dir / "zarr.json", f"corrupted shard metadata ({type(exc).__name__}: {_one_line(exc)})") from None
    if layout is not None:
        return _read_plain(array_dir, layout, [(o, o + n) for o, n in zip(offsets.tolist(), lengths.tolist())])
    lo = int(np.min(offsets))
    hi = int(np.max(offsets + lengths))
    try:
        block = np.asarray(zarr.open_array(str(array_dir), mode="r")[lo:hi], dtype=np.float32)
    except Exception as exc:  # zarr and the codecs raise many types for damaged chunks
        raise InputError(array_dir, f"corrupted shard ({type(exc).__name__}: {_one_line(exc)})") from None
    return [block[o - lo:o - lo + n].copy() for o, n in zip(offsets.tolist(), lengths.tolist())]


def read_anat_rows(store_dir: str | Path, shard: int, positions: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read ``(volume [D, H, W] float32, mask [D, H, W] uint8)`` for positions of one anat shard."""
    import zarr

    lo, hi = int(np.min(positions)), int(np.max(positions)) + 1
    try:
        node = zarr.open_group(str(shard_path(store_dir, shard)), mode="r")
        x = np.asarray(node["x"][lo:hi], dtype=np.float32)
        m = np.asarray(node["mask"][lo:hi])
    except Exception as exc:  # zarr and the codecs raise many types for damaged chunks
        raise InputError(shard_path(store_dir, shard), f"corrupted shard ({type(exc).__name__}: {_one_line(exc)})") from None
    return [(x[p - lo].copy(), m[p - lo].copy()) for p in positions.tolist()]


# --------------------------------------------------------------------------- from an OUTPUT_DIR


def _atlas_of(path: str) -> str:
    from pipeline.core.derivatives import parse_name

    entities, suffix, _ = parse_name(path)
    if suffix != "timeseries" or "atlas" not in entities:
        raise InputError(path, "fMRI rows of the curation table must point at an _atlas-<name>_timeseries.tsv")
    return entities["atlas"]


def _clean(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def collect_samples(output_dir: str | Path, cfg: ShardsConfig = ShardsConfig()) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Turn ``OUTPUT_DIR/curation/curation.parquet`` + participants.tsv into a samples table.

    Returns
    -------
    samples : pandas.DataFrame
        Included rows only, with ``sample_id``, ``store``, ``kind``, ``atlas``,
        absolute ``path`` / ``mask_path``, ``fingerprint``, labels and QC metrics.
    label_columns, qc_columns : list of str
    """
    from pipeline.core.derivatives import anat_outputs

    output_dir = Path(output_dir)
    cur_path = output_dir / "curation" / "curation.parquet"
    if not cur_path.exists():
        raise InputError(cur_path, "no curation table; run the QC group step first (it writes curation/curation.parquet)")
    try:
        cur = pd.read_parquet(cur_path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise InputError(cur_path, f"not a readable parquet file ({exc})") from None
    missing = {"subject", "modality", "path", "include"} - set(cur.columns)
    if missing:
        raise InputError(cur_path, f"missing column(s) {sorted(missing)}")
    bad = set(cur["modality"]) - set(FMRI_MODALITIES) - set(ANAT_MODALITIES)
    if bad:
        raise InputError(cur_path, f"unknown modality value(s) {sorted(bad)}")
    qc_columns = [c for c in cur.columns if c not in _CURATION_ID_COLUMNS] + [c for c in ("qc_pass", "override") if c in cur]
    cur = cur[cur["include"].fillna(False).astype(bool)].copy()
    for col in ("session", "task", "acq", "run", "site"):
        cur[col] = cur[col].map(_clean) if col in cur else ""
    cur["subject"] = cur["subject"].astype(str).str.removeprefix("sub-")

    labels, label_columns = _participants(output_dir)
    rows = []
    for rec in cur.to_dict("records"):
        rel = str(rec["path"])
        rec["source_path"] = rel
        rec["path"] = str(output_dir / rel)
        ents = {"sub": rec["subject"], "ses": rec["session"], "task": rec["task"], "acq": rec["acq"], "run": rec["run"]}
        if rec["modality"] in FMRI_MODALITIES:
            rec["kind"], rec["atlas"] = "fmri", _atlas_of(rel)
            if cfg.atlas and rec["atlas"] != cfg.atlas:
                continue
            rec["store"] = f"fmri-{rec['atlas']}"
            rec["mask_path"] = ""
            rec["sample_id"] = Path(rel).name.removesuffix("_timeseries.tsv")
        else:
            rec["kind"], rec["atlas"], rec["store"] = "anat", "", ANAT_STORE
            outs = anat_outputs(output_dir, ents, rec["modality"])
            rec["mask_path"] = str(outs.mask)
            rec["sample_id"] = Path(rel).name.removesuffix(".nii.gz")
        if not Path(rec["path"]).exists():
            raise InputError(rec["path"], "listed in the curation table but does not exist")
        rec["fingerprint"] = file_fingerprint(rec["path"])
        if rec["kind"] == "anat" and Path(rec["mask_path"]).exists():
            rec["fingerprint"] += ":" + file_fingerprint(rec["mask_path"])
        rows.append(rec)
    samples = pd.DataFrame(rows)
    if samples.empty:
        return samples, label_columns, qc_columns
    if labels is not None:
        overlap = [c for c in label_columns if c in samples.columns]
        samples = samples.merge(labels.rename(columns={c: f"{c}__p" for c in overlap}), on="subject", how="left")
        for c in overlap:
            # The curation table wins (it is per scan); participants.tsv fills its gaps.
            filled = samples[c].replace("", np.nan).fillna(samples[f"{c}__p"])
            samples[c] = filled
            samples = samples.drop(columns=f"{c}__p")
    return samples, label_columns, qc_columns


def _participants(output_dir: Path) -> tuple[pd.DataFrame | None, list[str]]:
    path = output_dir / "participants.tsv"
    if not path.exists():
        log.warning("%s not found: the index will have no labels", path)
        return None, []
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a", "N/A", ""], dtype={"participant_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable TSV ({exc})") from None
    if "participant_id" not in table:
        raise InputError(path, "has no participant_id column")
    if table["participant_id"].duplicated().any():
        raise InputError(path, f"participant {table.loc[table['participant_id'].duplicated(), 'participant_id'].iloc[0]} listed twice")
    table["subject"] = table["participant_id"].astype(str).str.removeprefix("sub-")
    label_columns = [c for c in table.columns if c not in ("participant_id", "subject")]
    return table.drop(columns="participant_id"), label_columns


def _read_gradients(output_dir: Path, atlas: str) -> pd.DataFrame | None:
    path = output_dir / "gradients" / f"atlas-{atlas}_gradients.tsv"
    if not path.exists():
        return None
    try:
        table = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable TSV ({exc})") from None
    if "roi" not in table or table.shape[1] < 2:
        raise InputError(path, "needs a 'roi' column followed by g1..gk")
    table.attrs["path"] = str(path)
    return table


def build_shards(output_dir: str | Path, shards_dir: str | Path | None = None,
                 cfg: ShardsConfig = ShardsConfig()) -> pd.DataFrame:
    """Shard the curated data of ``OUTPUT_DIR`` (``neurocurate shards``).

    Parameters
    ----------
    output_dir : path-like
        Derivatives folder with ``curation/curation.parquet`` and
        ``participants.tsv``.
    shards_dir : path-like, optional
        Defaults to ``cfg.shards_dir`` or ``OUTPUT_DIR/shards``.
    cfg : ShardsConfig

    Returns
    -------
    pandas.DataFrame
        The index written to ``SHARDS_DIR/index.parquet``.

    Notes
    -----
    The index always describes the current curation table: excluded samples
    leave the index (their shard files stay as they are), and with
    ``cfg.atlas`` set only that atlas's store is indexed.
    """
    output_dir = Path(output_dir)
    shards_dir = Path(shards_dir or cfg.shards_dir or output_dir / "shards")
    samples, label_columns, qc_columns = collect_samples(output_dir, cfg)
    if samples.empty:
        raise NeurocurateError(f"{output_dir / 'curation' / 'curation.parquet'}: no included samples to shard")
    gradients = {}
    for atlas in sorted(set(samples.loc[samples["kind"] == "fmri", "atlas"])):
        table = _read_gradients(output_dir, atlas)
        if table is not None:
            gradients[f"fmri-{atlas}"] = table
    return write_shards(samples, shards_dir, cfg, gradients=gradients,
                        label_columns=label_columns, qc_columns=qc_columns)
