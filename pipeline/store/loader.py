"""Streaming, resumable torch loader over the shards written by :mod:`pipeline.store.write`.

Each item yielded by :class:`ShardDataset` is a dict.

fMRI stores (``store="fmri-<atlas>"``):

``x`` : float32 tensor ``[R, T]``
    ROI x time window, ``T = LoaderConfig.window_length`` (or the whole run
    when it is 0); per-ROI robust normalised ``(x - median) / IQR`` with the
    training-split statistics of the store unless ``normalization="none"``.
    Frames past the end of a short run are zeros.
``gradients`` : float32 tensor ``[R, k]``
    Gradient coordinates of the ROIs (same for every sample of a store);
    absent when the store has none.
``n_frames`` : int
    Real (unpadded) frames in ``x``.
``start`` : int
    First frame of the window within the run.
``length`` : int
    Frames of the whole run.

anatomical store (``store="anat"``):

``x`` : float32 tensor ``[1, D, H, W]``
    Volume in the crop box, normalised per volume by the median and IQR of
    the voxels inside the mask (unless ``normalization="none"``).
``mask`` : uint8 tensor ``[1, D, H, W]``
    Brain mask.

Both:

``sample_id``, ``subject``, ``session``, ``task``, ``run``, ``modality``,
``site``, ``split`` : str
    Identity of the sample ("" when not applicable).
label columns (every ``participants.tsv`` column, e.g. ``age``, ``sex``, ``diagnosis``)
    float (NaN when missing) for numeric columns, str ("" when missing) otherwise;
    :attr:`ShardDataset.label_columns` lists them.
``worker`` : int
    DataLoader worker that produced the sample; :class:`StreamLoader` uses
    it to count progress for :meth:`ShardDataset.state_dict`.

:func:`collate_samples` turns a list of these into a batch: tensors stacked
(``x`` padded to the longest run with a ``frame_mask`` [B, T] when windows
have different lengths), numbers to tensors, strings to lists.

Order and partitioning: every epoch, shards are permuted with a generator
seeded by ``(seed, epoch)``; the resulting sample sequence is cut into
``world_size x num_workers`` contiguous, near-equal parts, so each sample
goes to exactly one worker of one rank; each worker shuffles within its
shards and through a buffer of ``shuffle_buffer`` samples. Ranks get counts
that differ by at most one sample, see :meth:`ShardDataset.num_samples`.

Resuming: the emitted order of each worker depends only on indices, so
:meth:`ShardDataset.load_state_dict` lets every worker skip exactly the
samples already consumed and reload only what sat in its shuffle buffer.
Resume with the same selection, seed, world size and ``num_workers``.

Example::

    ds = ShardDataset("OUT/shards", cfg.loader, store="fmri-CC200", split="train")
    loader = StreamLoader(ds, batch_size=32, num_workers=2)
    loader.load_state_dict(ckpt["loader"])        # optional, mid-epoch resume
    for epoch in range(n_epochs):
        for batch in loader:                      # batch["x"]: [B, R, T]
            ...
            ckpt["loader"] = loader.state_dict()  # plain JSON-able dict

A plain ``DataLoader(ds, collate_fn=collate_samples)`` partitions the same
way, but only :class:`StreamLoader` (or iterating ``ds`` directly) tracks
progress for :meth:`ShardDataset.state_dict`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core.config import LoaderConfig
from pipeline.core.errors import InputError
from pipeline.core.layout import NORM_NAME, store_gradients
from pipeline.store.read import read_anat_rows, read_fmri_rows, read_index, read_store_meta

__all__ = ["ShardDataset", "StreamLoader", "collate_samples"]

_ID_COLUMNS = ("sample_id", "subject", "session", "task", "run", "modality", "site", "split")
_STATE_VERSION = 1


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


class ShardDataset(IterableDataset):
    """Stream the samples of one shard store, shuffled, partitioned and resumable.

    Parameters
    ----------
    shards_dir : path-like
        Folder with ``index.parquet`` (``OUTPUT_DIR/shards`` by default).
    cfg : LoaderConfig
        Window length, shuffle buffer, seed, normalisation.
    store : str, optional
        ``"fmri-<atlas>"`` or ``"anat"``; may be left out when the index has
        a single fMRI store.
    split : str or sequence of str, optional
        Keep only these splits (``"train"``, ``"val"``, ``"test"``).
    modality : str or sequence of str, optional
        Keep only these modalities (``"T1w"``, ``"bold"``, ``"timeseries"``...).
    sites : sequence of str, optional
        Keep only these sites.
    require_labels : sequence of str
        Keep only samples where all these label columns are present.
    training : bool
        Random window crops (True) or centred ones (False).
    shuffle : bool, optional
        Shard permutation and shuffle buffer; defaults to ``training``.
    rank, world_size : int, optional
        DDP position; taken from ``torch.distributed`` when initialised.
    """

    def __init__(self, shards_dir: str | Path, cfg: LoaderConfig = LoaderConfig(), *, store: str | None = None,
                 split: str | Sequence[str] | None = None, modality: str | Sequence[str] | None = None,
                 sites: Sequence[str] | None = None, require_labels: Sequence[str] = (),
                 training: bool = True, shuffle: bool | None = None,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.shards_dir = Path(shards_dir)
        self.cfg = cfg
        self.training = training
        self.shuffle = training if shuffle is None else shuffle
        self.rank, self.world_size = _dist_position(rank, world_size)
        index, meta = read_index(self.shards_dir)
        self.store = _pick_store(index, store, self.shards_dir)
        self.store_dir = self.shards_dir / self.store
        self.store_meta = read_store_meta(self.store_dir)
        self.kind = self.store_meta["kind"]
        self.label_columns = [c for c in meta.get("label_columns", []) if c in index.columns and c not in _ID_COLUMNS]
        self.index = self._select(index, split, modality, sites, require_labels)
        self._numeric_labels = {c for c in self.label_columns
                                if pd.api.types.is_numeric_dtype(self.index[c]) or pd.api.types.is_bool_dtype(self.index[c])}
        self._meta = [self._row_meta(rec) for rec in self.index.to_dict("records")]
        self._median_R1, self._scale_R1 = self._norm_stats()
        self.gradients_Rk = self._gradients()
        self.epoch = 0
        self._consumed: list[int] | None = None
        self._num_workers_seen = 1
        # Stream served by DataLoader worker 0 on the next iteration: a resumed
        # DataLoader starts its round-robin at worker 0, so streams are rotated
        # to keep the batch order of the interrupted run.
        self._rotation = 0
        self._next_stream = 0

    @property
    def roi_names(self) -> list[str]:
        """ROI names in the order of ``x``'s first axis (fMRI stores)."""
        return list(self.store_meta.get("roi_names") or [])

    @property
    def atlas(self) -> str:
        """Atlas of an fMRI store ("" for anat)."""
        return str(self.store_meta.get("atlas", ""))

    # ------------------------------------------------------------------ setup

    def _select(self, index: pd.DataFrame, split, modality, sites, require_labels) -> pd.DataFrame:
        index = index[index["store"] == self.store]
        for column, wanted in (("split", split), ("modality", modality), ("site", sites)):
            if wanted is None:
                continue
            wanted = [wanted] if isinstance(wanted, str) else list(wanted)
            index = index[index[column].astype(str).isin(wanted)]
        for column in require_labels:
            if column not in index.columns:
                raise ValueError(f"label {column!r} is not in the index; known labels: {self.label_columns}")
            values = index[column]
            index = index[values.notna() & (values.astype(str) != "")]
        if self.kind == "fmri" and self.cfg.short_policy == "drop" and self.cfg.window_length > 0:
            index = index[index["length"] >= self.cfg.window_length]
        index = index.sort_values(["shard", "position"]).reset_index(drop=True)
        return index

    def _norm_stats(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        if self.kind != "fmri" or self.cfg.normalization == "none":
            return None, None
        path = self.store_dir / NORM_NAME
        try:
            stats = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(path, "normalisation statistics missing; rerun 'neurocurate shards'") from None
        median = np.asarray(stats["median"], dtype=np.float32)[:, None]
        iqr = np.asarray(stats["iqr"], dtype=np.float32)[:, None]
        # Constant ROIs have IQR 0; dividing by 1 keeps them at 0 instead of inf.
        return median, np.where(iqr > 1e-8, iqr, 1.0).astype(np.float32)

    def _gradients(self) -> torch.Tensor | None:
        if self.kind != "fmri" or not store_gradients(self.store_dir).exists():
            return None
        import zarr

        return torch.from_numpy(np.asarray(zarr.open_array(str(store_gradients(self.store_dir)), mode="r")[...],
                                           dtype=np.float32))

    # ------------------------------------------------------------------ order

    def _sequence(self, epoch: int) -> np.ndarray:
        """Row numbers of the whole epoch, shard-contiguous, before partitioning."""
        shards = self.index["shard"].to_numpy()
        unique, starts = np.unique(shards, return_index=True)
        ends = np.append(starts[1:], len(shards))
        order = np.arange(len(unique))
        if self.shuffle:
            order = _rng(self.cfg.seed, epoch, 1).permutation(len(unique))
        if len(order) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(starts[i], ends[i]) for i in order])

    def _part(self, epoch: int, worker: int, num_workers: int) -> np.ndarray:
        seq = self._sequence(epoch)
        g = self.rank * num_workers + worker
        n_parts = self.world_size * num_workers
        return seq[len(seq) * g // n_parts: len(seq) * (g + 1) // n_parts]

    def _plan(self, epoch: int, worker: int, num_workers: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """Emission order of one worker and, per shard segment, how many were emitted before it is read.

        Only indices move here, so the plan of a whole epoch costs microseconds
        and a resumed worker can jump to any position without reading data.
        """
        part = self._part(epoch, worker, num_workers)
        shards = self.index["shard"].to_numpy()[part]
        cut = np.flatnonzero(np.diff(shards)) + 1
        segments = np.split(part, cut) if len(part) else []
        if not self.shuffle:
            loads, done = [], 0
            for seg in segments:
                loads.append((done, seg))
                done += len(seg)
            return part, loads
        rng = _rng(self.cfg.seed, epoch, 2, self.rank, worker, num_workers)
        size = max(1, self.cfg.shuffle_buffer)
        buffer: list[int] = []
        emitted: list[int] = []
        loads = []
        for seg in segments:
            loads.append((len(emitted), seg))
            for row in rng.permutation(seg).tolist():
                buffer.append(row)
                if len(buffer) >= size:
                    j = int(rng.integers(len(buffer)))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    emitted.append(buffer.pop())
        while buffer:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            emitted.append(buffer.pop())
        return np.asarray(emitted, dtype=np.int64), loads

    def num_samples(self, num_workers: int = 0) -> int:
        """Samples this rank yields per epoch (identical for every epoch)."""
        w = max(1, num_workers)
        return sum(len(self._part(0, k, w)) for k in range(w))

    # ------------------------------------------------------------------ data

    def _read(self, rows: np.ndarray) -> dict[int, Any]:
        """Raw arrays of ``rows`` (one shard each call group), keyed by row number."""
        out: dict[int, Any] = {}
        frame = self.index.iloc[rows]
        for shard, group in frame.groupby("shard", sort=False):
            if self.kind == "fmri":
                arrays = read_fmri_rows(self.store_dir, int(shard), group["offset"].to_numpy(), group["length"].to_numpy())
            else:
                arrays = read_anat_rows(self.store_dir, int(shard), group["position"].to_numpy())
            out.update(zip(group.index.tolist(), arrays))
        return out

    def _window(self, x_TR: np.ndarray, row: int, u_N: np.ndarray) -> tuple[np.ndarray, int]:
        L = self.cfg.window_length
        T = x_TR.shape[0]
        if L <= 0 or T == L:
            return x_TR, 0
        if T < L:
            padded = np.zeros((L, x_TR.shape[1]), dtype=x_TR.dtype)
            padded[:T] = x_TR
            return padded, 0
        if self.training:
            start = min(int(u_N[row] * (T - L + 1)), T - L)
        else:
            start = (T - L) // 2
        return x_TR[start:start + L], start

    def _sample(self, row: int, raw: Any, u_N: np.ndarray, worker: int) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._meta[row])
        if self.kind == "fmri":
            x_TR = raw
            T = x_TR.shape[0]
            win_TR, start = self._window(x_TR, row, u_N)
            n_frames = min(T - start, win_TR.shape[0])
            x_RT = np.ascontiguousarray(win_TR.T)
            if self._median_R1 is not None:
                x_RT = (x_RT - self._median_R1) / self._scale_R1
                x_RT[:, n_frames:] = 0.0
            out["x"] = torch.from_numpy(x_RT.astype(np.float32, copy=False))
            if self.gradients_Rk is not None:
                out["gradients"] = self.gradients_Rk
            out.update(n_frames=int(n_frames), start=int(start), length=int(T))
        else:
            vol, mask = raw
            if self.cfg.normalization != "none":
                inside = vol[mask > 0] if mask.any() else vol.ravel()
                q25, med, q75 = np.percentile(inside, [25, 50, 75])
                vol = (vol - med) / (q75 - q25 if q75 - q25 > 1e-8 else 1.0)
            out["x"] = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32)[None])
            out["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8)[None])
        out["worker"] = worker
        return out

    def _row_meta(self, rec: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for col in _ID_COLUMNS:
            value = rec.get(col, "")
            out[col] = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
        for col in self.label_columns:
            out[col] = _label_value(rec[col], col in self._numeric_labels)
        return out

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        worker = (worker + self._rotation) % num_workers
        epoch = self.epoch
        consumed = self._consumed
        if consumed is not None and len(consumed) != num_workers:
            raise ValueError(
                f"the saved loader state was taken with {len(consumed)} worker stream(s) per rank; "
                f"resume with num_workers={len(consumed) if len(consumed) > 1 else 0}, not {num_workers if info else 0}"
            )
        skip = consumed[worker] if consumed is not None else 0
        plan, loads = self._plan(epoch, worker, num_workers)
        if info is None:
            self._num_workers_seen = 1
            if self._consumed is None:
                self._consumed = [0]
        needed = set(plan[skip:].tolist())
        # One uniform number per sample and epoch: crops do not depend on arrival order.
        u_N = _rng(self.cfg.seed, epoch, 3).random(len(self.index))
        loaded: dict[int, Any] = {}
        li = 0
        for k in range(skip, len(plan)):
            while li < len(loads) and loads[li][0] <= k:
                rows = np.asarray([r for r in loads[li][1].tolist() if r in needed], dtype=np.int64)
                if len(rows):
                    loaded.update(self._read(rows))
                li += 1
            row = int(plan[k])
            sample = self._sample(row, loaded.pop(row), u_N, worker)
            if info is None:
                # In the main process the dataset is its own progress counter.
                self._consumed[0] += 1
            yield sample
        if info is None:
            self.set_epoch(epoch + 1)

    # ------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning on the next iteration."""
        self.epoch = int(epoch)
        self._consumed = None
        self._rotation = 0
        self._next_stream = 0

    def _record(self, workers: Sequence[int], num_workers: int) -> None:
        """Count one consumed batch per worker stream (called by :class:`StreamLoader`)."""
        if self._consumed is None or len(self._consumed) != num_workers:
            self._consumed = [0] * num_workers
        for w in workers:
            self._consumed[int(w)] += 1
        self._num_workers_seen = num_workers
        if len(workers):
            self._next_stream = (int(workers[-1]) + 1) % num_workers

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream of this rank: epoch and samples consumed per worker."""
        consumed = list(self._consumed) if self._consumed is not None else [0] * self._num_workers_seen
        return {
            "version": _STATE_VERSION, "epoch": self.epoch, "seed": self.cfg.seed, "consumed": consumed,
            "rank": self.rank, "world_size": self.world_size, "n_samples": len(self.index), "store": self.store,
            "next_worker": self._next_stream if self._consumed is not None else 0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the next iteration continues mid-epoch exactly.

        The dataset selection, seed, world size and number of workers must be
        the ones the state was taken with; a mismatch is an error because it
        would silently repeat or skip samples.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r}")
        for key, mine in (("seed", self.cfg.seed), ("world_size", self.world_size), ("rank", self.rank),
                          ("n_samples", len(self.index)), ("store", self.store)):
            if state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]!r} but this dataset has {mine!r}")
        self.epoch = int(state["epoch"])
        self._consumed = [int(c) for c in state["consumed"]]
        self._num_workers_seen = len(self._consumed)
        self._rotation = self._next_stream = int(state.get("next_worker", 0))


def _label_value(value: Any, numeric: bool) -> Any:
    """float (NaN when missing) for numeric columns, str ("" when missing) otherwise."""
    missing = value is None or bool(pd.isna(value))
    if numeric:
        return math.nan if missing else float(value)
    return "" if missing else str(value)


def _dist_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    rank, world_size = int(rank or 0), int(world_size or 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


def _pick_store(index: pd.DataFrame, store: str | None, shards_dir: Path) -> str:
    stores = sorted(pd.unique(index["store"]))
    if store is None:
        fmri = [s for s in stores if s.startswith("fmri-")]
        if len(fmri) != 1:
            raise ValueError(f"{shards_dir}: choose a store with store=...; the index has {stores}")
        return fmri[0]
    if store not in stores:
        raise ValueError(f"{shards_dir}: store {store!r} is not in the index; it has {stores}")
    return store


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch sample dicts: stack tensors, pad variable-length ``x`` (adding ``frame_mask``), list strings.

    Returns
    -------
    dict
        ``x`` ``[B, R, T]`` (or ``[B, 1, D, H, W]``), ``gradients`` ``[B, R, k]``,
        ``mask``, numbers as float/long tensors, strings as lists, and
        ``frame_mask`` bool ``[B, T]`` (True on real frames) for fMRI.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            if key == "x" and first.dim() == 2 and len({v.shape[-1] for v in values}) > 1:
                T = max(v.shape[-1] for v in values)
                x_BRT = first.new_zeros((len(values), first.shape[0], T))
                for i, v in enumerate(values):
                    x_BRT[i, :, : v.shape[-1]] = v
                batch[key] = x_BRT
            else:
                batch[key] = torch.stack(values)
        elif isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = list(values)
    if "n_frames" in batch and batch["x"].dim() == 3:
        T = batch["x"].shape[-1]
        batch["frame_mask"] = torch.arange(T)[None, :] < batch["n_frames"][:, None]
    return batch


class StreamLoader:
    """A :class:`~torch.utils.data.DataLoader` over a :class:`ShardDataset` that tracks its position.

    Iterating yields collated batches of one epoch and then moves the dataset
    to the next epoch; :meth:`state_dict` taken between batches resumes
    exactly after the last batch handed out.

    Parameters
    ----------
    dataset : ShardDataset
    batch_size : int
    num_workers : int
        DataLoader worker processes (0 = read in the main process).
    **kwargs
        Passed to DataLoader (``pin_memory``, ``prefetch_factor``, ...);
        ``persistent_workers`` is refused because worker copies would not
        see the epoch change.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, num_workers: int = 0, **kwargs: Any):
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers=True is not supported: workers would keep the old epoch")
        self.dataset = dataset
        self.num_workers = num_workers
        self.batch_size = batch_size
        self.loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                 collate_fn=kwargs.pop("collate_fn", collate_samples), **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        epoch = ds.epoch
        for batch in self.loader:
            if self.num_workers > 0:
                ds._record(batch["worker"].tolist(), self.num_workers)
            yield batch
        if self.num_workers > 0:
            ds.set_epoch(epoch + 1)

    def __len__(self) -> int:
        w = max(1, self.num_workers)
        return sum(math.ceil(len(self.dataset._part(0, k, w)) / self.batch_size) for k in range(w))

    def state_dict(self) -> dict[str, Any]:
        """See :meth:`ShardDataset.state_dict`."""
        state = self.dataset.state_dict()
        if self.dataset._consumed is None:
            state["consumed"] = [0] * max(1, self.num_workers)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """See :meth:`ShardDataset.load_state_dict`."""
        self.dataset.load_state_dict(state)
