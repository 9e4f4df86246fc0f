"""Confound signals of a BOLD run, in plain numpy.

Everything here works on arrays, so it is unit-tested against hand-computed
values and reused outside nipype. Column names follow the BIDS / fMRIPrep
confounds convention (``trans_x``, ``rot_z_derivative1_power2``,
``framewise_displacement``, ``dvars``, ``global_signal``, ...).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "MOTION_NAMES",
    "dvars",
    "expand_regressors",
    "framewise_displacement",
    "lag1_autocorrelation",
    "leading_outliers",
    "motion_regressor_names",
    "rigid_parameters",
]

MOTION_NAMES = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")


def framewise_displacement(params_T6: np.ndarray, radius_mm: float = 50.0) -> np.ndarray:
    """Framewise displacement (Power et al., 2012).

    Parameters
    ----------
    params_T6 : ndarray, shape (T, 6)
        Translations (mm) then rotations (radians), one row per volume.
    radius_mm : float
        Radius of the sphere that turns rotations into arc length.

    Returns
    -------
    fd_T : ndarray, shape (T,)
        Sum of absolute backward differences; 0 for the first volume, which
        has no predecessor.
    """
    params_T6 = np.asarray(params_T6, dtype=np.float64)
    if params_T6.ndim != 2 or params_T6.shape[1] != 6:
        raise ValueError(f"motion parameters must have shape (T, 6), got {params_T6.shape}")
    diff = np.abs(np.diff(params_T6, axis=0))
    fd = diff[:, :3].sum(axis=1) + radius_mm * diff[:, 3:].sum(axis=1)
    return np.concatenate([[0.0], fd])


def lag1_autocorrelation(x_VT: np.ndarray) -> np.ndarray:
    """Lag-1 autocorrelation of every row (demeaned); 0 for constant rows."""
    x = np.asarray(x_VT, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    num = (x[:, 1:] * x[:, :-1]).sum(axis=1)
    den = (x * x).sum(axis=1)
    out = np.zeros(x.shape[0])
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def dvars(data_VT: np.ndarray, intensity_normalization: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    """DVARS (Power et al., 2012) and its standardised form (Nichols, 2013).

    Parameters
    ----------
    data_VT : ndarray, shape (V, T)
        Brain voxels by volumes.
    intensity_normalization : float
        The data are first scaled so their overall median equals this value
        (as nipype's ``ComputeDVARS``), making DVARS comparable across runs;
        0 leaves them unscaled.

    Returns
    -------
    dvars_T : ndarray, shape (T,)
        Root mean square over voxels of the backward temporal difference;
        NaN for the first volume.
    std_dvars_T : ndarray, shape (T,)
        ``dvars_T`` divided by its expected value under stationarity: the
        mean over voxels of ``sqrt(2 (1 - ar1)) * robust_sd`` (robust SD from
        the inter-quartile range / 1.349, ar1 the lag-1 autocorrelation).
    """
    data = np.asarray(data_VT, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] < 2:
        raise ValueError(f"DVARS needs (voxels, volumes >= 2) data, got shape {data.shape}")
    if intensity_normalization:
        median = np.median(data)
        if median == 0:
            raise ValueError("cannot normalise intensities: the median brain intensity is 0")
        data = data * (intensity_normalization / median)
    diff_VT = np.diff(data, axis=1)
    dv = np.sqrt(np.mean(diff_VT**2, axis=0))
    q75, q25 = np.percentile(data, [75, 25], axis=1)
    robust_sd_V = (q75 - q25) / 1.349
    ar1_V = lag1_autocorrelation(data)
    expected = float(np.mean(np.sqrt(np.clip(2.0 * (1.0 - ar1_V), 0.0, None)) * robust_sd_V))
    std = dv / expected if expected > 0 else np.full_like(dv, np.nan)
    nan = np.array([np.nan])
    return np.concatenate([nan, dv]), np.concatenate([nan, std])


def expand_regressors(x_TK: np.ndarray, names: list[str] | tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """Add backward derivatives, squares and squared derivatives (Friston 24 style).

    Returns
    -------
    out_TK4 : ndarray, shape (T, 4K)
        Columns per input regressor, in order: ``x``, ``x_derivative1``,
        ``x_power2``, ``x_derivative1_power2``; the derivative's first row is NaN.
    out_names : list of str
    """
    x = np.asarray(x_TK, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.shape[1] != len(names):
        raise ValueError(f"{x.shape[1]} regressors but {len(names)} names")
    deriv = np.vstack([np.full((1, x.shape[1]), np.nan), np.diff(x, axis=0)])
    cols, out_names = [], []
    for k, name in enumerate(names):
        cols += [x[:, k], deriv[:, k], x[:, k] ** 2, deriv[:, k] ** 2]
        out_names += [name, f"{name}_derivative1", f"{name}_power2", f"{name}_derivative1_power2"]
    return np.column_stack(cols), out_names


def motion_regressor_names(n: int) -> list[str]:
    """Names of the 0, 6, 12 (+ derivatives) or 24 (+ squares) motion regressors."""
    if n == 0:
        return []
    if n == 6:
        return list(MOTION_NAMES)
    if n == 12:
        return list(MOTION_NAMES) + [f"{m}_derivative1" for m in MOTION_NAMES]
    if n == 24:
        return [f"{m}{s}" for m in MOTION_NAMES for s in ("", "_derivative1", "_power2", "_derivative1_power2")]
    raise ValueError(f"motion regressors must be 0, 6, 12 or 24, got {n}")


def leading_outliers(signal_T: np.ndarray, threshold: float = 3.5, window: int = 50) -> int:
    """Number of leading volumes whose global signal is an outlier (non-steady state).

    The modified z-score ``0.6745 |x - median| / MAD`` is computed over the
    first ``window`` volumes (as nipype's ``NonSteadyStateDetector``); the
    count stops at the first volume at or below ``threshold``.
    """
    x = np.asarray(signal_T, dtype=np.float64)[:window]
    if x.size < 3:
        return 0
    dev = np.abs(x - np.median(x))
    mad = np.median(dev)
    if mad == 0:
        # A perfectly flat steady state: any deviation at all is an outlier.
        z = np.where(dev > 0, np.inf, 0.0)
    else:
        z = 0.6745 * dev / mad
    n = 0
    for value in z:
        if value <= threshold:
            break
        n += 1
    return n


def rigid_parameters(matrix_33: np.ndarray, translation_3: np.ndarray) -> np.ndarray:
    """Translations and Euler angles of a rigid transform ``y = R x + t``.

    Angles follow ``R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x)`` (radians), so a
    rotation about a single axis gives that axis's angle exactly.

    Returns
    -------
    params_6 : ndarray
        ``trans_x, trans_y, trans_z, rot_x, rot_y, rot_z``.
    """
    r = np.asarray(matrix_33, dtype=np.float64)
    rot_y = -np.arcsin(np.clip(r[2, 0], -1.0, 1.0))
    rot_x = np.arctan2(r[2, 1], r[2, 2])
    rot_z = np.arctan2(r[1, 0], r[0, 0])
    return np.array([*np.asarray(translation_3, dtype=np.float64), rot_x, rot_y, rot_z])
