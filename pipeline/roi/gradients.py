"""Connectivity gradients: diffusion-map embedding of the group functional connectome.

Method (Margulies et al. 2016; the BrainSpace defaults):

1. Per run, Pearson correlation between ROI series; runs of a subject are
   averaged (Fisher z), then subjects are averaged (Fisher z) and the mean is
   transformed back to r. The diagonal is 1.
2. Affinity: each row keeps its ``round(R * (1 - sparsity))`` largest
   connections (others set to 0); the affinity between two ROIs is the
   normalized angle ``1 - arccos(cos_sim) / pi`` between their sparse rows;
   negative values are set to 0.
3. Diffusion maps with anisotropy ``alpha``: ``W_a = D^-a W D^-a``,
   ``P = D_a^-1 W_a``. Its eigenvectors come from the symmetric matrix
   ``D_a^-1/2 W_a D_a^-1/2`` (same eigenvalues, exact ``eigh``), so the
   result does not depend on a Lanczos start vector. The trivial eigenvector
   is divided out (``psi_i / psi_0``) and dropped, which leaves the
   eigenvectors orthonormal under the stationary distribution
   (``sum_j pi_j psi_i(j)^2 = 1``, Coifman & Lafon); eigenvalues are scaled
   by ``lambda / (1 - lambda)`` (``diffusion_time = 0``, multi-scale) or
   ``lambda ** t``; gradient i = ``psi_i * scaled lambda_i``.

Conventions
-----------
Order: gradients are sorted by descending eigenvalue (``g1`` explains the
most variance). Sign: each gradient is multiplied by the sign of its
largest-magnitude entry, so that entry is positive (as BrainSpace). With a
reference gradient file, gradients are instead aligned to it by orthogonal
Procrustes (or by sign flips only), on the ROIs the two share.
Variance explained: raw eigenvalue over the sum of all positive non-trivial
eigenvalues of ``P``.

Zero-variance ROIs (e.g. outside a subject's field of view) have no defined
correlation in that run: they are left out of that run's average and the
group connectome averages each pair over the runs where both ROIs vary. ROIs
that never vary are dropped from the embedding and written as ``n/a``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import InputError

__all__ = [
    "Embedding",
    "affinity_matrix",
    "align_gradients",
    "average_fisher_z",
    "diffusion_map",
    "group_connectome",
    "procrustes_rotation",
    "read_gradients",
    "run_correlation",
    "run_fisher_z",
]

log = logging.getLogger(__name__)

_R_CLIP = 1 - 1e-7  # keeps arctanh finite


def run_correlation(series_TR: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Pearson correlation between ROI columns; NaN rows/columns for constant ROIs.

    Parameters
    ----------
    series_TR : ndarray, shape (T, R)
    rtol : float
        A column is constant when its SD is at most ``rtol`` times its mean
        absolute value (plus a tiny floor).

    Returns
    -------
    corr_RR : ndarray, shape (R, R)
    """
    x = np.asarray(series_TR, dtype=np.float64)
    x = x - x.mean(axis=0)
    sd = np.sqrt((x**2).sum(axis=0))
    scale = np.abs(series_TR).mean(axis=0) * np.sqrt(x.shape[0])
    valid = sd > rtol * scale + 1e-12
    x[:, valid] /= sd[valid]
    corr = x.T @ x
    corr[~valid, :] = np.nan
    corr[:, ~valid] = np.nan
    return np.clip(corr, -1.0, 1.0)


def run_fisher_z(series_TR: np.ndarray) -> np.ndarray:
    """Fisher z of one run's ROI correlation (NaN for constant ROIs); the per-run part of :func:`group_connectome`."""
    return np.arctanh(np.clip(run_correlation(series_TR), -_R_CLIP, _R_CLIP))


