"""Image-quality metrics (IQMs) in the spirit of MRIQC, as pure numpy functions.

Structural IQMs follow the definitions of MRIQC [1]_ (which cites the
original papers below), computed on the N4-corrected head image in MNI space
with a three-class intensity segmentation inside the brain mask in place of
FSL FAST. BOLD IQMs read the confounds TSV written by the functional workflow
(BIDS columns ``framewise_displacement``, ``dvars``) and the preprocessed run.

References
----------
.. [1] Esteban O, et al. (2017). MRIQC: Advancing the automatic prediction of
   image quality in MRI from unseen sites. PLoS ONE 12(9):e0184661.
.. [2] Ganzetti M, Wenderoth N, Mantini D (2016). Intensity inhomogeneity
   correction of structural MR images: a data-driven approach to define input
   algorithm parameters. Front Neuroinform 10:10 (CJV).
.. [3] Atkinson D, et al. (1997). Automatic correction of motion artifacts in
   magnetic resonance images using an entropy focus criterion. IEEE TMI
   16(6):903-910 (EFC).
.. [4] Shehzad Z, et al. (2015). The Preprocessed Connectomes Project Quality
   Assessment Protocol. Front Neuroinform (FBER).
.. [5] Power JD, et al. (2012). Spurious but systematic correlations in
   functional connectivity MRI networks arise from subject motion.
   NeuroImage 59:2142-2154 (FD).
.. [6] Smith AM, et al. (1999). Investigation of low frequency drift in fMRI
   signal. NeuroImage 9:526-533 (DVARS/tSNR); Krueger G, Glover GH (2001).
   Physiological noise in oxygenation-sensitive MRI. MRM 46:631-637 (tSNR).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.core.errors import InputError

__all__ = [
    "TISSUE_ORDER",
    "bold_iqms",
    "cjv",
    "cnr",
    "confound_metrics",
    "efc",
    "fber",
    "head_mask",
    "inu_stats",
    "read_confounds",
    "snr",
    "structural_iqms",
    "tissue_segmentation",
    "tsnr_map",
    "wm2max",
]

# Tissue classes from darkest to brightest mean intensity, per contrast.
TISSUE_ORDER = {
    "T1w": ("csf", "gm", "wm"),
    "T2w": ("wm", "gm", "csf"),
    "FLAIR": ("csf", "wm", "gm"),
}


def tissue_segmentation(image: np.ndarray, mask: np.ndarray, modality: str, iterations: int = 30) -> dict[str, np.ndarray]:
    """Three-class k-means on intensities inside ``mask``.

    Returns boolean masks ``{"csf", "gm", "wm"}``. Classes are named from the
    intensity order of the contrast (:data:`TISSUE_ORDER`). One-dimensional
    k-means is enough here: the metrics only need the bulk of each tissue,
    not exact boundaries.
    """
    if modality not in TISSUE_ORDER:
        raise ValueError(f"no tissue order for modality {modality!r}; known {sorted(TISSUE_ORDER)}")
    m = mask.astype(bool) & np.isfinite(image)
    vals = image[m].astype(np.float64)
    if vals.size < 3:
        raise ValueError("brain mask has fewer than 3 voxels")
    centres = np.percentile(vals, [15, 50, 85])
    labels = np.zeros(vals.size, dtype=np.int8)
    for _ in range(iterations):
        labels = np.argmin(np.abs(vals[:, None] - centres[None, :]), axis=1).astype(np.int8)
        new = np.array([vals[labels == k].mean() if np.any(labels == k) else centres[k] for k in range(3)])
        if np.allclose(new, centres):
            break
        centres = new
    order = np.argsort(centres)
    out = {}
    for rank, name in enumerate(TISSUE_ORDER[modality]):
        tissue = np.zeros(image.shape, dtype=bool)
        tissue[m] = labels == order[rank]
        out[name] = tissue
    return out


def head_mask(image: np.ndarray) -> np.ndarray:
    """Head (foreground) mask: Otsu threshold, closing, hole filling, largest component."""
    vals = image[np.isfinite(image)]
    if vals.size == 0 or np.all(vals == vals.flat[0]):
        return np.zeros(image.shape, dtype=bool)
    hist, edges = np.histogram(vals, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    thr = centres[int(np.argmax(between))]
    fg = image > thr
    fg = ndimage.binary_closing(fg, iterations=2)
    fg = ndimage.binary_fill_holes(fg)
    lab, n = ndimage.label(fg)
    if n > 1:
        sizes = ndimage.sum(fg, lab, index=np.arange(1, n + 1))
        fg = lab == (1 + int(np.argmax(sizes)))
    return fg


def _stats(image: np.ndarray, where: np.ndarray) -> tuple[float, float, int]:
    v = image[where].astype(np.float64)
    if v.size < 2:
        return float("nan"), float("nan"), int(v.size)
    return float(v.mean()), float(v.std(ddof=1)), int(v.size)


def snr(image: np.ndarray, tissue: np.ndarray) -> float:
    """SNR of a tissue: mean / standard deviation inside it (MRIQC ``snr``, [1]_)."""
    mu, sd, _ = _stats(image, tissue)
    return float(mu / sd) if sd > 0 else float("nan")


def cnr(image: np.ndarray, wm: np.ndarray, gm: np.ndarray, air: np.ndarray) -> float:
    """Contrast-to-noise ratio ``|mu_WM - mu_GM| / sqrt(s_air^2 + s_WM^2 + s_GM^2)`` [1]_.

    When there is no usable air (zero-filled or out-of-field background), the
    air term is dropped, which is exact for noise-free backgrounds.
    """
    mu_wm, sd_wm, _ = _stats(image, wm)
    mu_gm, sd_gm, _ = _stats(image, gm)
    _, sd_air, n_air = _stats(image, air)
    noise = sd_wm**2 + sd_gm**2 + (sd_air**2 if n_air >= 100 and np.isfinite(sd_air) else 0.0)
    if not noise > 0:
        return float("nan")
    return float(abs(mu_wm - mu_gm) / np.sqrt(noise))


def cjv(image: np.ndarray, wm: np.ndarray, gm: np.ndarray) -> float:
    """Coefficient of joint variation ``(s_WM + s_GM) / |mu_WM - mu_GM|`` [2]_; lower is better."""
    mu_wm, sd_wm, _ = _stats(image, wm)
    mu_gm, sd_gm, _ = _stats(image, gm)
    diff = abs(mu_wm - mu_gm)
    return float((sd_wm + sd_gm) / diff) if diff > 0 else float("inf")


def efc(image: np.ndarray, frame: np.ndarray | None = None) -> float:
    """Entropy focus criterion [3]_, normalized to 0..1 as in MRIQC [1]_; higher = more ghosting/blurring.

    Parameters
    ----------
    image : ndarray
    frame : ndarray of bool, optional
        Voxels to ignore (zero padding outside the acquired field of view).
        Defaults to the exact-zero voxels.
    """
    if frame is None:
        frame = image == 0
    vals = np.abs(image[~frame & np.isfinite(image)].astype(np.float64))
    n = vals.size
    if n < 2:
        return float("nan")
    efc_max = n * (1.0 / np.sqrt(n)) * np.log(1.0 / np.sqrt(n))
    b_max = np.sqrt((vals**2).sum())
    if b_max == 0:
        return float("nan")
    return float((1.0 / efc_max) * np.sum((vals / b_max) * np.log((vals + 1e-16) / b_max)))


def fber(image: np.ndarray, head: np.ndarray, air: np.ndarray) -> float:
    """Foreground-background energy ratio: median |I|^2 in the head over median |I|^2 in air [4]_.

    NaN when the air is (nearly) empty or noise-free, where the ratio says
    nothing about quality (zero-filled backgrounds are common after
    defacing and resampling).
    """
    if air.sum() < 100 or head.sum() == 0:
        return float("nan")
    fg = float(np.median(np.abs(image[head]) ** 2))
    bg = float(np.median(np.abs(image[air]) ** 2))
    if bg < 1e-6 * max(fg, 1e-12):
        return float("nan")
    return fg / bg


def wm2max(image: np.ndarray, wm: np.ndarray) -> float:
    """Median WM intensity over the 99.95th percentile of the image (MRIQC ``wm2max``)."""
    top = float(np.percentile(image[np.isfinite(image)], 99.95))
    return float(np.median(image[wm]) / top) if top > 0 else float("nan")


def inu_stats(bias: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Median and 5-95 % range of the N4 bias field inside the brain (MRIQC ``inu_med``/``inu_range``)."""
    v = bias[mask.astype(bool) & np.isfinite(bias)].astype(np.float64)
    if v.size == 0:
        return {"inu_med": float("nan"), "inu_range": float("nan")}
    p5, p50, p95 = np.percentile(v, [5, 50, 95])
    # The field's scale is arbitrary; relative range makes sites comparable.
    rng = (p95 - p5) / p50 if p50 > 0 else float("nan")
    return {"inu_med": float(p50), "inu_range": float(rng)}


