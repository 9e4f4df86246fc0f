"""BOLD image operations: validation, reference, motion, registration, resampling.

Functions take and return file paths (the nipype interfaces in
``workflows.interfaces.bold`` are thin wrappers around them). Motion
correction is a numpy/scipy Gauss-Newton rigid fit (:func:`realign_volumes`;
antspyx on request); registration and resampling use antspyx. Transforms are
ANTs ``.mat`` files (the motion fits written by :func:`write_rigid_transform`) so the whole
chain (volume -> reference -> T1w or EPI template -> MNI) is applied in one
``ants.apply_transforms`` call per volume: the BOLD data are interpolated
once.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.bids import load_bold_image
from pipeline.core.errors import InputError, NeurocurateError
from workflows.ops.confounds import leading_outliers, rigid_parameters
from workflows.ops.seeding import ants_seed
from workflows.ops.transforms import itk_linear_ras

__all__ = [
    "EPI_TEMPLATE_NAMES",
    "BoldValidation",
    "ants_seed",
    "bold_reference",
    "confounds_table",
    "detect_nonsteady",
    "drop_volumes",
    "find_epi_template",
    "global_signal",
    "identity_transforms",
    "kmeans_1d",
    "motion_correct",
    "realign_volumes",
    "register_reference",
    "resample_bold",
    "resample_image",
    "rigid_matrix",
    "tissue_masks",
    "transform_parameters",
    "validate_bold",
    "write_json",
    "write_rigid_transform",
]

LOG = logging.getLogger(__name__)

EPI_TEMPLATE_NAMES = (
    "SPM_OldNorm_EPI_2mm.nii.gz",
    "MNI152NLin6Asym_res-2_desc-EPI_boldref.nii.gz",
    "tpl-MNI152NLin6Asym/tpl-MNI152NLin6Asym_res-02_desc-EPI_boldref.nii.gz",
    "tpl-MNI152NLin6Asym_res-02_desc-EPI_boldref.nii.gz",
)


@dataclass(frozen=True)
class BoldValidation:
    """What validation found out about a BOLD run."""

    n_volumes: int
    repetition_time: float
    header_tr: float
    shape: tuple[int, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)


def _header_tr_seconds(header) -> float:
    zooms = header.get_zooms()
    if len(zooms) < 4:
        return 0.0
    tr = float(zooms[3])
    unit = header.get_xyzt_units()[1]
    if unit == "msec":
        tr /= 1000.0
    elif unit == "usec":
        tr /= 1e6
    return tr


def validate_bold(bold_file: str | Path, sidecar_tr: float | None, min_volumes: int = 5, tr_tolerance: float = 0.01) -> BoldValidation:
    """Check a BOLD run and settle its repetition time.

    The sidecar's ``RepetitionTime`` wins over the NIfTI header (converters
    get the header wrong more often); a disagreement beyond ``tr_tolerance``
    seconds is reported in ``warnings``.

    Raises
    ------
    InputError
        When the file cannot be read, is not 4-D, has fewer than
        ``min_volumes`` volumes, or no usable TR is found anywhere.
    """

    bold_file = Path(bold_file)
    img = load_bold_image(bold_file)
    n_vols = int(img.shape[3])
    if n_vols < min_volumes:
        raise InputError(bold_file, f"BOLD run has {n_vols} volumes, fewer than the {min_volumes} required")
    header_tr = _header_tr_seconds(img.header)
    warnings: list[str] = []
    if sidecar_tr is not None and not (math.isfinite(sidecar_tr) and sidecar_tr > 0):
        raise InputError(bold_file, f"sidecar RepetitionTime {sidecar_tr!r} is not a positive number")
    if sidecar_tr is None:
        if not header_tr > 0:
            raise InputError(bold_file, "no RepetitionTime in the sidecar and none in the NIfTI header")
        tr = header_tr
        warnings.append(f"no RepetitionTime in the sidecar; using the NIfTI header's {header_tr:g} s")
    else:
        tr = float(sidecar_tr)
        if header_tr > 0 and abs(header_tr - tr) > tr_tolerance:
            warnings.append(
                f"NIfTI header TR {header_tr:g} s disagrees with sidecar RepetitionTime {tr:g} s; using the sidecar"
            )
    return BoldValidation(n_vols, tr, header_tr, tuple(int(s) for s in img.shape), tuple(warnings))


def global_signal(bold_file: str | Path, n_volumes: int | None = None) -> np.ndarray:
    """Mean over all voxels of each of the first ``n_volumes`` volumes."""
    import nibabel as nib

    img = nib.load(str(bold_file))
    stop = img.shape[3] if n_volumes is None else min(n_volumes, img.shape[3])
    data = np.asanyarray(img.dataobj[..., :stop], dtype=np.float64)
    return data.reshape(-1, stop).mean(axis=0)


def drop_volumes(bold_file: str | Path, n_drop: int, out_file: str | Path) -> Path:
    """Write the run without its first ``n_drop`` volumes as float32."""
    import nibabel as nib

    img = nib.load(str(bold_file))
    data = np.asarray(img.dataobj[..., n_drop:], dtype=np.float32)
    hdr = img.header.copy()
    hdr.set_data_dtype(np.float32)
    out = nib.Nifti1Image(data, img.affine, hdr)
    out.set_qform(*img.get_qform(coded=True))
    out.set_sform(*img.get_sform(coded=True))
    nib.save(out, str(out_file))
    return Path(out_file)


def detect_nonsteady(bold_file: str | Path, threshold: float, max_volumes: int) -> int:
    """Leading non-steady-state volumes, from the global signal's outliers."""
    return min(leading_outliers(global_signal(bold_file, 50), threshold=threshold, window=50), max_volumes)


