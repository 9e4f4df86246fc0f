"""Denoising presets for ROI series, on fMRIPrep-style confounds, through nilearn.

The confounds TSV of a run follows fMRIPrep's names (``trans_x``,
``white_matter_derivative1_power2``, ``framewise_displacement``,
``std_dvars``, ``cosine00``, ``a_comp_cor_00`` with its JSON metadata), so the
confound selection of every preset is nilearn's own
``nilearn.interfaces.fmriprep.load_confounds`` (scrubbing's sample mask
included) and the regression is ``nilearn.signal.clean``. Presets:

``none``
    Linear detrend and the cosine high-pass only.
``task``
    Task-safe default for runs with an ``events.tsv``: the cosine high-pass,
    no low-pass, and of the six motion parameters and the WM/CSF means only
    those whose correlation with the HRF-convolved design stays within
    ``bold.task_max_design_r``.
``simple`` / ``simple_gsr``
    nilearn's ``simple``: high-pass, motion (``bold.motion_regressors``),
    WM/CSF means; ``_gsr`` adds the global signal.
``scrubbing`` / ``scrubbing_gsr``
    nilearn's ``scrubbing``: ``simple`` with the WM/CSF expansions plus
    censoring of volumes above ``bold.scrub_fd_threshold`` (FD, mm) or
    ``bold.scrub_dvars_threshold`` (standardised DVARS), and of segments
    shorter than ``bold.scrub_min_segment`` between them.
``compcor`` / ``compcor_gsr``
    nilearn's ``compcor``: high-pass, motion and the first
    ``bold.compcor_components`` anatomical CompCor components of the combined
    WM + CSF mask.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.core.errors import InputError

__all__ = [
    "DENOISE_PRESETS",
    "acompcor",
    "clean_series",
    "cosine_drift",
    "design_correlations",
    "design_regressor",
    "events_file_for",
    "load_preset_confounds",
    "preset_parameters",
    "read_design",
    "resolve_preset",
    "write_design",
]

DENOISE_PRESETS = ("none", "task", "simple", "simple_gsr", "scrubbing", "scrubbing_gsr", "compcor", "compcor_gsr")
_MOTION_MODELS = {6: "basic", 12: "derivatives", 24: "full"}


def resolve_preset(configured: str, has_events: bool, task_default: str = "task", rest_default: str = "simple") -> str:
    """The preset a run gets: ``configured`` unless it is ``auto``.

    ``auto`` gives ``task_default`` to a run with an ``events.tsv`` and
    ``rest_default`` to any other run.

    Raises
    ------
    ValueError
        For a name that is not ``auto`` or one of :data:`DENOISE_PRESETS`.
    """
    for name in (configured, task_default, rest_default):
        if name != "auto" and name not in DENOISE_PRESETS:
            raise ValueError(f"unknown denoising preset {name!r}; known: auto, {', '.join(DENOISE_PRESETS)}")
    if configured != "auto":
        return configured
    return task_default if has_events else rest_default


def events_file_for(bold_file: str | Path) -> Path | None:
    """The BIDS ``events.tsv`` next to a BOLD run (same entities), or None."""
    name = Path(bold_file).name
    for suffix in ("_bold.nii.gz", "_bold.nii"):
        if name.endswith(suffix):
            candidate = Path(bold_file).with_name(name[: -len(suffix)] + "_events.tsv")
            return candidate if candidate.is_file() else None
    return None


def design_regressor(events_tsv: str | Path, n_volumes: int, repetition_time: float, n_dummy: int = 0) -> np.ndarray:
    """Glover-HRF convolved on/off regressor of all events, at the kept volumes.

    Every event counts as stimulation (amplitude 1, or the ``modulation``
    column when present); the frame times start after the ``n_dummy``
    removed volumes. Uses ``nilearn.glm.first_level.compute_regressor``.

    Raises
    ------
    InputError
        When the file is unreadable, lacks ``onset``/``duration`` or has no
        finite event.
    """
    import pandas as pd
    from nilearn.glm.first_level import compute_regressor

    try:
        ev = pd.read_csv(events_tsv, sep="\t", na_values="n/a")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(events_tsv, f"cannot read events table ({exc})") from None
    missing = [c for c in ("onset", "duration") if c not in ev.columns]
    if missing:
        raise InputError(events_tsv, f"events table lacks column(s) {missing}")
    amp = ev["modulation"].to_numpy(dtype=float) if "modulation" in ev.columns else np.ones(len(ev))
    cond = np.vstack([ev["onset"].to_numpy(dtype=float), ev["duration"].to_numpy(dtype=float), amp])
    cond = cond[:, np.isfinite(cond).all(axis=0)]
    if cond.shape[1] == 0:
        raise InputError(events_tsv, "events table has no event with a finite onset and duration")
    frame_times = (np.arange(n_volumes) + n_dummy) * repetition_time
    reg, _ = compute_regressor(cond, "glover", frame_times, oversampling=16)
    return reg[:, 0]


def cosine_drift(n_volumes: int, repetition_time: float, high_pass: float) -> np.ndarray:
    """DCT high-pass basis (``cosine00`` ...) below ``high_pass`` Hz, from nilearn.

    The same basis as fMRIPrep's ``cosine`` confounds
    (``nilearn.glm.first_level.make_first_level_design_matrix`` with
    ``drift_model="cosine"``), without the constant. ``high_pass`` <= 0
    gives no columns.
    """
    if high_pass <= 0:
        return np.zeros((n_volumes, 0))
    from nilearn.glm.first_level import make_first_level_design_matrix

    frame_times = np.arange(n_volumes) * repetition_time
    dm = make_first_level_design_matrix(frame_times, events=None, drift_model="cosine", high_pass=high_pass)
    cols = [c for c in dm.columns if c.startswith("drift_")]
    return dm[cols].to_numpy(dtype=np.float64)


def acompcor(
    data_XYZT: np.ndarray, mask_XYZ: np.ndarray, n_components: int, repetition_time: float, high_pass: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Anatomical CompCor (Behzadi et al., 2007) of the voxels of a noise mask, as fMRIPrep computes it.

    ``nipype.algorithms.confounds.compute_noise_components`` (fMRIPrep's
    routine): each voxel's series is high-passed with a DCT basis of period
    ``1 / high_pass`` s (mean removal only when ``high_pass`` <= 0), scaled
    to unit variance, and the components are the leading left singular
    vectors of the ``(T, V)`` matrix. Each component's sign is then chosen so
    its largest-magnitude entry is positive (the SVD's sign is arbitrary).

    Returns
    -------
    components_TN : ndarray, shape (T, n)
        ``n = min(n_components, T, V)``.
    variance_explained_N : ndarray
        Fraction of the filtered, normalised variance per component.
    """
    import nibabel as nib
    from nipype.algorithms.confounds import compute_noise_components

    mask = np.asarray(mask_XYZ) > 0
    n_vols = data_XYZT.shape[3]
    n = min(int(n_components), n_vols, int(mask.sum()))
    if n < 1:
        raise ValueError("aCompCor needs at least one component, one volume and one mask voxel")
    filt = {"filter_type": "cosine", "period_cut": 1.0 / high_pass} if high_pass > 0 else {"filter_type": False}
    # The mask's bounding box in float64: exact SVDs without a float64 copy of the whole run.
    idx = np.argwhere(mask)
    box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(axis=0), idx.max(axis=0)))
    comps, _, meta = compute_noise_components(
        np.asarray(data_XYZT[box], dtype=np.float64), [nib.Nifti1Image(mask[box].astype(np.uint8), np.eye(4))],
        components_criterion=n, repetition_time=repetition_time, **filt)
    comps = np.asarray(comps, dtype=np.float64)[:, :n]
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(n)])
    return comps * np.where(signs == 0, 1.0, signs), np.asarray(meta["variance_explained"], dtype=np.float64)[:n]


