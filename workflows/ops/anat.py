"""Pure anatomical image operations: validation, N4, affine registration, skull strip, resampling.

Each function takes and returns file paths (or nibabel images for the pure
validation core), so nipype nodes stay thin glue and the math is testable on
its own. ANTs work goes through antspyx (no ANTs binaries needed).

References
----------
Tustison et al. (2010), N4ITK: improved N3 bias correction. IEEE TMI 29(6).
Avants et al. (2011), A reproducible evaluation of ANTs similarity metric performance. NeuroImage 54(3).
Fisch et al. (2024), deepbet: fast brain extraction of T1-weighted MRI using CNNs. Comput Biol Med 179.
Esteban et al. (2019), fMRIPrep (the header validation rules mirror its ``ValidateImage``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.core.errors import InputError
from workflows.ops.seeding import ants_seed

__all__ = [
    "deepbet_mask",
    "load_nifti",
    "n4_correct",
    "register_affine",
    "register_syn",
    "resample_to_template",
    "template_mask_to_native",
    "validate_anat_image",
    "validate_anat_file",
]


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Load a NIfTI file, turning every reader failure into an :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise InputError(path, "file is not readable (permission denied)")
    try:
        img = nib.load(str(path))
        # Touch the data so truncated gzip streams fail here, not deep in ANTs.
        np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"cannot be read as NIfTI ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"is a {type(img).__name__}, expected NIfTI")
    return img


def _fov_corners(shape: Sequence[int]) -> np.ndarray:
    i, j, k = (np.array([0, s - 1]) for s in shape[:3])
    return np.array(np.meshgrid(i, j, k, indexing="ij")).reshape(3, -1).T


def _affine_ok(affine: np.ndarray | None) -> bool:
    if affine is None or not np.all(np.isfinite(affine)):
        return False
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.linalg.det(affine[:3, :3]) != 0 and np.all(zooms > 1e-3) and np.all(zooms < 50))


def validate_anat_image(
    img: nib.Nifti1Image, path: str | Path, *, qform_sform_tolerance_mm: float = 1.0
) -> tuple[nib.Nifti1Image, list[str]]:
    """Check a structural image and fix what fMRIPrep fixes.

    Fixed (and reported): a singleton 4th dimension (squeezed); a missing or
    invalid qform or sform when the other is valid; a qform that disagrees
    with the sform (the sform is kept, as fMRIPrep does). Rejected with an
    :class:`InputError`: a real 4D series, non-finite voxels, an all-zero or
    constant image, a degenerate affine.

    Parameters
    ----------
    img : nibabel image
    path : path-like
        Only used in messages.
    qform_sform_tolerance_mm : float
        Largest displacement of any field-of-view corner between the qform
        and sform mappings that is still considered an agreement.

    Returns
    -------
    img : nibabel.Nifti1Image
        The (possibly fixed) image, float32.
    fixes : list of str
        One sentence per fix applied.
    """
    fixes: list[str] = []
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        fixes.append("squeezed a singleton 4th dimension")
        shape = shape[:3]
    elif len(shape) != 3:
        raise InputError(path, f"expected a 3D structural image, got shape {tuple(img.shape)}")
    if min(shape) < 8:
        raise InputError(path, f"image is too small to be a head scan (shape {shape})")
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    n_bad = int(np.count_nonzero(~np.isfinite(data)))
    if n_bad:
        raise InputError(path, f"contains {n_bad} NaN/Inf voxels")
    if not np.any(data):
        raise InputError(path, "image is all zeros")
    if float(data.max()) == float(data.min()):
        raise InputError(path, "image is constant (no contrast)")

    header = img.header
    qform, qcode = img.get_qform(coded=True)
    sform, scode = img.get_sform(coded=True)
    q_ok = qcode and qcode > 0 and _affine_ok(qform)
    s_ok = scode and scode > 0 and _affine_ok(sform)
    if s_ok and q_ok:
        corners = _fov_corners(shape)
        disp = np.abs(nib.affines.apply_affine(qform, corners) - nib.affines.apply_affine(sform, corners)).max()
        if disp > qform_sform_tolerance_mm:
            fixes.append(f"qform and sform disagreed by up to {disp:.1f} mm: kept the sform and copied it to the qform")
        affine = sform
    elif s_ok:
        if qcode:
            fixes.append("qform was invalid: replaced it with the sform")
        else:
            fixes.append("qform was missing: copied the sform into it")
        affine = sform
    elif q_ok:
        fixes.append("sform was missing or invalid: copied the qform into it")
        affine = qform
    elif _affine_ok(img.affine):
        # Neither transform is coded; nibabel's fallback (pixdim) is all we have.
        fixes.append("neither qform nor sform was set: used the voxel sizes from the header")
        affine = img.affine
    else:
        raise InputError(path, "degenerate affine (singular or non-finite voxel-to-world mapping)")
    if not _affine_ok(affine):
        raise InputError(path, "degenerate affine (singular or non-finite voxel-to-world mapping)")

    out = nib.Nifti1Image(data, affine)
    out.header.set_xyzt_units(*header.get_xyzt_units())
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out, fixes


def validate_anat_file(in_file: str, out_file: str, *, qform_sform_tolerance_mm: float = 1.0) -> list[str]:
    """Validate ``in_file``, reorient to RAS and write the result to ``out_file``.

    Returns the list of fixes (reorientation included).
    """
    img, fixes = validate_anat_image(load_nifti(in_file), in_file, qform_sform_tolerance_mm=qform_sform_tolerance_mm)
    codes = "".join(nib.aff2axcodes(img.affine))
    if codes != "RAS":
        img = nib.as_closest_canonical(img)
        fixes.append(f"reoriented {codes} to RAS")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, out_file)
    return fixes


def _ants():
    import ants

    return ants


def n4_correct(
    in_file: str,
    out_file: str,
    bias_file: str,
    *,
    shrink_factor: int = 2,
    iterations: Sequence[int] = (25, 25, 25, 25),
    convergence: float = 1e-7,
    working_resolution_mm: float = 3.0,
) -> None:
    """N4 bias-field correction within a rough head mask; writes the corrected image and the field.

    The field is smooth (a B-spline whose mesh spans the field of view, 1 to 8
    spans per axis over four levels), so with ``working_resolution_mm`` > 0 it
    is fitted on a copy resampled to that resolution (when the scan is finer)
    and interpolated back onto the scan's grid; the head mask (ANTs
    ``get_mask``) is built on that copy too and keeps background noise out of
    the fit. N4 then fits at ``working_resolution_mm * shrink_factor``: the
    workflow default (3 mm, shrink 2, 25 iterations per level: a 6 mm fit)
    costs about 3 s of CPU on a 1 mm scan against 30-45 s for the
    pre-issue-13 default (native grid, shrink 4, 50 iterations per level);
    on the three ../shared/data/anat T1w it was tuned on, the CJV in the
    deepbet brain went 0.459/0.418/0.468 -> 0.419/0.435/0.449 (neck, Colin27,
    brainchop; benchmarks/README.md, issue 13). ``working_resolution_mm`` 0
    fits on the native grid.
    """
    ants = _ants()
    img = ants.image_read(in_file)
    lo = float(np.percentile(img.numpy(), 0.5))
    img = img - lo if lo < 0 else img
    work = img
    if working_resolution_mm and min(img.spacing) < working_resolution_mm:
        spacing = tuple(max(s, working_resolution_mm) for s in img.spacing)
        work = ants.resample_image(img, spacing, use_voxels=False, interp_type=0)
    mask = ants.get_mask(work, cleanup=2)
    if float(mask.sum()) < 1000:
        mask = work * 0 + 1
    bias = ants.n4_bias_field_correction(
        work,
        mask=mask,
        shrink_factor=shrink_factor,
        convergence={"iters": list(iterations), "tol": convergence},
        return_bias_field=True,
    )
    if work is not img:
        bias = ants.resample_image_to_target(bias, img, interp_type="linear")
        # Outside the working grid's support linear interpolation returns 0; a field of 1 leaves those voxels alone.
        arr = bias.numpy()
        arr[arr <= 1e-6] = 1.0
        bias = bias.new_image_like(arr)
    corrected = img / bias
    ants.image_write(corrected, out_file)
    ants.image_write(bias, bias_file)


def _moving_image(moving_file: str, moving_mask: str | None, resolution_mm: float):
    """The moving image for a registration: masked, and on a coarser grid when the scan is finer."""
    ants = _ants()
    moving = ants.image_read(moving_file)
    if moving_mask:
        moving = moving * ants.image_read(moving_mask)
    if resolution_mm and min(moving.spacing) < resolution_mm:
        moving = _coarse_copy(moving, resolution_mm)
    return moving


def _coarse_copy(image, resolution_mm: float):
    """``image`` on a grid no finer than ``resolution_mm`` along any axis (coarser axes are kept).

    Block average first (a Gaussian of about half the new spacing), so the coarse copy does not alias.
    """
    ants = _ants()
    spacing = tuple(max(s, resolution_mm) for s in image.spacing)
    sigma = [0.5 * max(0.0, n - s) for n, s in zip(spacing, image.spacing)]
    return ants.resample_image(ants.smooth_image(image, sigma, sigma_in_physical_coordinates=True),
                               spacing, use_voxels=False, interp_type=0)


def register_affine(
    moving_file: str,
    template_file: str,
    out_xfm: str,
    *,
    moving_mask: str | None = None,
    metric: str = "mattes",
    iterations: Sequence[int] = (2100, 1200, 1200, 10),
    shrink_factors: Sequence[int] = (6, 4, 2, 1),
    smoothing_sigmas: Sequence[float] = (3.0, 2.0, 1.0, 0.0),
    sampling_rate: float = 0.2,
    moving_resolution_mm: float = 0.0,
    init_arc_deg: float = 27.0,
    init_step_deg: float = 15.0,
    seed: int = 13,
) -> str:
    """12-dof affine registration of ``moving_file`` to ``template_file``.

    One affine stage with a mutual-information metric (Mattes) by default,
    coarse to fine, started from the alignment of the centres of mass (ANTs'
    default), so scanner-centred origins far from MNI are handled. With
    ``init_arc_deg`` > 0 it is also started from the best of a grid of
    rotations (:func:`_search_initial_rotation`), and of the two results the
    one with the higher mutual information with the template is kept: either
    start alone falls into a wrong minimum on some tilted heads (issue 16,
    ``benchmarks/registration_tilt.py``). ``moving_mask`` restricts the
    metric to the subject's brain when a skull strip came first. The metric
    is evaluated on a random ``sampling_rate`` share of the template's
    voxels; ``moving_resolution_mm`` > 0 registers a smoothed copy of the
    moving image on that grid (the template is 2 mm: a 1 mm moving image adds
    cost, not accuracy).

    Returns
    -------
    str
        ``out_xfm``: an ITK affine (.mat) mapping template points to subject
        points, i.e. the forward transform for
        ``ants.apply_transforms(fixed=template, moving=subject, transformlist=[xfm])``.
    """
    ants = _ants()
    fixed = ants.image_read(template_file)
    moving = _moving_image(moving_file, moving_mask, moving_resolution_mm)
    starts: list[str | None] = [None]  # None: ANTs' centre-of-mass start
    if init_arc_deg > 0:
        starts.append(str(Path(out_xfm).with_name(Path(out_xfm).stem + "_init.mat")))
    best: tuple[float, dict] | None = None
    with ants_seed(seed):
        if len(starts) > 1:
            _search_initial_rotation(fixed, moving, starts[1], arc_deg=init_arc_deg, step_deg=init_step_deg)
        for start in starts:
            result = ants.registration(
                fixed=fixed,
                moving=moving,
                type_of_transform="Affine",
                initial_transform=start,
                aff_metric=metric,
                aff_iterations=tuple(iterations),
                aff_shrink_factors=tuple(shrink_factors),
                aff_smoothing_sigmas=tuple(smoothing_sigmas),
                aff_random_sampling_rate=float(sampling_rate),
            )
            # ANTs' Mattes MI is negative: lower is a better match to the template.
            score = float(ants.image_mutual_information(fixed, result["warpedmovout"]))
            if best is None or score < best[0]:
                if best is not None:
                    _remove_transforms(best[1])
                best = (score, result)
            else:
                _remove_transforms(result)
    if best is None:  # unreachable: the centre-of-mass start always runs
        raise RuntimeError(f"{moving_file}: no affine registration ran")
    shutil.copyfile(best[1]["fwdtransforms"][0], out_xfm)
    _remove_transforms(best[1], keep=out_xfm)
    for start in starts[1:]:
        Path(start).unlink(missing_ok=True)
    return out_xfm


def _remove_transforms(result: dict, keep: str = "") -> None:
    """Delete the temporary transform files of an ``ants.registration`` result."""
    for p in {*result["fwdtransforms"], *result["invtransforms"]}:
        if p != keep:
            Path(p).unlink(missing_ok=True)


#: Grid of the rotation search's copies of both images (mm): the search only needs the head's outline.
INIT_SEARCH_RESOLUTION_MM = 4.0


def _search_initial_rotation(fixed, moving, out_file: str, *, arc_deg: float, step_deg: float) -> str:
    """Multi-start initial transform: ANTs' ``antsAffineInitializer`` on 4 mm copies of both images.

    Rotations about the centre of mass within +-``arc_deg`` of the header's
    orientation, every ``step_deg`` about each axis, each refined by a short
    local affine search on mutual information; the best start is written to
    ``out_file``. The affine stage alone, started from the centres of mass,
    falls into a wrong minimum on some 5.5 mm stacks tilted by 12 degrees
    (issue 16); niworkflows' brain extraction starts its registration with the
    same search (``antsAI``, 15 degree steps).
    """
    ants = _ants()
    res = INIT_SEARCH_RESOLUTION_MM
    log = Path(out_file).with_suffix(".log")
    with _program_output(str(log)):  # it prints a line per rejected start ("bad det ...")
        ants.affine_initializer(_coarse_copy(fixed, res), _coarse_copy(moving, res), search_factor=float(step_deg),
                                radian_fraction=float(arc_deg) / 180.0, use_principal_axis=False,
                                local_search_iterations=10, txfn=out_file)
    if not Path(out_file).is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        raise RuntimeError(f"{out_file}: the ANTs rotation search wrote no transform {tail}")
    log.unlink(missing_ok=True)
    return out_file


@contextlib.contextmanager
def _program_output(log_file: str):
    """Send file descriptors 1 and 2 to ``log_file`` inside the block.

    ANTs programs print progress there (not to ``sys.stdout``); the caller reads the file when the
    program fails.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        os.close(log)