def bold_reference(bold_file: str | Path, n_volumes: int, out_ref: str | Path, out_mask: str | Path) -> tuple[Path, Path]:
    """Median of the first ``n_volumes`` volumes and a brain mask of it.

    The mask is ANTs' ``get_mask`` (threshold at the mean, morphological
    clean-up), which on EPI keeps the brain and drops the dark background.
    """
    import ants

    img = ants.image_read(str(bold_file))
    vols = ants.ndimage_to_list(img)
    stack = np.stack([v.numpy() for v in vols[: max(1, n_volumes)]])
    ref = ants.from_numpy(np.median(stack, axis=0).astype(np.float32), origin=vols[0].origin,
                          spacing=vols[0].spacing, direction=vols[0].direction)
    mask = ants.get_mask(ref, cleanup=2)
    if float(mask.sum()) == 0:
        raise InputError(bold_file, "no brain found in the BOLD reference (all volumes dark?)")
    ants.image_write(ref, str(out_ref))
    ants.image_write(mask, str(out_mask))
    return Path(out_ref), Path(out_mask)


def transform_parameters(xfm_file: str | Path) -> np.ndarray:
    """Rigid parameters (RAS mm, radians) of an ANTs linear ``.mat`` transform.

    ANTs stores ``y = A (x - c) + t + c`` in LPS; the returned translation is
    that of the equivalent ``y = A x + b`` (rotation about the scanner
    origin), converted to RAS.
    """
    m = itk_linear_ras(xfm_file)
    return rigid_parameters(m[:3, :3], m[:3, 3])


