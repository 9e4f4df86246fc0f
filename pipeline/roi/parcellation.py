"""Average a 4-D image within each atlas label: ROI time series.

:func:`signals_from_labels` is the pure core: it works on arrays and equals
nilearn's ``NiftiLabelsMasker(strategy="mean")`` (same labels, same
non-finite handling) while avoiding its per-volume ``scipy.ndimage.mean``
calls: labels are mapped once to column indices and each volume is reduced
with one :func:`numpy.bincount` over the labelled voxels only.

:func:`extract_timeseries` is the thin file wrapper the BOLD workflow calls;
it writes ``..._atlas-<name>_timeseries.tsv`` and its JSON sidecar.

Empty ROIs (no voxel left after resampling the atlas onto the image grid,
e.g. outside a partial field of view) get a series of zeros, as nilearn does
with ``keep_masked_labels``; they are listed in the sidecar under
``EmptyROIs`` and, being constant, also under ``ZeroVarianceROIs``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.roi.atlas import Atlas, load_labels_array, resample_labels
from pipeline.core.atomic import atomic_write_text
from pipeline.core.bids import load_bold_image
from pipeline.core.errors import InputError

__all__ = [
    "ParcellationResult",
    "extract_timeseries",
    "parcellate_img",
    "resample_labels",
    "signals_from_labels",
    "write_timeseries",
    "zero_variance_columns",
]


def signals_from_labels(
    data: np.ndarray, labels: np.ndarray, label_ids: np.ndarray | list[int] | tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Mean signal within each label, per volume.

    Parameters
    ----------
    data : ndarray
        ``(X, Y, Z, T)`` image data, or ``(X, Y, Z)`` for a single volume.
        Any numeric dtype; means are accumulated in float64. NaN and infinite
        values count as 0 (as nilearn's ``ensure_finite``).
    labels : ndarray
        ``(X, Y, Z)`` integer labels on the same grid; 0 and labels not in
        ``label_ids`` are ignored.
    label_ids : sequence of int
        Labels to extract, in output column order.

    Returns
    -------
    signals_TR : ndarray, float64, shape (T, R)
        Mean per volume and label; 0 for labels without voxels.
    counts_R : ndarray, int64, shape (R,)
        Number of voxels per label.
    """
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise ValueError(f"data must be 3-D or 4-D, got shape {data.shape}")
    if labels.shape != data.shape[:3]:
        raise ValueError(f"labels shape {labels.shape} does not match data grid {data.shape[:3]}")
    ids_R = np.asarray(label_ids, dtype=np.int64)
    n_rois, n_vols = ids_R.size, data.shape[3]

    # Flatten in the data's own memory order so each volume stays a view.
    order = "F" if data.flags.f_contiguous and not data.flags.c_contiguous else "C"
    labels_V = np.asarray(labels).ravel(order=order).astype(np.int64, copy=False)
    data_VT = data.reshape(-1, n_vols, order=order)

    # label id -> column + 1 (0 = not extracted), via a lookup table
    top = int(max(labels_V.max(initial=0), ids_R.max(initial=0))) + 1
    lut = np.zeros(top, dtype=np.int64)
    valid = ids_R >= 0
    lut[ids_R[valid]] = np.flatnonzero(valid) + 1
    col_V = lut[np.clip(labels_V, 0, None)]
    voxels = np.flatnonzero(col_V)
    cols = col_V[voxels] - 1
    counts_R = np.bincount(cols, minlength=n_rois)

    needs_finite = np.issubdtype(data.dtype, np.floating)
    signals_TR = np.empty((n_vols, n_rois), dtype=np.float64)
    for t in range(n_vols):
        values = data_VT[voxels, t].astype(np.float64, copy=False)
        if needs_finite:
            values = np.where(np.isfinite(values), values, 0.0)
        signals_TR[t] = np.bincount(cols, weights=values, minlength=n_rois)
    nonempty = counts_R > 0
    signals_TR[:, nonempty] /= counts_R[nonempty]
    signals_TR[:, ~nonempty] = 0.0
    return signals_TR, counts_R


