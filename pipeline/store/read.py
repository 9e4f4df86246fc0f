"""Reading shard stores back: the index, a store's attributes and catalog, fMRI frames and anatomical volumes.

The on-disk format (written by :mod:`pipeline.store.write`)::

    SHARDS_DIR/index.parquet          one row per curated sample (all stores), metadata under b"neurocurate"
    SHARDS_DIR/<store>/zarr.json      store attributes: kind, atlas, roi_names, ...
    SHARDS_DIR/<store>/catalog.parquet, norm.json, gradients/, shards/shard-<6 digits>/

fMRI frames are read straight from the shard file through the zarr v3 sharding index (no zarr call per
sample); anatomical volumes through zarr.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.errors import InputError
from pipeline.core.layout import (
    CATALOG_NAME,
    INDEX_NAME,
    shard_path,
)

__all__ = [
    "ANAT_MODALITIES",
    "FMRI_MODALITIES",
    "SPLITS",
    "read_anat_rows",
    "read_fmri_rows",
    "read_index",
    "read_store_meta",
]

log = logging.getLogger(__name__)

FMRI_MODALITIES = ("bold", "timeseries")

ANAT_MODALITIES = ("T1w", "T2w", "FLAIR")

SPLITS = ("train", "val", "test")

_INDEX_META_KEY = b"neurocurate"

_LOCATION_COLUMNS = ["sample_id", "store", "shard", "position", "offset", "length", "fingerprint"]

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