def rigid_matrix(params_6: np.ndarray, centre_3: np.ndarray | None = None) -> np.ndarray:
    """4x4 matrix of a rigid transform ``y = R (x - c) + c + t``.

    ``params_6`` is ``trans_x .. rot_z`` (mm, radians) with
    ``R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x)`` (the convention of
    :func:`workflows.ops.confounds.rigid_parameters`); ``centre_3`` defaults
    to the origin.
    """
    tx, ty, tz, rx, ry, rz = (float(v) for v in params_6)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot = (np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
           @ np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
           @ np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]]))
    centre = np.zeros(3) if centre_3 is None else np.asarray(centre_3, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = np.array([tx, ty, tz]) + centre - rot @ centre
    return out


def realign_volumes(
    ref_XYZ: np.ndarray,
    vols_XYZT: np.ndarray,
    mask_XYZ: np.ndarray,
    affine_44: np.ndarray,
    *,
    iterations: tuple[int, ...] = (20, 4),
    sample_steps: tuple[int, ...] = (3, 1),
    smoothing_sigmas: tuple[float, ...] = (1.5, 0.0),
    tolerance_mm: float = 1e-4,
) -> np.ndarray:
    """Rigid fit of every volume to a reference: inverse-compositional Gauss-Newton.

    Least squares of intensities (each volume scaled to the reference's mean
    in the mask) at the mask's voxels, coarse to fine: level ``k`` smooths
    both images with a Gaussian of ``smoothing_sigmas[k]`` voxels, samples
    every ``sample_steps[k]``-th voxel along each axis and runs at most
    ``iterations[k]`` Gauss-Newton steps (trilinear interpolation on smoothed
    levels, cubic B-spline on unsmoothed ones). The Jacobian comes from the
    reference's gradient, so it is computed once per level and each step
    costs one interpolation of the volume (the SPM / MCFLIRT-class scheme;
    no random sampling, so the result is deterministic). Each volume starts
    from the previous one's fit.

    Parameters
    ----------
    ref_XYZ, mask_XYZ : ndarray
        Reference volume and the mask of the voxels to match.
    vols_XYZT : ndarray
        The run, on the reference's grid.
    affine_44 : ndarray
        Voxel to world (mm) affine of that grid.

    Returns
    -------
    mats_T44 : ndarray, shape (T, 4, 4)
        World-space matrices mapping reference points to volume points
        (``vol(M x) ~ ref(x)``).
    """
    from scipy import ndimage

    if not (len(iterations) == len(sample_steps) == len(smoothing_sigmas)):
        raise ValueError("iterations, sample_steps and smoothing_sigmas need one entry per level")
    ref = np.asarray(ref_XYZ, dtype=np.float64)
    mask = np.asarray(mask_XYZ) > 0
    if vols_XYZT.ndim != 4 or vols_XYZT.shape[:3] != ref.shape or mask.shape != ref.shape:
        raise ValueError(f"grids differ: reference {ref.shape}, mask {mask.shape}, run {vols_XYZT.shape}")
    if not mask.any():
        raise ValueError("the realignment mask is empty")
    # Work inside the mask's bounding box (plus a margin): half the voxels of a typical EPI.
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - 3, 0)
    hi = np.minimum(idx.max(axis=0) + 4, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    shift = np.eye(4)
    shift[:3, 3] = lo
    aff = np.asarray(affine_44, dtype=np.float64) @ shift
    inv = np.linalg.inv(aff)
    ref_b, mask_b = ref[box], mask[box]
    centre = (aff @ np.r_[np.argwhere(mask_b).mean(axis=0), 1.0])[:3]
    grad_to_world = np.linalg.inv(aff[:3, :3]).T
    ref_mean = float(ref_b[mask_b].mean())
    levels = []
    for n_iter, step, sigma in zip(iterations, sample_steps, smoothing_sigmas):
        smooth = ndimage.gaussian_filter(ref_b, sigma) if sigma > 0 else ref_b
        grid = np.zeros_like(mask_b)
        grid[::step, ::step, ::step] = True
        pts = np.argwhere(mask_b & grid)
        homog = np.c_[pts, np.ones(len(pts))].T
        x = (aff @ homog)[:3].T
        g = np.stack(np.gradient(smooth), axis=-1)[tuple(pts.T)] @ grad_to_world
        jac = np.c_[g, np.cross(x - centre, g)]
        solve = np.linalg.solve(jac.T @ jac, jac.T)
        order = 1 if sigma >= 1.0 else 3
        levels.append((int(n_iter), float(sigma), order, aff @ homog, smooth[tuple(pts.T)], solve))
    n_vols = vols_XYZT.shape[3]
    mats = np.zeros((n_vols, 4, 4))
    current = np.eye(4)
    for t in range(n_vols):
        vol = np.asarray(vols_XYZT[box + (t,)], dtype=np.float64)
        vol_mean = float(vol[mask_b].mean())
        if vol_mean != 0:
            vol = vol * (ref_mean / vol_mean)
        for n_iter, sigma, order, world, target, solve in levels:
            img = ndimage.gaussian_filter(vol, sigma) if sigma > 0 else vol
            if order > 1:
                img = ndimage.spline_filter(img, order=order)
            for _ in range(n_iter):
                vox = (inv @ current @ world)[:3]
                warped = ndimage.map_coordinates(img, vox, order=order, prefilter=False, mode="nearest")
                delta = solve @ (warped - target)
                current = current @ np.linalg.inv(rigid_matrix(delta, centre))
                if np.abs(delta[:3]).max() < tolerance_mm and np.abs(delta[3:]).max() < tolerance_mm / 50.0:
                    break
        mats[t] = current
    return mats


def write_rigid_transform(matrix_44: np.ndarray, out_file: str | Path) -> Path:
    """Write a RAS world-space matrix (reference point -> volume point) as an ANTs ``.mat``."""
    import ants

    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    m = lps @ np.asarray(matrix_44, dtype=np.float64) @ lps
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    matrix=m[:3, :3], translation=m[:3, 3], center=np.zeros(3))
    ants.write_transform(tx, str(out_file))
    return Path(out_file)