def zero_variance_columns(signals_TR: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Boolean mask of columns that are constant over time.

    A column counts as constant when its standard deviation is below ``rtol``
    times its mean absolute value (plus a tiny absolute floor), so float
    round-off in an otherwise constant series does not hide it.
    """
    if signals_TR.shape[0] < 2:
        return np.ones(signals_TR.shape[1], dtype=bool)
    std_R = signals_TR.std(axis=0)
    scale_R = np.abs(signals_TR).mean(axis=0)
    return std_R <= rtol * scale_R + 1e-12


@dataclass(frozen=True)
class ParcellationResult:
    """ROI series of one run plus what the sidecar reports about them."""

    signals_TR: np.ndarray
    voxel_counts: tuple[int, ...]
    empty_rois: tuple[str, ...]
    zero_variance_rois: tuple[str, ...]


def parcellate_img(img, atlas: Atlas, labels_cache: dict | None = None) -> ParcellationResult:
    """ROI means of a loaded 4-D NIfTI image for an :class:`Atlas`.

    The atlas is resampled (nearest neighbour) onto the image grid when the
    grids differ, like ``NiftiLabelsMasker(resampling_target="data")``.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        4-D image (a 3-D image counts as one volume).
    atlas : Atlas
        The atlas.
    labels_cache : dict, optional
        Reused between calls to skip reloading the atlas file.
    """
    cache = labels_cache if labels_cache is not None else {}
    key = str(atlas.labels_img)
    if key not in cache:
        cache[key] = load_labels_array(atlas.labels_img)
    labels, labels_affine = cache[key]
    data = np.asanyarray(img.dataobj)
    if img.shape[:3] != labels.shape or not np.allclose(img.affine, labels_affine):
        labels = resample_labels(labels, labels_affine, img.affine, img.shape[:3])
    signals_TR, counts_R = signals_from_labels(data, labels, atlas.label_ids)
    names = atlas.roi_names
    empty = tuple(n for n, c in zip(names, counts_R) if c == 0)
    zero_var = tuple(n for n, z in zip(names, zero_variance_columns(signals_TR)) if z)
    return ParcellationResult(signals_TR, tuple(int(c) for c in counts_R), empty, zero_var)


def write_timeseries(out_tsv: str | Path, signals_TR: np.ndarray, roi_names: tuple[str, ...] | list[str], sidecar: dict) -> Path:
    """Write an ROI series TSV (header = ROI names) and its JSON sidecar, atomically.

    The sidecar is written first, so a reader that finds the TSV always
    finds its sidecar too.
    """
    out_tsv = Path(out_tsv)
    if not out_tsv.name.endswith(".tsv"):
        raise ValueError(f"{out_tsv}: ROI series must be written to a .tsv file")
    if signals_TR.ndim != 2 or signals_TR.shape[1] != len(roi_names):
        raise ValueError(f"{out_tsv}: {signals_TR.shape} series do not match {len(roi_names)} ROI names")
    for name in roi_names:
        if "\t" in name or "\n" in name:
            raise ValueError(f"{out_tsv}: ROI name {name!r} contains a tab or newline")
    lines = ["\t".join(roi_names)]
    lines += ["\t".join(f"{v:.9g}" for v in row) for row in signals_TR]
    atomic_write_text(out_tsv.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    atomic_write_text(out_tsv, "\n".join(lines) + "\n")
    return out_tsv


def extract_timeseries(bold_file: str, atlas: Atlas, out_tsv: Path, repetition_time: float, source: str = "preprocessed") -> Path:
    """Write the ROI series of one BOLD run and its JSON sidecar.

    Parameters
    ----------
    bold_file : str
        4-D BOLD NIfTI (normally the ``desc-preproc_bold`` in MNI space).
    atlas : Atlas
        Atlas to average within; resampled onto the BOLD grid when needed.
    out_tsv : Path
        Target ``..._atlas-<name>_timeseries.tsv``; the sidecar goes next to it
        with a ``.json`` extension.
    repetition_time : float
        Seconds per volume, copied to the sidecar.
    source : str
        ``"preprocessed"`` or ``"imported"``.

    Returns
    -------
    Path
        ``out_tsv``.

    Raises
    ------
    InputError
        When the BOLD file cannot be read or is not 4-D.
    """

    img = load_bold_image(bold_file)
    try:
        result = parcellate_img(img, atlas)
    except (OSError, EOFError, ValueError) as exc:
        raise InputError(bold_file, f"cannot read BOLD data ({exc})") from None
    sidecar = {
        "RepetitionTime": float(repetition_time),
        "AtlasName": atlas.name,
        "ROINames": list(atlas.roi_names),
        "NumberOfVolumes": int(result.signals_TR.shape[0]),
        "EmptyROIs": list(result.empty_rois),
        "ZeroVarianceROIs": list(result.zero_variance_rois),
        "ROIVoxelCounts": list(result.voxel_counts),
        "Source": source,
        "Sources": [str(bold_file)],
        "Strategy": "mean",
    }
    return write_timeseries(out_tsv, result.signals_TR, atlas.roi_names, sidecar)