def register_syn(
    moving_file: str,
    template_file: str,
    affine_xfm: str,
    out_xfm: str,
    *,
    moving_mask: str | None = None,
    metric: str = "mattes",
    iterations: Sequence[int] = (40, 20, 0),
    moving_resolution_mm: float = 0.0,
    seed: int = 13,
) -> str:
    """Nonlinear (symmetric normalisation, SyN) registration after an affine.

    ANTs SyN alone (``SyNOnly``), started from ``affine_xfm`` (the output of
    :func:`register_affine`), coarse to fine over ``len(iterations)`` levels
    with the quick preset's defaults otherwise (Mattes MI, gradient step 0.2,
    flow sigma 3).

    Returns
    -------
    str
        ``out_xfm``: an ITK composite transform (HDF5, ``.h5``) holding the
        affine and the displacement field, the forward transform for
        ``ants.apply_transforms(fixed=template, moving=subject, transformlist=[out_xfm])``.
    """
    import tempfile

    ants = _ants()
    fixed = ants.image_read(template_file)
    moving = _moving_image(moving_file, moving_mask, moving_resolution_mm)
    with tempfile.TemporaryDirectory(prefix="nc_syn_") as tmp, ants_seed(seed):
        result = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform="SyNOnly",
            initial_transform=affine_xfm,
            syn_metric=metric,
            reg_iterations=tuple(iterations),
            write_composite_transform=True,
            outprefix=str(Path(tmp) / "syn_"),
        )
        fwd = result["fwdtransforms"]
        shutil.copyfile(fwd if isinstance(fwd, str) else fwd[0], out_xfm)
    return out_xfm