def motion_correct(
    bold_file: str | Path,
    ref_file: str | Path,
    mask_file: str | Path,
    out_dir: str | Path,
    *,
    method: str = "gauss_newton",
    iterations: tuple[int, ...] = (20, 4),
    shrink_factors: tuple[int, ...] = (3, 1),
    smoothing_sigmas: tuple[float, ...] = (1.5, 0.0),
    sampling_rate: float = 0.3,
    random_seed: int | None = 42,
) -> tuple[list[Path], np.ndarray]:
    """Register every volume rigidly to the reference.

    ``method="gauss_newton"`` (default): :func:`realign_volumes` inside the
    reference's brain mask dilated by 2 voxels; ``shrink_factors`` are its
    sampling steps (voxels), ``smoothing_sigmas`` its Gaussian widths
    (voxels), ``iterations`` its Gauss-Newton steps per level;
    ``sampling_rate`` and ``random_seed`` are not used (the fit samples a
    fixed grid). ``method="ants"``: one ``ants.registration`` per volume
    (mean squares, random sampling at ``sampling_rate`` seeded with
    ``random_seed``, ANTs' multi-resolution schedule), each starting from the
    previous fit; about 5x slower at the same accuracy (benchmarks/bold.py).

    Returns
    -------
    xfm_files : list of Path
        One ANTs ``.mat`` per volume mapping reference points to that volume
        (the transform that resamples the volume onto the reference).
    params_T6 : ndarray, shape (T, 6)
        ``trans_x .. rot_z`` (mm, radians, RAS).
    """
    import ants

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if method == "gauss_newton":
        import nibabel as nib
        from scipy import ndimage

        ref_img = nib.load(str(ref_file))
        mask = ndimage.binary_dilation(np.asanyarray(nib.load(str(mask_file)).dataobj) > 0, iterations=2)
        run = nib.load(str(bold_file))
        if not np.allclose(run.affine, ref_img.affine, atol=1e-3):
            raise ValueError(f"{bold_file}: grid differs from the reference {ref_file}")
        mats = realign_volumes(np.asanyarray(ref_img.dataobj), np.asanyarray(run.dataobj), mask, ref_img.affine,
                               iterations=tuple(iterations), sample_steps=tuple(shrink_factors),
                               smoothing_sigmas=tuple(smoothing_sigmas))
        xfms = [write_rigid_transform(m, out_dir / f"vol-{t:04d}_xfm.mat") for t, m in enumerate(mats)]
        params = np.array([rigid_parameters(m[:3, :3], m[:3, 3]) for m in mats])
        return xfms, params
    if method != "ants":
        raise ValueError(f"motion correction method must be 'gauss_newton' or 'ants', got {method!r}")
    ref = ants.image_read(str(ref_file))
    mask = ants.morphology(ants.image_read(str(mask_file)), "dilate", 2)
    vols = ants.ndimage_to_list(ants.image_read(str(bold_file)))
    xfms: list[Path] = []
    params = np.zeros((len(vols), 6))
    start = ["Identity"]
    for t, vol in enumerate(vols):
        with ants_seed(random_seed):
            reg = ants.registration(
                fixed=ref, moving=vol, type_of_transform="Rigid", initial_transform=start,
                mask=mask, aff_metric="meansquares", aff_iterations=tuple(iterations),
                aff_shrink_factors=tuple(shrink_factors), aff_smoothing_sigmas=tuple(smoothing_sigmas),
                aff_random_sampling_rate=sampling_rate,
            )
        target = out_dir / f"vol-{t:04d}_xfm.mat"
        shutil.move(reg["fwdtransforms"][0], target)
        xfms.append(target)
        params[t] = transform_parameters(target)
        # Head position changes little between volumes: starting from the
        # previous fit lets a short schedule converge (the output includes it).
        start = [str(target)]
    return xfms, params