def structural_iqms(
    image: np.ndarray, brain: np.ndarray, modality: str, bias: np.ndarray | None = None
) -> dict[str, float]:
    """All structural IQMs of one N4-corrected head image.

    Parameters
    ----------
    image : ndarray
        Head image (not skull-stripped) in MNI space.
    brain : ndarray
        Brain mask on the same grid.
    modality : {"T1w", "T2w", "FLAIR"}
    bias : ndarray, optional
        N4 bias field on the same grid.
    """
    if image.shape != brain.shape:
        raise ValueError(f"shape mismatch: image {image.shape}, mask {brain.shape}")
    image = np.where(np.isfinite(image), image, 0).astype(np.float32)
    brain = brain.astype(bool)
    tissues = tissue_segmentation(image, brain, modality)
    # Erode WM/GM by one voxel so partial-volume edges do not inflate the spread.
    wm = ndimage.binary_erosion(tissues["wm"]) if tissues["wm"].sum() > 500 else tissues["wm"]
    gm = tissues["gm"]
    head = head_mask(image)
    # Air: outside a dilated head, and not zero padding from the field of view.
    air = ~ndimage.binary_dilation(head, iterations=3) & (image != 0)
    out = {
        "snr": snr(image, wm),
        "cnr": cnr(image, wm, gm, air),
        "cjv": cjv(image, wm, gm),
        "efc": efc(image),
        "fber": fber(image, head, air),
        "wm2max": wm2max(image, wm),
    }
    if bias is not None:
        out.update(inu_stats(bias, brain))
    return out