def deepbet_mask(in_file: str, out_mask: str, *, threshold: float = 0.5, model_shape: int = 192) -> str:
    """Brain mask in native space with deepbet (weights ship inside its wheel).

    ``model_shape`` is the cube the bounding box is resampled to before the
    network; 192 gives the same Dice as deepbet's 256 on Colin27 at about a
    third of the CPU time (see benchmarks/README.md).
    """
    import torch
    from deepbet.bet import BrainExtraction

    img = nib.load(in_file)
    canonical = nib.as_closest_canonical(img)
    x = canonical.get_fdata(dtype=np.float32)
    with torch.inference_mode():
        bet = BrainExtraction(no_gpu=not torch.cuda.is_available())
        prob = bet.run_model(x.copy(), shape=(model_shape,) * 3)
        mask = bet.postprocess(prob > threshold)
    if not mask.any():
        raise InputError(in_file, "deepbet found no brain in this image")
    out = nib.Nifti1Image(mask.astype(np.uint8), canonical.affine)
    out = out.as_reoriented(nib.orientations.ornt_transform(
        nib.io_orientation(canonical.affine), nib.io_orientation(img.affine)))
    out.set_data_dtype(np.uint8)
    nib.save(out, out_mask)
    return out_mask


def template_mask_to_native(native_file: str, template_mask: str, xfm: str, out_mask: str) -> str:
    """Carry the template brain mask back into the subject's space through the inverse affine."""
    ants = _ants()
    native = ants.image_read(native_file)
    mask = ants.image_read(template_mask)
    warped = ants.apply_transforms(
        fixed=native, moving=mask, transformlist=[xfm], whichtoinvert=[True], interpolator="linear"
    )
    _write_like(native_file, (warped.numpy() >= 0.5).astype(np.uint8), out_mask)
    return out_mask