def identity_transforms(n_volumes: int, out_dir: str | Path) -> list[Path]:
    """``n_volumes`` identity ``.mat`` files (motion correction switched off)."""
    import ants

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ident = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    path = out_dir / "identity_xfm.mat"
    ants.write_transform(ident, str(path))
    return [path] * n_volumes


def register_reference(
    ref_file: str | Path, target_file: str | Path, out_xfm: str | Path, *,
    transform: str = "Rigid", target_mask: str | Path | None = None, random_seed: int | None = 42,
) -> Path:
    """Register the BOLD reference (moving) to a T1w or template (fixed).

    Mutual information with a centre-of-mass start, which copes with a
    scanner-centred EPI far from the template origin. ``transform="Affine"``
    refines a rigid fit. A ``target_mask`` skull-strips the target first.
    """
    import ants

    ref = ants.image_read(str(ref_file))
    target = ants.image_read(str(target_file)).astype("float32")
    if target_mask is not None:
        target = target * ants.image_read(str(target_mask)).astype("float32")
    if transform not in ("Rigid", "Affine"):
        raise ValueError(f"transform must be 'Rigid' or 'Affine', got {transform!r}")
    temporary: set[str] = set()  # antspyx writes its transforms to the system temp folder: removed below
    with ants_seed(random_seed):
        reg = ants.registration(fixed=target, moving=ref, type_of_transform="Rigid", aff_metric="mattes")
        temporary.update(reg["fwdtransforms"], reg["invtransforms"])
        if transform == "Affine":
            reg = ants.registration(fixed=target, moving=ref, type_of_transform="Affine",
                                    initial_transform=reg["fwdtransforms"], aff_metric="mattes")
            temporary.update(reg["fwdtransforms"], reg["invtransforms"])
    shutil.copyfile(reg["fwdtransforms"][0], out_xfm)
    for path in temporary:
        Path(path).unlink(missing_ok=True)
    return Path(out_xfm)


def resample_bold(
    bold_file: str | Path,
    motion_xfms: list[str] | list[Path],
    bold2target_xfm: str | Path,
    reference_file: str | Path,
    out_file: str | Path,
    anat2std_xfm: str | Path | None = None,
    interpolator: str = "linear",
) -> Path:
    """Resample every volume into MNI space with one interpolation.

    Per volume the chain is: motion (volume -> reference), then
    reference -> T1w (or EPI template), then T1w -> MNI when the run has a
    T1w. ANTs applies the list last-first to the moving image.
    """
    import ants
    import nibabel as nib

    fixed = ants.image_read(str(reference_file))
    vols = ants.ndimage_to_list(ants.image_read(str(bold_file)))
    if len(vols) != len(motion_xfms):
        raise ValueError(f"{len(vols)} volumes but {len(motion_xfms)} motion transforms")
    chain = ([str(anat2std_xfm)] if anat2std_xfm else []) + [str(bold2target_xfm)]
    out = np.zeros(fixed.shape + (len(vols),), dtype=np.float32)
    for t, (vol, xfm) in enumerate(zip(vols, motion_xfms)):
        warped = ants.apply_transforms(fixed=fixed, moving=vol, transformlist=chain + [str(xfm)],
                                       interpolator=interpolator)
        out[..., t] = warped.numpy()
    ref_img = nib.load(str(reference_file))
    _save_like(out, ref_img, out_file, tr=float(nib.load(str(bold_file)).header.get_zooms()[3]))
    return Path(out_file)


def resample_image(
    moving_file: str | Path, transforms: list[str], reference_file: str | Path, out_file: str | Path,
    interpolator: str = "linear",
) -> Path:
    """Resample one 3-D image onto the reference grid through ``transforms``."""
    import ants

    fixed = ants.image_read(str(reference_file))
    moving = ants.image_read(str(moving_file))
    warped = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=[str(t) for t in transforms],
                                   interpolator=interpolator)
    ants.image_write(warped, str(out_file))
    return Path(out_file)