# ----------------------------------------------------------------------------- BOLD


def tsnr_map(bold_XYZT: np.ndarray) -> np.ndarray:
    """Voxelwise temporal SNR, mean over time / standard deviation over time [6]_ (0 where constant)."""
    if bold_XYZT.ndim != 4:
        raise ValueError(f"expected a 4-D series, got shape {bold_XYZT.shape}")
    mean = bold_XYZT.mean(axis=-1, dtype=np.float64)
    sd = bold_XYZT.std(axis=-1, dtype=np.float64)
    return np.divide(mean, sd, out=np.zeros_like(mean), where=sd > 0)


def read_confounds(path: str | Path) -> dict[str, np.ndarray]:
    """Read a BIDS confounds TSV (``n/a`` allowed) into float columns.

    Raises
    ------
    InputError
        When the file cannot be parsed or lacks ``framewise_displacement``.
    """
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path, sep="\t", na_values=["n/a"])
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read confounds TSV ({exc})") from None
    if "framewise_displacement" not in df.columns:
        raise InputError(path, "confounds TSV has no 'framewise_displacement' column")
    return {c: pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64) for c in df.columns}


def confound_metrics(confounds: dict[str, np.ndarray], fd_threshold: float = 0.2) -> dict[str, float]:
    """FD mean / max / % of volumes above ``fd_threshold`` mm [5]_ and mean DVARS.

    The first volume's FD is undefined (``n/a``) and ignored.
    """
    fd = confounds["framewise_displacement"]
    fd = fd[np.isfinite(fd)]
    out = {
        "fd_mean": float(fd.mean()) if fd.size else float("nan"),
        "fd_max": float(fd.max()) if fd.size else float("nan"),
        "fd_perc": float(100.0 * np.mean(fd > fd_threshold)) if fd.size else float("nan"),
    }
    dv = confounds.get("dvars")
    dv = dv[np.isfinite(dv)] if dv is not None else np.array([])
    out["dvars_mean"] = float(dv.mean()) if dv.size else float("nan")
    return out


def bold_iqms(bold_XYZT: np.ndarray, mask: np.ndarray, confounds: dict[str, np.ndarray]) -> dict[str, float]:
    """tSNR (median in the brain), motion and DVARS summaries and the volume count of one run."""
    if bold_XYZT.shape[:3] != mask.shape:
        raise ValueError(f"shape mismatch: BOLD {bold_XYZT.shape[:3]}, mask {mask.shape}")
    # Only brain voxels: the full 4-D grid in float64 would be gigabytes.
    vox_VT = bold_XYZT[mask.astype(bool)]
    mean = vox_VT.mean(axis=1, dtype=np.float64)
    sd = vox_VT.std(axis=1, dtype=np.float64)
    tsnr = np.divide(mean, sd, out=np.zeros_like(mean), where=sd > 0)
    out = {"tsnr": float(np.median(tsnr)) if tsnr.size else float("nan"), "n_volumes": float(bold_XYZT.shape[-1])}
    out.update(confound_metrics(confounds))
    return out