def design_correlations(confounds, design_T: np.ndarray, drift_TK: np.ndarray | None = None) -> dict[str, float]:
    """Pearson r of every confound column with the design, after the high-pass.

    Both are residualised against a constant and ``drift_TK`` (what the
    denoising's high-pass leaves) over the rows where the column is finite.
    Columns that are constant there get 0.
    """
    design = np.asarray(design_T, dtype=np.float64)
    n_vols = design.size
    basis = np.ones((n_vols, 1)) if drift_TK is None or drift_TK.size == 0 else np.column_stack([np.ones(n_vols), drift_TK])
    out = {}
    for col in confounds.columns:
        x = confounds[col].to_numpy(dtype=np.float64)
        ok = np.isfinite(x)
        if ok.sum() < basis.shape[1] + 2:
            out[col] = 0.0
            continue
        b = basis[ok]
        rx = x[ok] - b @ np.linalg.lstsq(b, x[ok], rcond=None)[0]
        rd = design[ok] - b @ np.linalg.lstsq(b, design[ok], rcond=None)[0]
        den = np.linalg.norm(rx) * np.linalg.norm(rd)
        out[col] = float(rx @ rd / den) if den > 1e-12 else 0.0
    return out


def preset_parameters(
    preset: str, *, motion_regressors: int = 24, high_pass: float = 0.008, scrub_fd_threshold: float = 0.5,
    scrub_dvars_threshold: float = 1.5, scrub_min_segment: int = 5, compcor_components: int = 5,
) -> dict:
    """``nilearn.interfaces.fmriprep.load_confounds`` arguments of a preset.

    ``simple``, ``scrubbing`` and ``compcor`` start from nilearn's own
    ``load_confounds_strategy`` definitions; the config overrides the motion
    model, the scrubbing thresholds and the number of CompCor components.
    ``high_pass`` <= 0 drops the cosine terms; ``motion_regressors`` 0 drops
    the motion terms.
    """
    from nilearn.interfaces.fmriprep.load_confounds_strategy import preset_strategies

    if preset not in DENOISE_PRESETS:
        raise ValueError(f"unknown denoising preset {preset!r}; known: {', '.join(DENOISE_PRESETS)}")
    if motion_regressors not in (0, *_MOTION_MODELS):
        raise ValueError(f"motion regressors must be 0, 6, 12 or 24, got {motion_regressors}")
    base = preset.removesuffix("_gsr")
    if base == "none":
        params: dict = {"strategy": ["high_pass"]}
    elif base == "task":
        params = {"strategy": ["high_pass", "motion", "wm_csf"], "motion": "basic", "wm_csf": "basic"}
    else:
        params = {k: (list(v) if k == "strategy" else v) for k, v in preset_strategies[base].items()}
        params["motion"] = _MOTION_MODELS.get(motion_regressors, "basic")
        if motion_regressors == 0:
            params["strategy"].remove("motion")
        if base == "scrubbing":
            params.update(fd_threshold=scrub_fd_threshold, std_dvars_threshold=scrub_dvars_threshold,
                          scrub=scrub_min_segment)
        if base == "compcor":
            params["n_compcor"] = int(compcor_components)
    if preset.endswith("_gsr"):
        params["strategy"].append("global_signal")
        params["global_signal"] = "basic"
    if high_pass <= 0:
        params["strategy"].remove("high_pass")
    params["demean"] = True
    return params