def _write_like(reference: str, data: np.ndarray, out_file: str, dtype=None) -> None:
    ref = nib.load(reference)
    out = nib.Nifti1Image(data, ref.affine)
    code = int(ref.header["sform_code"]) or 1
    out.set_sform(ref.affine, code=code)
    out.set_qform(ref.affine, code=code)
    out.set_data_dtype(dtype or data.dtype)
    nib.save(out, out_file)


def resample_to_template(
    in_file: str, template_file: str, xfm: str, out_file: str, *, kind: str = "image"
) -> str:
    """Resample a native image onto the template grid through ``xfm`` (one interpolation).

    Parameters
    ----------
    kind : {"image", "mask", "field"}
        ``image``: Lanczos windowed sinc, negatives from ringing clipped to
        zero; ``mask``: linear then threshold at 0.5 (uint8); ``field``: linear.
    """
    ants = _ants()
    fixed = ants.image_read(template_file)
    moving = ants.image_read(in_file)
    interp = {"image": "lanczosWindowedSinc", "mask": "linear", "field": "linear"}[kind]
    warped = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=[xfm], interpolator=interp).numpy()
    if kind == "mask":
        _write_like(template_file, (warped >= 0.5).astype(np.uint8), out_file, np.uint8)
    else:
        if kind == "image":
            warped = np.clip(warped, 0, None)
        _write_like(template_file, warped.astype(np.float32), out_file, np.float32)
    return out_file
