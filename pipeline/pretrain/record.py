"""What a pretraining run was trained on, recorded in its ``RUN_DIR`` and checked by evaluation.

``neurocurate pretrain`` writes two files (paths owned by :class:`pipeline.core.layout.RunLayout`):

``training_data.json``
    The shards folder, store, split and kind; the ROI set (atlas, number of ROIs, a digest of the ordered ROI
    names); the tasks of the training split (the ``state_experts`` router's states); a digest of the index; and the
    gradient coordinates' shape, source path and digest.
``training_gradients.npy``
    A copy of the ``[R, k]`` gradient coordinates that positioned the ROIs during training (fMRI stores that
    have gradients), so that evaluation positions the ROIs exactly as pretraining did, wherever the shards went.

The gradients' digest is the SHA-256 of the ``.npy`` bytes of the float32 array (:func:`gradients_digest`),
which is also :func:`pipeline.core.provenance.file_digest` of ``training_gradients.npy``: the same number
identifies the coordinates in the run, in another store, or in a reference shards folder.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import atomic_write_bytes, atomic_write_text
from pipeline.core.errors import InputError
from pipeline.core.layout import RunLayout, ShardsLayout, store_gradients
from pipeline.core.provenance import file_digest

__all__ = ["TrainingData", "gradients_digest", "load_training_gradients", "read_training_data", "roi_names_digest",
           "training_data_of", "write_training_data"]

_VERSION = 1


def roi_names_digest(names: list[str]) -> str:
    """SHA-256 of the ordered ROI names (one per line)."""
    return hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()


def _npy_bytes(gradients_Rk: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(gradients_Rk, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def gradients_digest(gradients_Rk: np.ndarray) -> str:
    """SHA-256 of the ``.npy`` bytes of the float32 coordinates (= ``file_digest`` of the run's copy)."""
    return hashlib.sha256(_npy_bytes(gradients_Rk)).hexdigest()


@dataclass(frozen=True)
class TrainingData:
    """The content identity of a run's training data (``RUN_DIR/training_data.json``)."""

    shards_dir: str
    store: str
    kind: str
    split: str
    atlas: str
    n_rois: int
    roi_names_sha256: str
    index_sha256: str
    n_samples: int
    tasks: list[str] = field(default_factory=list)
    gradients_source: str | None = None
    gradients_shape: list[int] | None = None
    gradients_sha256: str | None = None
    version: int = _VERSION

    def describe(self) -> str:
        """``200 ROIs of atlas CC200`` / ``anat volumes``: the ROI set in words."""
        if self.kind != "fmri":
            return f"{self.kind} volumes"
        return f"{self.n_rois} ROIs of atlas {self.atlas or '?'}"

    def roi_set_mismatch(self, kind: str, atlas: str, roi_names: list[str]) -> str | None:
        """Why a store with this kind, atlas and ordered ROI names is not the ROI set the run was trained on."""
        if kind != self.kind:
            return f"holds {kind} data but the run was trained on {self.kind} data"
        if kind != "fmri":
            return None
        if len(roi_names) != self.n_rois or (atlas or "") != (self.atlas or ""):
            return f"has {len(roi_names)} ROIs of atlas {atlas or '?'} but the run was trained on {self.describe()}"
        if roi_names_digest(roi_names) != self.roi_names_sha256:
            return f"has the run's {self.n_rois} ROIs of atlas {atlas or '?'} under other names or in another order"
        return None

    def identity(self) -> dict[str, Any]:
        """What must not change when a run resumes: store, split, ROI set, gradients and tasks."""
        return {k: v for k, v in asdict(self).items() if k not in ("shards_dir", "index_sha256", "n_samples",
                                                                     "gradients_source", "version")}


def training_data_of(shards_dir: str | Path, dataset, split: str) -> tuple[TrainingData, np.ndarray | None]:
    """The record of training on ``dataset`` (a :class:`pipeline.store.loader.ShardDataset`), and its gradients."""
    shards_dir = Path(shards_dir).resolve()
    grads = dataset.gradients_Rk.numpy() if getattr(dataset, "gradients_Rk", None) is not None else None
    tasks = sorted({str(t) for t in dataset.index["task"].dropna() if str(t)}) if "task" in dataset.index else []
    names = list(dataset.roi_names) if dataset.kind == "fmri" else []
    record = TrainingData(
        shards_dir=str(shards_dir), store=str(dataset.store), kind=str(dataset.kind), split=str(split),
        atlas=str(dataset.atlas) if dataset.kind == "fmri" else "", n_rois=len(names),
        roi_names_sha256=roi_names_digest(names), index_sha256=file_digest(ShardsLayout(shards_dir).index),
        n_samples=int(len(dataset.index)), tasks=tasks,
        gradients_source=str(store_gradients(ShardsLayout(shards_dir).store_dir(dataset.store))) if grads is not None else None,
        gradients_shape=list(grads.shape) if grads is not None else None,
        gradients_sha256=gradients_digest(grads) if grads is not None else None,
    )
    return record, grads


def write_training_data(run_dir: str | Path, record: TrainingData, gradients_Rk: np.ndarray | None) -> None:
    """Write ``training_gradients.npy`` (or remove a stale one), then ``training_data.json``; each atomically."""
    run = RunLayout(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    if gradients_Rk is not None:
        atomic_write_bytes(run.training_gradients, _npy_bytes(gradients_Rk))
    else:
        run.training_gradients.unlink(missing_ok=True)
    atomic_write_text(run.training_data, json.dumps(asdict(record), indent=2) + "\n")


def read_training_data(run_dir: str | Path) -> TrainingData | None:
    """The run's record; ``None`` for a run that has none (trained before runs recorded their data)."""
    path = RunLayout(run_dir).training_data
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable training record ({type(exc).__name__}); rerun 'neurocurate pretrain'") from None
    try:
        return TrainingData(**data)
    except TypeError as exc:
        raise InputError(path, f"not a training record of this version ({exc})") from None


def load_training_gradients(run_dir: str | Path, record: TrainingData) -> np.ndarray | None:
    """The gradient coordinates the run was trained with, checked against the record's digest."""
    if record.gradients_sha256 is None:
        return None
    path = RunLayout(run_dir).training_gradients
    if not path.is_file():
        raise InputError(path, "missing: the run's training gradients are gone; pass --reference-shards (the shards it was trained on)")
    if file_digest(path) != record.gradients_sha256:
        raise InputError(path, f"does not match the digest in {RunLayout(run_dir).training_data.name}; the file was changed")
    return np.load(path, allow_pickle=False)