def average_fisher_z(z_runs: Sequence[np.ndarray], subjects: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Group connectome from per-run Fisher z matrices (:func:`run_fisher_z`), runs of a subject first.

    Parameters
    ----------
    z_runs : sequence of ndarray, shape (R, R)
    subjects : sequence of str
        Subject of each run.

    Returns
    -------
    conn_RR, n_RR : ndarray
        As :func:`group_connectome`.
    """
    if not len(z_runs):
        raise ValueError("no runs to average")
    n_rois = z_runs[0].shape[0]
    per_subject: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for z, subject in zip(z_runs, subjects, strict=True):
        if z.shape != (n_rois, n_rois):
            raise ValueError(f"run of {subject} has {z.shape[0]} ROIs, expected {n_rois}")
        ok = np.isfinite(z)
        total, count = per_subject.get(subject, (np.zeros((n_rois, n_rois)), np.zeros((n_rois, n_rois))))
        per_subject[subject] = (total + np.where(ok, z, 0.0), count + ok)
    z_sum = np.zeros((n_rois, n_rois))
    n_sub = np.zeros((n_rois, n_rois), dtype=np.int64)
    for total, count in per_subject.values():
        seen = count > 0
        z_sum[seen] += total[seen] / count[seen]
        n_sub += seen
    with np.errstate(invalid="ignore", divide="ignore"):
        conn = np.tanh(z_sum / n_sub)
    conn[n_sub == 0] = np.nan
    np.fill_diagonal(conn, np.where(np.diag(n_sub) > 0, 1.0, np.nan))
    return conn, n_sub


def group_connectome(runs: Sequence[np.ndarray], subjects: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean (Fisher z) correlation matrix over runs, runs of a subject first.

    Parameters
    ----------
    runs : sequence of ndarray, shape (T_i, R)
        ROI series; the R columns must be the same ROIs in every run.
    subjects : sequence of str, optional
        Subject of each run; runs of one subject are averaged before subjects
        are, so subjects with more runs do not weigh more.

    Returns
    -------
    conn_RR : ndarray
        Group correlation (r), diagonal 1, NaN for pairs never observed.
    n_RR : ndarray of int
        Number of subjects contributing to each pair.
    """
    if not runs:
        raise ValueError("no runs to average")
    subjects = list(subjects) if subjects is not None else [str(i) for i in range(len(runs))]
    n_rois = runs[0].shape[1]
    for series, subject in zip(runs, subjects):
        if series.shape[1] != n_rois:
            raise ValueError(f"run of {subject} has {series.shape[1]} ROIs, expected {n_rois}")
    return average_fisher_z([run_fisher_z(series) for series in runs], subjects)


def affinity_matrix(conn_RR: np.ndarray, sparsity: float = 0.9, kernel: str = "normalized_angle") -> np.ndarray:
    """Row-wise sparsified connectome -> symmetric non-negative affinity.

    Parameters
    ----------
    conn_RR : ndarray
        Square connectome without NaN.
    sparsity : float
        Fraction of the smallest entries of each row set to 0 (0.9 keeps the
        top 10 %).
    kernel : {"normalized_angle", "cosine"}
        Similarity between the sparsified rows.
    """
    if conn_RR.ndim != 2 or conn_RR.shape[0] != conn_RR.shape[1]:
        raise ValueError(f"connectome must be square, got {conn_RR.shape}")
    if not np.all(np.isfinite(conn_RR)):
        raise ValueError("connectome holds NaN; drop the ROIs without data first")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    n = conn_RR.shape[0]
    keep = max(1, int(round(n * (1.0 - sparsity))))
    x = np.zeros_like(conn_RR, dtype=np.float64)
    top = np.argpartition(conn_RR, n - keep, axis=1)[:, n - keep :]
    rows = np.arange(n)[:, None]
    x[rows, top] = conn_RR[rows, top]
    norms = np.linalg.norm(x, axis=1)
    norms[norms == 0] = 1.0
    xn = x / norms[:, None]
    cos = np.clip(xn @ xn.T, -1.0, 1.0)
    if kernel == "normalized_angle":
        aff = 1.0 - np.arccos(cos) / np.pi
    elif kernel == "cosine":
        aff = cos
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    aff[aff < 0] = 0.0
    return (aff + aff.T) / 2.0


@dataclass(frozen=True)
class Embedding:
    """Diffusion map of one affinity matrix."""

    gradients_RK: np.ndarray
    eigenvalues: np.ndarray  # scaled (multi-scale or ** t), as multiplied into the gradients
    raw_eigenvalues: np.ndarray  # eigenvalues of P, trivial one excluded
    variance_explained: np.ndarray


def diffusion_map(affinity_RR: np.ndarray, n_components: int = 30, alpha: float = 0.5, diffusion_time: float = 0.0) -> Embedding:
    """Diffusion-map embedding of a symmetric non-negative affinity.

    Parameters
    ----------
    affinity_RR : ndarray
        Symmetric, non-negative, every row with a positive sum.
    n_components : int
        Number of gradients (at most R - 1).
    alpha : float
        Anisotropic diffusion parameter in [0, 1].
    diffusion_time : float
        0 for multi-scale ``lambda / (1 - lambda)``, else ``lambda ** t``.

    Returns
    -------
    Embedding
        Gradients in descending eigenvalue order, sign-fixed so the
        largest-magnitude entry of each is positive.
    """
    w = np.asarray(affinity_RR, dtype=np.float64)
    n = w.shape[0]
    if w.ndim != 2 or n != w.shape[1]:
        raise ValueError(f"affinity must be square, got {w.shape}")
    if not np.allclose(w, w.T, atol=1e-10):
        raise ValueError("affinity must be symmetric")
    if np.any(w < 0):
        raise ValueError("affinity must be non-negative")
    if not 1 <= n_components <= n - 1:
        raise ValueError(f"n_components must be in [1, {n - 1}], got {n_components}")
    d = w.sum(axis=1)
    if np.any(d <= 0):
        raise ValueError("every ROI needs a positive affinity to some ROI")
    if alpha > 0:
        da = d**-alpha
        w = w * da[:, None] * da[None, :]
    d_alpha = w.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(d_alpha)
    sym = w * inv_sqrt[:, None] * inv_sqrt[None, :]
    evals, evecs = np.linalg.eigh((sym + sym.T) / 2.0)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    psi = evecs * inv_sqrt[:, None]  # right eigenvectors of P
    psi = psi / psi[:, [0]]
    evals = evals / evals[0]
    raw = evals[1:]
    positive = raw[raw > 0]
    var_all = raw / positive.sum() if positive.size else np.zeros_like(raw)
    lam = raw[:n_components]
    psi = psi[:, 1 : n_components + 1]
    if diffusion_time <= 0:
        scaled = lam / (1.0 - lam)
    else:
        scaled = lam**diffusion_time
    grads = psi * scaled[None, :]
    grads = grads * _sign_of_max(grads)[None, :]
    return Embedding(grads, scaled, lam, var_all[:n_components])


def _sign_of_max(g_RK: np.ndarray) -> np.ndarray:
    """Per column, the sign of its largest-magnitude entry; among entries tied within 1e-9 (relative), the first.

    Without the tolerance a tie (e.g. two equal blocks, entries +-c) is broken by rounding noise, so the sign
    would depend on the BLAS build.
    """
    mag = np.abs(g_RK)
    idx = (mag >= mag.max(axis=0) * (1 - 1e-9)).argmax(axis=0)
    signs = np.sign(g_RK[idx, np.arange(g_RK.shape[1])])
    signs[signs == 0] = 1.0
    return signs


def procrustes_rotation(source_NK: np.ndarray, target_NK: np.ndarray) -> np.ndarray:
    """Orthogonal ``Q`` minimising ``||source @ Q - target||_F`` (Schoenemann)."""
    u, _, vt = np.linalg.svd(source_NK.T @ target_NK)
    return u @ vt


def align_gradients(grads_RK: np.ndarray, reference_RK: np.ndarray, method: str = "procrustes") -> np.ndarray:
    """Align gradients to a reference on the same ROIs (NaN rows are ignored).

    The first ``k = min(K, K_ref)`` gradients are aligned (rotated by
    Procrustes, or flipped in sign so each correlates positively with its
    reference); any further gradients keep their own sign.
    """
    k = min(grads_RK.shape[1], reference_RK.shape[1])
    ok = np.all(np.isfinite(grads_RK[:, :k]), axis=1) & np.all(np.isfinite(reference_RK[:, :k]), axis=1)
    if ok.sum() <= k:
        raise ValueError(f"only {int(ok.sum())} ROIs shared with the reference; need more than {k}")
    out = grads_RK.copy()
    src, ref = grads_RK[ok, :k], reference_RK[ok, :k]
    if method == "procrustes":
        out[:, :k] = grads_RK[:, :k] @ procrustes_rotation(src, ref)
    elif method == "sign":
        signs = np.sign(np.sum((src - src.mean(0)) * (ref - ref.mean(0)), axis=0))
        signs[signs == 0] = 1.0
        out[:, :k] = grads_RK[:, :k] * signs[None, :]
    else:
        raise ValueError(f"unknown alignment {method!r}")
    return out


def read_gradients(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a gradients TSV (``roi``, ``g1``..``gk``) into ``(roi names, values_RK)``."""
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"])
    except FileNotFoundError:
        raise InputError(path, "reference gradient file does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable TSV ({exc})") from None
    cols = [c for c in table.columns if c != "roi"]
    if "roi" not in table.columns or not cols or not all(c.startswith("g") and c[1:].isdigit() for c in cols):
        raise InputError(path, "expected columns roi, g1, g2, ...")
    try:
        values = table[cols].to_numpy(dtype=np.float64)
    except ValueError:
        raise InputError(path, "gradient values must be numbers") from None
    return [str(r) for r in table["roi"]], values