def _save_like(data: np.ndarray, ref_img, out_file: str | Path, tr: float | None = None) -> None:
    import nibabel as nib

    hdr = ref_img.header.copy()
    hdr.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, ref_img.affine, hdr)
    img.set_qform(ref_img.affine, code=4)
    img.set_sform(ref_img.affine, code=4)
    if tr is not None and data.ndim == 4:
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = tr
    nib.save(img, str(out_file))


def tissue_masks(
    t1w_std_file: str | Path, brain_mask_file: str | Path, out_wm: str | Path, out_csf: str | Path,
    wm_erosion: int = 2, csf_erosion: int = 1,
) -> tuple[Path, Path]:
    """White-matter and CSF masks from a T1w image on the MNI grid.

    Three-class k-means of the intensities inside the brain mask: the
    brightest class is white matter, the darkest CSF. Both are eroded so the signals they give
    are free of grey-matter partial volume; the CSF mask is restricted to the
    central third of the field of view (the ventricles), where no sulcal grey
    matter borders it.
    """
    from scipy import ndimage

    t1 = np.asanyarray(_nib_load(t1w_std_file).dataobj, dtype=np.float64)
    mask = np.asanyarray(_nib_load(brain_mask_file).dataobj) > 0.5
    if t1.shape != mask.shape:
        raise ValueError(f"{t1w_std_file}: grid {t1.shape} differs from the brain mask's {mask.shape}")
    seg = np.zeros(t1.shape, dtype=np.uint8)
    seg[mask] = kmeans_1d(t1[mask], 3) + 1
    wm = ndimage.binary_erosion(seg == 3, iterations=wm_erosion) if wm_erosion else seg == 3
    csf = seg == 1
    box = np.zeros_like(csf)
    sl = tuple(slice(s // 3, s - s // 3) for s in csf.shape)
    box[sl] = True
    csf = csf & box
    if csf_erosion:
        csf = ndimage.binary_erosion(csf, iterations=csf_erosion)
    if not wm.any() or not csf.any():
        raise NeurocurateError(f"{t1w_std_file}: tissue classification left an empty white-matter or CSF mask")
    ref_img = _nib_load(brain_mask_file)
    _save_like(wm.astype(np.uint8), ref_img, out_wm)
    _save_like(csf.astype(np.uint8), ref_img, out_csf)
    return Path(out_wm), Path(out_csf)


def kmeans_1d(values: np.ndarray, k: int, n_iter: int = 100) -> np.ndarray:
    """Lloyd's k-means of scalar values; labels 0..k-1 in increasing centre order.

    Centres start at evenly spaced percentiles, so the result is deterministic.
    """
    x = np.asarray(values, dtype=np.float64)
    centres = np.percentile(x, np.linspace(100 / (2 * k), 100 - 100 / (2 * k), k))
    labels = np.zeros(x.size, dtype=np.int64)
    for _ in range(n_iter):
        labels = np.abs(x[:, None] - centres[None, :]).argmin(axis=1)
        new = np.array([x[labels == j].mean() if np.any(labels == j) else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    order = np.argsort(centres)
    return np.argsort(order)[labels]


def _nib_load(path: str | Path):
    import nibabel as nib

    return nib.load(str(path))


def find_epi_template(configured: str, template_dir: str) -> tuple[Path, str | None]:
    """The template runs without a T1w are registered to.

    Returns
    -------
    path : Path
    warning : str or None
        Set when falling back to the bundled T2w template.

    Raises
    ------
    InputError
        When ``configured`` is set but does not exist.
    """
    from pipeline.core.templates import get_template

    if configured:
        path = Path(configured)
        if not path.is_file():
            raise InputError(path, "bold.epi_template does not exist")
        return path, None
    if template_dir:
        for name in EPI_TEMPLATE_NAMES:
            if (Path(template_dir) / name).is_file():
                return Path(template_dir) / name, None
    fallback = get_template(2, "T2w", template_dir=template_dir or None)
    looked = ", ".join(EPI_TEMPLATE_NAMES)
    where = template_dir or "(templates.template_dir is not set)"
    return fallback, (
        f"no EPI template found in {where} (looked for {looked}); registering runs without a T1w "
        f"to the T2w template {fallback}, which is less reliable. Set bold.epi_template."
    )


def write_json(path: str | Path, data: dict) -> Path:
    """Write a JSON file (node working directories; derivatives are copied atomically)."""
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
    return Path(path)


def confounds_table(
    bold_std_file: str | Path,
    brain_mask_file: str | Path,
    wm_mask_file: str | Path,
    csf_mask_file: str | Path,
    params_T6: np.ndarray,
    fd_radius_mm: float = 50.0,
    *,
    repetition_time: float | None = None,
    high_pass: float = 0.0,
    compcor_components: int = 0,
):
    """The fMRIPrep-style confounds table of a run (one row per volume).

    Columns: the six rigid parameters with derivatives, squares and squared
    derivatives (24), ``framewise_displacement``, ``dvars``, ``std_dvars``,
    ``global_signal``, ``white_matter``, ``csf`` with the same expansions,
    then (with ``repetition_time``) the DCT high-pass basis ``cosine00`` ...
    below ``high_pass`` Hz and ``compcor_components`` anatomical CompCor
    components ``a_comp_cor_00`` ... of the combined WM + CSF mask
    (:func:`workflows.ops.denoise.acompcor`: fMRIPrep's nipype routine, DCT
    pre-filter of period ``1 / high_pass``).
    Undefined first-row values (derivatives, DVARS, FD) are NaN, written as ``n/a``.

    Returns
    -------
    table : pandas.DataFrame
    compcor_meta : dict
        fMRIPrep-style JSON entries of the CompCor columns (``Method``,
        ``Mask``, ``VarianceExplained``, ``Retained``).
    """
    import nibabel as nib
    import pandas as pd

    from workflows.ops.confounds import (
        MOTION_NAMES,
        dvars,
        expand_regressors,
        framewise_displacement,
    )
    from workflows.ops.denoise import acompcor, cosine_drift

    data = np.asanyarray(nib.load(str(bold_std_file)).dataobj, dtype=np.float32)

    def masked(*mask_files: str | Path) -> np.ndarray:
        mask = np.zeros(data.shape[:3], dtype=bool)
        for mask_file in mask_files:
            m = np.asanyarray(nib.load(str(mask_file)).dataobj) > 0
            if m.shape != mask.shape:
                raise ValueError(f"{mask_file}: mask grid {m.shape} differs from {bold_std_file} {mask.shape}")
            mask |= m
        return data[mask].astype(np.float64)

    brain_VT = masked(brain_mask_file)
    if brain_VT.shape[1] != params_T6.shape[0]:
        raise ValueError(f"{brain_VT.shape[1]} volumes but {params_T6.shape[0]} rows of motion parameters")
    motion, motion_names = expand_regressors(params_T6, MOTION_NAMES)
    wm_VT = masked(wm_mask_file)
    csf_VT = masked(csf_mask_file)
    signals = np.column_stack([brain_VT.mean(axis=0), wm_VT.mean(axis=0), csf_VT.mean(axis=0)])
    tissue, tissue_names = expand_regressors(signals, ["global_signal", "white_matter", "csf"])
    dv, std_dv = dvars(brain_VT)
    fd = framewise_displacement(params_T6, fd_radius_mm)
    fd[0] = np.nan
    columns = [motion, fd, dv, std_dv, tissue]
    names = motion_names + ["framewise_displacement", "dvars", "std_dvars"] + tissue_names
    meta: dict = {}
    if repetition_time is not None:
        drift = cosine_drift(brain_VT.shape[1], repetition_time, high_pass)
        columns.append(drift)
        names += [f"cosine{k:02d}" for k in range(drift.shape[1])]
        if compcor_components > 0:
            noise = np.zeros(data.shape[:3], dtype=bool)
            for mask_file in (wm_mask_file, csf_mask_file):
                noise |= np.asanyarray(nib.load(str(mask_file)).dataobj) > 0
            comps, var = acompcor(data, noise, compcor_components, repetition_time, high_pass)
            columns.append(comps)
            cumulative = np.cumsum(var)
            for k in range(comps.shape[1]):
                name = f"a_comp_cor_{k:02d}"
                names.append(name)
                meta[name] = {"Method": "aCompCor", "Mask": "combined", "Retained": True,
                              "VarianceExplained": float(var[k]), "CumulativeVarianceExplained": float(cumulative[k])}
    table = pd.DataFrame(np.column_stack(columns), columns=names)
    return table, meta