def _fmriprep_view(confounds_tsv: str | Path, confounds_json: str | Path, folder: str | Path) -> str:
    """Links the confounds under fMRIPrep names; returns the image name nilearn expects.

    ``load_confounds`` finds a run's confounds from its preprocessed image's
    name (``..._desc-preproc_bold.nii.gz`` -> ``..._desc-confounds_timeseries.tsv``);
    it never opens the image.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for src, name in ((confounds_tsv, "sub-run_desc-confounds_timeseries.tsv"),
                      (confounds_json, "sub-run_desc-confounds_timeseries.json")):
        dst = folder / name
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        os.symlink(os.path.abspath(src), dst)
    return str(folder / "sub-run_desc-preproc_bold.nii.gz")


def load_preset_confounds(
    preset: str, confounds_tsv: str | Path, confounds_json: str | Path, work_dir: str | Path, *,
    design_T: np.ndarray | None = None, task_max_design_r: float = 0.1, **options,
) -> tuple[object, np.ndarray | None, dict]:
    """The confounds a preset regresses out and the volumes it keeps.

    Parameters
    ----------
    preset : str
        One of :data:`DENOISE_PRESETS`.
    confounds_tsv, confounds_json : path
        The run's fMRIPrep-style confounds table and its metadata.
    work_dir : path
        Where the fMRIPrep-named links for nilearn are made.
    design_T : ndarray, optional
        HRF-convolved design; required by ``task``, which drops every
        non-cosine regressor whose high-passed correlation with it exceeds
        ``task_max_design_r`` in magnitude.
    **options
        Passed to :func:`preset_parameters`.

    Returns
    -------
    confounds : pandas.DataFrame or None
        Regressors (demeaned by nilearn), one row per volume of the run.
    sample_mask : ndarray of int or None
        Kept volumes when the preset censors some.
    info : dict
        ``preset``, ``load_confounds`` (the arguments), ``regressors``,
        ``dropped_for_design_correlation`` (task).
    """
    from nilearn.interfaces.fmriprep import load_confounds

    params = preset_parameters(preset, **options)
    if not params["strategy"]:
        return None, None, {"preset": preset, "load_confounds": params, "regressors": []}
    image = _fmriprep_view(confounds_tsv, confounds_json, Path(work_dir) / "fmriprep_view")
    confounds, sample_mask = load_confounds(image, **{**params, "strategy": tuple(params["strategy"])})
    info: dict = {"preset": preset, "load_confounds": params}
    if preset == "task":
        if design_T is None:
            raise ValueError("the 'task' preset needs the run's design (an events.tsv)")
        cosine = [c for c in confounds.columns if c.startswith("cosine")]
        drift = confounds[cosine].to_numpy(dtype=float) if cosine else None
        corr = design_correlations(confounds.drop(columns=cosine), design_T, drift)
        dropped = {k: round(v, 4) for k, v in corr.items() if abs(v) > task_max_design_r}
        confounds = confounds.drop(columns=list(dropped))
        info["dropped_for_design_correlation"] = dropped
        info["task_max_design_r"] = task_max_design_r
    info["regressors"] = list(confounds.columns)
    if sample_mask is not None:
        sample_mask = np.asarray(sample_mask, dtype=int)
    return confounds, sample_mask, info


def write_design(path: str | Path, design_T: np.ndarray) -> Path:
    """One-column TSV (``design``) of the HRF-convolved design."""
    np.savetxt(path, np.asarray(design_T, dtype=np.float64)[:, None], header="design", comments="", fmt="%.10g")
    return Path(path)


def read_design(path: str | Path) -> np.ndarray:
    """The design written by :func:`write_design`."""
    return np.loadtxt(path, skiprows=1, ndmin=1)


def clean_series(
    signals_TR: np.ndarray, confounds, sample_mask: np.ndarray | None, repetition_time: float, *,
    detrend: bool = True, standardize: bool = False, low_pass: float = 0.0,
) -> np.ndarray:
    """``nilearn.signal.clean`` of ROI series with a preset's confounds.

    The high-pass is in the confounds (cosine terms), so no filter runs
    unless ``low_pass`` > 0 (Butterworth). Cleaning is linear and the same
    for every column, so cleaning ROI means equals averaging cleaned voxels.
    Returns only the kept volumes when ``sample_mask`` censors some.
    """
    from nilearn.signal import clean

    regressors = None if confounds is None or confounds.shape[1] == 0 else confounds.to_numpy(dtype=np.float64)
    n_kept = signals_TR.shape[0] if sample_mask is None else len(sample_mask)
    if n_kept < 3 or (regressors is not None and n_kept <= regressors.shape[1] + 1):
        raise ValueError(f"{n_kept} volumes left for {0 if regressors is None else regressors.shape[1]} regressors")
    return clean(
        np.asarray(signals_TR, dtype=np.float64), detrend=detrend,
        standardize="zscore_sample" if standardize else None,
        confounds=regressors, standardize_confounds=True,
        low_pass=low_pass if low_pass > 0 else None, high_pass=None, t_r=repetition_time,
        filter="butterworth" if low_pass > 0 else False,
        sample_mask=sample_mask, ensure_finite=True,
    )
