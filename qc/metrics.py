"""Similarity of a scan in MNI space to the matching MNI152 template.

Pure numpy functions. All metrics are computed inside the template brain
mask, so the skull, neck and field of view do not dominate them.

References
----------
.. [1] Studholme C, Hill DLG, Hawkes DJ (1999). An overlap invariant entropy
   measure of 3D medical image alignment. Pattern Recognition 32:71-86.
.. [2] Pluim JPW, Maintz JBA, Viergever MA (2003). Mutual-information-based
   registration of medical images: a survey. IEEE TMI 22:986-1004.
.. [3] Hore A, Ziou D (2010). Image quality metrics: PSNR vs. SSIM. ICPR.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ARTIFACT_METRICS",
    "air_signal",
    "artifact_metrics",
    "blur_ap_lr",
    "brain_coverage",
    "brain_holes",
    "edge_correlation",
    "mutual_information",
    "pearson_correlation",
    "psnr",
    "robust_normalize",
    "signal_void",
    "template_similarity",
    "template_tissues",
    "tissue_contrast",
    "wm_trend",
]


def _masked_pair(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape or a.shape != mask.shape:
        raise ValueError(f"shape mismatch: image {a.shape}, template {b.shape}, mask {mask.shape}")
    m = mask.astype(bool) & np.isfinite(a) & np.isfinite(b)
    if m.sum() < 2:
        raise ValueError("mask has fewer than 2 finite voxels")
    return a[m].astype(np.float64), b[m].astype(np.float64)


def robust_normalize(values: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map the ``low``..``high`` percentiles of ``values`` to 0..1 and clip.

    Percentiles instead of min/max make PSNR insensitive to a few hot voxels
    and to the arbitrary scaling of each scanner's intensities.
    """
    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        return np.zeros_like(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def mutual_information(a: np.ndarray, b: np.ndarray, mask: np.ndarray, bins: int = 64) -> tuple[float, float]:
    """Mutual information and normalized mutual information inside ``mask``.

    Intensities are robustly normalized and binned into a ``bins`` x ``bins``
    joint histogram. MI is ``H(A) + H(B) - H(A,B)`` in nats [2]_; NMI is
    Studholme's ``(H(A) + H(B)) / H(A,B)`` [1]_, from 1 (independent) to 2
    (identical up to a one-to-one intensity mapping).

    Returns
    -------
    (mi, nmi) : tuple of float
    """
    x, y = _masked_pair(a, b, mask)
    x = robust_normalize(x)
    y = robust_normalize(y)
    joint, _, _ = np.histogram2d(x, y, bins=bins, range=[[0, 1], [0, 1]])
    p_xy = joint / joint.sum()
    p_x = p_xy.sum(axis=1)
    p_y = p_xy.sum(axis=0)

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    h_x, h_y, h_xy = entropy(p_x), entropy(p_y), entropy(p_xy.ravel())
    mi = h_x + h_y - h_xy
    nmi = (h_x + h_y) / h_xy if h_xy > 0 else float("nan")
    return float(mi), float(nmi)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of ``a`` against reference ``b`` [3]_.

    Both are robustly normalized to 0..1 inside ``mask`` first, so the peak is
    1 and ``PSNR = -10 log10(MSE)``. Identical images give ``inf``.
    """
    x, y = _masked_pair(a, b, mask)
    mse = float(np.mean((robust_normalize(x) - robust_normalize(y)) ** 2))
    if mse == 0:
        return float("inf")
    return float(-10.0 * np.log10(mse))


def pearson_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of intensities inside ``mask`` (NaN if one is constant)."""
    x, y = _masked_pair(a, b, mask)
    x = x - x.mean()
    y = y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    if denom == 0:
        return float("nan")
    return float((x * y).sum() / denom)


def brain_coverage(image: np.ndarray, mask: np.ndarray, fraction: float = 0.1) -> float:
    """Fraction of the template brain mask where the scan has signal.

    A voxel has signal when it exceeds ``fraction`` of the 95th percentile
    inside the mask. Cropped tissue, a field of view that misses the brain
    and signal-dropout slabs leave zeros inside the template brain.
    """
    if image.shape != mask.shape:
        raise ValueError(f"shape mismatch: image {image.shape}, mask {mask.shape}")
    vals = image[mask.astype(bool)].astype(np.float64)
    vals = np.where(np.isfinite(vals), vals, 0.0)
    if vals.size == 0:
        raise ValueError("empty mask")
    ref = np.percentile(vals, 95)
    if ref <= 0:
        return 0.0
    return float(np.mean(vals > fraction * ref))


def edge_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of the gradient magnitudes of ``a`` and ``b`` inside ``mask``.

    Edges sit at tissue boundaries whatever the contrast, so unlike the
    intensity correlation this does not assume that the scan and the template
    share a contrast: a FLAIR (dark CSF) and the T2 template (bright CSF)
    have the same edges. Both images are robustly normalised inside the mask
    first. A misregistered, flipped, blurred or noisy scan has edges that no
    longer line up with the template's.
    """
    if a.shape != b.shape or a.shape != mask.shape:
        raise ValueError(f"shape mismatch: image {a.shape}, template {b.shape}, mask {mask.shape}")
    m = mask.astype(bool)
    grads = []
    for img in (a, b):
        img = np.where(np.isfinite(img), img, 0.0).astype(np.float64)
        vals = img[m]
        lo, hi = np.percentile(vals, [1, 99]) if vals.size else (0.0, 0.0)
        img = np.clip((img - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(img)
        grads.append(np.sqrt(sum(g * g for g in np.gradient(img))))
    return pearson_correlation(grads[0], grads[1], mask)


def template_tissues(template_t1: np.ndarray, mask: np.ndarray, iterations: int = 30) -> dict[str, np.ndarray]:
    """Regions of the T1 template: core CSF, GM and WM, and the air far from the head.

    ``csf``/``gm``/``wm`` come from a 3-class k-means in the brain mask,
    eroded once. ``air`` is every voxel at least 8 mm (4 voxels of the 2 mm
    grid) outside the template's head and above the lowest brain slice, so
    that a neck or shoulders in the field of view never count as air.
    They are the same voxels for every scan in MNI space, so the contrast
    between them can be read from a scan without segmenting it.
    """
    from scipy import ndimage

    from qc.iqms import tissue_segmentation  # the same 3-class intensity k-means as the scans' own IQMs

    regions = tissue_segmentation(template_t1, mask, "T1w", iterations)
    out = {name: ndimage.binary_erosion(region) for name, region in regions.items()}
    mask = mask.astype(bool)
    head = template_t1 > 0.1 * float(np.median(template_t1[mask]))
    head = ndimage.binary_fill_holes(ndimage.binary_closing(head, iterations=3))
    air = ~ndimage.binary_dilation(head, iterations=4)
    air[:, :, : int(np.nonzero(mask.any(axis=(0, 1)))[0].min())] = False
    out["air"] = air
    return out


#: The artifact detectors of :func:`artifact_metrics` (scale-free and the same for every contrast).
ARTIFACT_METRICS = ("blur_ap_lr", "air_signal", "brain_holes", "signal_void", "wm_trend")


def _axis_gradients(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean absolute finite difference along each voxel axis, inside ``mask``."""
    out = []
    for axis in range(3):
        diff = np.abs(np.diff(image, axis=axis))
        inner = [slice(None)] * 3
        inner[axis] = slice(0, -1)
        out.append(float(diff[mask[tuple(inner)]].mean()))
    return np.asarray(out)


def blur_ap_lr(image: np.ndarray, template: np.ndarray, mask: np.ndarray) -> float:
    """Directional blur: log of the anterior-posterior to left-right sharpness ratio, relative to the template.

    Sharpness along an axis is the mean absolute finite difference along it
    in the brain mask (grid axes of MNI space: 0 = L-R, 1 = P-A). 0 means the
    same balance as the template; negative = blurred along A-P (motion along
    the usual phase-encoding direction), positive = blurred along L-R. S-I is
    left out, so that the thick slices of an axial acquisition (5 mm in the
    corpus) do not look like motion; thick sagittal slices (L-R) would.
    """
    mask = mask.astype(bool)
    img = np.where(np.isfinite(image), image, 0.0)
    g, t = _axis_gradients(img, mask), _axis_gradients(template, mask)
    if not (g[:2] > 0).all() or not (t[:2] > 0).all():
        return float("nan")
    return float(np.log(g[1] / g[0]) - np.log(t[1] / t[0]))


def air_signal(image: np.ndarray, air: np.ndarray, brain: np.ndarray) -> float:
    """95th percentile of the signal far outside the head, relative to the brain's median.

    Ghosts, wrap-around and noise put signal where there is only air; a
    zero-filled or defaced background gives 0.
    """
    img = np.where(np.isfinite(image), image, 0.0)
    med = float(np.median(img[brain.astype(bool)]))
    if not med > 0 or not air.any():
        return float("nan")
    return float(np.percentile(img[air.astype(bool)], 95)) / med


def brain_holes(image: np.ndarray, mask: np.ndarray, level: float = 0.1) -> float:
    """Fraction of the template brain whose signal is below ``level`` times the brain's median.

    Signal dropout, tissue loss and a cut field of view leave voids in the brain.
    """
    mask = mask.astype(bool)
    img = np.where(np.isfinite(image), image, 0.0)[mask]
    med = float(np.median(img))
    if not med > 0:
        return float("nan")
    return float((img < level * med).mean())


def signal_void(
    image: np.ndarray, mask: np.ndarray, level: float = 0.1, min_width_mm: float = 12.0, voxel_mm: float = 2.0
) -> float:
    """Fraction of the template brain inside signal voids at least ``min_width_mm`` across.

    Voxels of the template brain below ``level`` times the brain's median,
    opened with a ball of diameter ``min_width_mm``: what survives is a void
    that a 12 mm ball fits into (tissue loss, a dropout slab, a field of view
    that cuts the brain). Unlike :func:`brain_holes`, this ignores thin dark
    structures: sulci and ventricles, which are dark on T1w and FLAIR and
    widen with age and atrophy, are narrower than the ball. On every clean
    real scan of ``../shared/data`` (39 scans, 9 sources, aged 19-96,
    a glioma, lesions, 5.5 mm stacks) it is exactly 0 (benchmarks/README.md,
    issue 16).

    Parameters
    ----------
    image : ndarray
        The scan on the template grid.
    mask : ndarray
        The template brain mask.
    level : float
        Void level, relative to the median signal in the brain.
    min_width_mm : float
        Smallest width of a void that counts.
    voxel_mm : float
        Voxel size of the grid (isotropic).
    """
    from scipy import ndimage

    mask = mask.astype(bool)
    img = np.where(np.isfinite(image), image, 0.0)
    med = float(np.median(img[mask])) if mask.any() else 0.0
    if not med > 0:
        return float("nan")
    r = max(int(round(min_width_mm / 2.0 / voxel_mm)), 1)
    grid = np.indices((2 * r + 1,) * 3) - r
    ball = (grid**2).sum(axis=0) <= r * r
    void = ndimage.binary_opening((img < level * med) & mask, structure=ball)
    return float(void.sum() / mask.sum())


def wm_trend(image: np.ndarray, wm: np.ndarray) -> float:
    """Residual intensity non-uniformity: relative range of a linear trend fitted to the WM signal.

    A least-squares plane ``a + b.x`` through the intensities of the template
    WM region; its range over that region divided by the median WM signal.
    N4 removes smooth fields; what it leaves (or never saw) shows here.
    """
    wm = wm.astype(bool)
    img = np.where(np.isfinite(image), image, 0.0)
    vals = img[wm].astype(np.float64)
    med = float(np.median(vals))
    if not med > 0 or vals.size < 10:
        return float("nan")
    xyz = np.argwhere(wm).astype(np.float64)
    design = np.column_stack([np.ones(len(xyz)), xyz - xyz.mean(axis=0)])
    coef, *_ = np.linalg.lstsq(design, vals, rcond=None)
    fitted = design @ coef
    return float((fitted.max() - fitted.min()) / med)


def artifact_metrics(
    image: np.ndarray, template: np.ndarray, mask: np.ndarray, tissues: dict[str, np.ndarray]
) -> dict[str, float]:
    """The scale-free artifact detectors (:data:`ARTIFACT_METRICS`) of one scan in MNI space.

    Parameters
    ----------
    image : ndarray
        The scan on the template grid.
    template : ndarray
        The matching template (its sharpness balance is the reference of ``blur_ap_lr``).
    mask : ndarray
        The template brain mask.
    tissues : dict
        :func:`template_tissues` regions (``wm`` and ``air`` are used).
    """
    return {
        "blur_ap_lr": blur_ap_lr(image, template, mask),
        "air_signal": air_signal(image, tissues["air"], mask),
        "brain_holes": brain_holes(image, mask),
        "signal_void": signal_void(image, mask),
        "wm_trend": wm_trend(image, tissues["wm"]),
    }


def tissue_contrast(image: np.ndarray, tissues: dict[str, np.ndarray]) -> dict[str, float]:
    """Median WM/GM and CSF/GM intensity ratios in the template's tissue regions.

    The signs of ``log`` of these ratios identify the contrast: T1w has
    WM > GM > CSF, T2w CSF > GM > WM, FLAIR GM > WM and dark CSF. A scan whose
    ratios contradict its label is the wrong modality (or is not a head in
    the right orientation). NaN when GM has no signal.
    """
    img = np.where(np.isfinite(image), image, 0.0)
    med = {k: float(np.median(img[tissues[k]])) if tissues[k].any() else float("nan") for k in ("csf", "gm", "wm")}
    gm = med["gm"]
    if not gm > 0:
        return {"wm_gm_ratio": float("nan"), "csf_gm_ratio": float("nan")}
    return {"wm_gm_ratio": med["wm"] / gm, "csf_gm_ratio": med["csf"] / gm}


def template_similarity(image: np.ndarray, template: np.ndarray, mask: np.ndarray, bins: int = 64) -> dict[str, float]:
    """Every template-similarity metric of one scan, as a flat dict.

    Parameters
    ----------
    image : ndarray
        The scan in MNI space (same grid as ``template``).
    template : ndarray
        The matching template (T1 for T1w, T2 for T2w/FLAIR).
    mask : ndarray
        The template brain mask.
    bins : int
        Joint-histogram bins for MI.
    """
    mi, nmi = mutual_information(image, template, mask, bins=bins)
    return {
        "mi": mi,
        "nmi": nmi,
        "psnr": psnr(image, template, mask),
        "correlation": pearson_correlation(image, template, mask),
        "edge_correlation": edge_correlation(image, template, mask),
        "brain_coverage": brain_coverage(image, mask),
    }
