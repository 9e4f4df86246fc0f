"""Reference distributions of the anatomical QC metrics on real clean scans (curation layer 2).

The shipped table ``qc/data/reference_anat.tsv`` holds, per modality and
metric, the median and a robust scale of the metric over clean real scans
from several sources (scanners, field strengths, ages, pathology). It is
regenerated from a preprocessed dataset by
``benchmarks/qc_generalisation.py reference``. A scan's robust z for a metric
is ``(value - median) / scale``, signed so that a positive ``z_bad`` means
"further in the direction of degradation" (:data:`DIRECTION`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import InputError

__all__ = [
    "ACQUISITION_METRICS",
    "ANATOMY_METRICS",
    "ANAT_METRICS",
    "ANAT_MODALITIES",
    "DIRECTION",
    "NOT_REFERENCED",
    "POOLED_METRICS",
    "REFERENCE_COLUMNS",
    "REFERENCE_METRICS",
    "bad_z",
    "build_reference",
    "contrast_judged",
    "direction",
    "directed_z",
    "load_reference",
    "raw_z_frame",
    "shipped_reference_path",
    "site_shift",
    "site_shifts",
    "z_frame",
]

ANAT_MODALITIES = ("T1w", "T2w", "FLAIR")

#: Direction of degradation per metric: +1 higher is better (fails when too low), -1 lower is
#: better (fails when too high), 0 both ways. Per-modality exceptions in ``_DIRECTION_BY_MODALITY``.
DIRECTION: dict[str, int] = {
    "correlation": 1,
    "edge_correlation": 1,
    "nmi": 1,
    "mi": 1,
    "psnr": 1,
    "brain_coverage": 1,
    "snr": 1,
    "cnr": 1,
    "cjv": -1,
    "efc": -1,
    "fber": 1,
    "wm2max": 0,
    "inu_range": -1,
    "wm_gm_ratio": 0,
    "csf_gm_ratio": 0,
    "blur_ap_lr": 0,
    "air_signal": -1,
    "brain_holes": -1,
    "signal_void": -1,
    "wm_trend": -1,
}
# FLAIR is compared with the T2 template: its correlation is negative (CSF dark vs bright) and noise
# or a wrong contrast can move it either way, so it is judged both ways against real FLAIRs.
_DIRECTION_BY_MODALITY = {("FLAIR", "correlation"): 0}

#: Metrics measured and reported but not judged against the reference, and why (issue 16; on the
#: leave-one-source-out benchmark these three caused false rejects of clean scans and no catch that
#: another metric did not make).
NOT_REFERENCED: dict[str, str] = {
    # Zero-filled, defaced or 8-bit backgrounds make the air noise vanish: across clean sources FBER
    # spans orders of magnitude (robust scale ~90x its median on T1w), so it says how a scanner
    # stores the background, not how good the scan is.
    "fber": "depends on how the background is stored",
    # Dark CSF counts as a hole on T1w and FLAIR, so the fraction grows with atrophy (clean FLAIRs
    # aged 76-96: up to 0.05 against 0.002 for young T1w); signal_void measures voids instead.
    "brain_holes": "grows with age (CSF is dark); superseded by signal_void",
    # Exactly 0 on every clean scan: no robust scale; judged by the absolute rule max_signal_void.
    "signal_void": "judged by an absolute rule",
}

#: Every anatomical QC metric with a direction of degradation (the reference ones and the others).
ANAT_METRICS: tuple[str, ...] = tuple(DIRECTION)
REFERENCE_METRICS: tuple[str, ...] = tuple(m for m in DIRECTION if m not in NOT_REFERENCED)

#: Metrics that do not depend on the contrast (a relative field range, a fraction, a ratio of a scan
#: to itself): their reference pools the clean scans of every modality, so that a modality seen at
#: few sites (T2w, FLAIR) is still judged against many scanners.
POOLED_METRICS: frozenset[str] = frozenset(
    {"inu_range", "brain_coverage", "blur_ap_lr", "air_signal", "wm_trend"}
)
REFERENCE_COLUMNS = ("modality", "metric", "direction", "median", "scale", "n", "n_sources")

#: Reference metrics that depend on the person as well as on the acquisition: similarity to the
#: template and tissue intensity ratios move with age, atrophy and lesions (in the corpus, the clean
#: scans of one 76-96-year-old with marked lesions sit at robust z ~4.8 on template correlation
#: within their site), and a FLAIR's brightest tissue, hence its WM-to-maximum ratio, is often a lesion.
ANATOMY_METRICS: frozenset[str] = frozenset(
    {"correlation", "edge_correlation", "nmi", "mi", "psnr", "wm_gm_ratio", "csf_gm_ratio", "wm2max"}
)
#: The reference metrics that describe the acquisition (noise, contrast, ghosting, bias, blur, coverage):
#: what the scans of one site share whoever is scanned, so the metrics the dataset layer judges.
ACQUISITION_METRICS: tuple[str, ...] = tuple(m for m in REFERENCE_METRICS if m not in ANATOMY_METRICS)


def contrast_judged(df: pd.DataFrame) -> pd.DataFrame:
    """The metrics the reference and the classifier may judge, row by row.

    A scan acquired with a contrast agent (a non-empty BIDS ``ce`` entity, column ``ce``) has no
    reference of its own: gadolinium brightens vessels, dura and enhancing tissue, so its tissue
    contrast, template similarity and grey/white overlap differ from the plain scans of its modality
    that the reference describes, whatever its quality. For such rows every metric outside
    :data:`POOLED_METRICS` (which do not depend on the contrast) is set to NaN, so that it is measured
    and reported but not judged. Rows without ``ce`` (or a table without the column) are unchanged.
    """
    if "ce" not in df.columns:
        return df
    enhanced = df["ce"].fillna("").astype(str).str.len().to_numpy() > 0
    if not enhanced.any():
        return df
    out = df.copy()
    dependent = [m for m in ANAT_METRICS if m in out.columns and m not in POOLED_METRICS]
    out.loc[enhanced, dependent] = np.nan
    return out


def direction(modality: str, metric: str) -> int:
    """Direction of degradation of ``metric`` for ``modality`` (see :data:`DIRECTION`)."""
    return _DIRECTION_BY_MODALITY.get((modality, metric), DIRECTION[metric])


def shipped_reference_path() -> Path:
    """Path of the reference table shipped with the package."""
    return Path(str(resources.files("qc") / "data" / "reference_anat.tsv"))


#: Floor of the robust scale, relative to |median|: with a handful of sources a metric can look
#: tighter than it is on the next scanner (e.g. five ds000011 T2w scans within 0.01 of each other).
REL_SCALE_FLOOR = 0.05


def _scale(values: np.ndarray, median: float, source_medians: np.ndarray | None = None) -> float:
    """Robust scale: the largest of 1.4826 MAD, the SD of the per-source medians (a new scanner is
    expected to differ by about that much) and ``REL_SCALE_FLOOR`` * |median| (1e-6 at least)."""
    mad = 1.4826 * float(np.median(np.abs(values - median)))
    between = float(np.std(source_medians, ddof=1)) if source_medians is not None and len(source_medians) > 1 else 0.0
    return max(mad, between, REL_SCALE_FLOOR * abs(median), 1e-6)


def build_reference(df: pd.DataFrame, source_column: str | None = None) -> pd.DataFrame:
    """Reference table from clean scans: one row per (modality, metric).

    Parameters
    ----------
    df : DataFrame
        One row per clean scan with ``modality`` and metric columns.
    source_column : str, optional
        Column naming each scan's source; when given, every source gets the
        same total weight (its scans' values are repeated so each source
        contributes as many values as the largest one), so that a source with
        many scans does not define the reference alone.

    Notes
    -----
    Metrics in :data:`POOLED_METRICS` use the clean scans of every modality
    (the row is still written per modality, so that lookups stay per modality).
    """
    df = contrast_judged(df)  # a contrast-enhanced scan says nothing about the contrast of plain ones
    rows = []
    for modality in ANAT_MODALITIES:
        own = df[df["modality"] == modality]
        if own.empty:
            continue
        for metric in REFERENCE_METRICS:
            sub = df[df["modality"].isin(ANAT_MODALITIES)] if metric in POOLED_METRICS else own
            if metric not in sub.columns:
                continue
            vals = pd.to_numeric(sub[metric], errors="coerce")
            keep = np.isfinite(vals.to_numpy(dtype=float))
            if keep.sum() < 2:
                continue
            values = vals.to_numpy(dtype=float)[keep]
            n_sources = 1
            source_medians = None
            if source_column:
                sources = sub[source_column].to_numpy()[keep]
                groups = [values[sources == s] for s in pd.unique(sources)]
                n_sources = len(groups)
                most = max(len(g) for g in groups)
                values = np.concatenate([np.resize(g, most) for g in groups])
                source_medians = np.array([np.median(g) for g in groups])
            med = float(np.median(values))
            rows.append({
                "modality": modality, "metric": metric, "direction": direction(modality, metric),
                "median": med, "scale": _scale(values, med, source_medians), "n": int(keep.sum()),
                "n_sources": n_sources,
            })
    return pd.DataFrame(rows, columns=list(REFERENCE_COLUMNS))


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """Read a reference table (default: the shipped one).

    Raises
    ------
    InputError
        When the file is missing or lacks columns.
    """
    path = Path(path) if path else shipped_reference_path()
    try:
        ref = pd.read_csv(path, sep="\t")
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read QC reference table ({exc})") from None
    missing = [c for c in REFERENCE_COLUMNS if c not in ref.columns]
    if missing:
        raise InputError(path, f"QC reference table lacks columns {missing}")
    return ref


def _towards_degradation(z: np.ndarray, direction_: int) -> np.ndarray:
    """Raw robust z signed so that positive = towards degradation (``|z|`` for two-sided metrics)."""
    return np.abs(z) if direction_ == 0 else -direction_ * z


def _signed_z(values: np.ndarray, median: float, scale: float, direction_: int) -> np.ndarray:
    """Robust z of ``values`` signed so that positive = towards degradation (``|z|`` for two-sided metrics)."""
    return _towards_degradation((values - median) / scale, direction_)


def bad_z(metrics: Mapping[str, float], modality: str, reference: pd.DataFrame) -> dict[str, float]:
    """Robust z of each metric against the reference, positive = towards degradation.

    Two-sided metrics (direction 0) give ``|z|``. Metrics missing from the
    scan or the reference, or NaN, and rows of metrics outside
    :data:`REFERENCE_METRICS` (an older table), are left out.
    """
    out = {}
    ref = reference[(reference["modality"] == modality) & reference["metric"].isin(REFERENCE_METRICS)]
    for r in ref.itertuples(index=False):
        value = metrics.get(r.metric)
        if value is None:
            continue
        value = float(value)
        if not np.isfinite(value):
            continue
        out[str(r.metric)] = float(_signed_z(np.float64(value), float(r.median), float(r.scale), int(r.direction)))
    return out


def raw_z_frame(df: pd.DataFrame, reference: pd.DataFrame, metrics: Iterable[str] = REFERENCE_METRICS) -> pd.DataFrame:
    """``(value - median) / scale`` of every row against its modality's reference, unsigned by direction.

    One column per metric; NaN where the metric or its reference row is missing, and where the
    reference does not describe the row (a contrast-enhanced scan's contrast-dependent metrics,
    :func:`contrast_judged`). Every z of the reference, dataset-site and classifier layers comes from here.
    """
    df = contrast_judged(df)
    metrics = list(metrics)
    out = pd.DataFrame(np.nan, index=df.index, columns=metrics, dtype=float)
    mods = df["modality"].astype(str).to_numpy() if "modality" in df.columns else np.array([""] * len(df))
    for r in reference.itertuples(index=False):
        if r.metric not in out.columns or r.metric not in df.columns or r.metric not in REFERENCE_METRICS:
            continue
        rows = mods == str(r.modality)
        if not rows.any():
            continue
        values = pd.to_numeric(df[r.metric], errors="coerce").to_numpy(dtype=float)[rows]
        out.loc[out.index[rows], r.metric] = (values - float(r.median)) / float(r.scale)
    return out


def site_shift(raw_z: pd.DataFrame, modality: str, cap: float) -> pd.Series:
    """How far a site's typical scan sits from the reference towards degradation, per metric.

    The median of the site's raw z (:func:`raw_z_frame`, one row per scan of
    one modality), kept only in the direction of degradation (a site better
    than the reference earns no allowance) and at most ``cap`` reference
    scales (a site beyond the reference limit is not a style but a problem,
    and the reference layer judges it). Two-sided metrics keep the median's
    sign. Metrics without a finite value give 0.
    """
    med = raw_z.median(skipna=True).fillna(0.0)
    out = {}
    for metric, m in med.items():
        d = direction(modality, str(metric)) if metric in DIRECTION else 0
        lo, hi = {1: (-cap, 0.0), -1: (0.0, cap), 0: (-cap, cap)}[d]
        out[metric] = float(np.clip(m, lo, hi))
    return pd.Series(out, index=raw_z.columns, dtype=float)


def site_shifts(
    df: pd.DataFrame, reference: pd.DataFrame, metrics: Iterable[str], site: pd.Series, min_group: int, cap: float,
) -> pd.DataFrame:
    """:func:`site_shift` of each row's (modality, site) group; 0 for rows whose site is NaN/empty or
    whose group has fewer than ``min_group`` scans (or ``min_group`` <= 0)."""
    metrics = list(metrics)
    out = pd.DataFrame(0.0, index=df.index, columns=metrics)
    if min_group <= 0 or df.empty:
        return out
    raw = raw_z_frame(df, reference, metrics)
    known = site.notna() & (site.astype(str) != "")
    keys = pd.DataFrame({"modality": df["modality"].astype(str), "site": site.astype(str)})[known]
    for (modality, _), group in keys.groupby(["modality", "site"], sort=False):
        if len(group) >= min_group and modality in ANAT_MODALITIES:
            out.loc[group.index] = site_shift(raw.loc[group.index], modality, cap).to_numpy()[None, :]
    return out


def z_frame(
    df: pd.DataFrame, reference: pd.DataFrame, metrics: Iterable[str] = REFERENCE_METRICS,
    shift: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """``bad_z`` of every row of a metrics table, one column per metric (NaN where not defined).

    ``shift`` (same index, metric columns; :func:`site_shifts`) is subtracted from the raw z before
    the direction is applied: the z is then measured from the site's typical scan.
    """
    raw = raw_z_frame(df, reference, metrics)
    if shift is not None:
        raw = raw - shift.reindex(index=raw.index, columns=raw.columns).fillna(0.0)
    mods = df["modality"].astype(str).to_numpy() if "modality" in df.columns else np.array([""] * len(df))
    return directed_z(raw, mods, reference)


def directed_z(raw: pd.DataFrame, modalities: np.ndarray, reference: pd.DataFrame) -> pd.DataFrame:
    """Raw robust z (:func:`raw_z_frame`, possibly shifted) signed towards degradation, row by row.

    ``modalities`` gives each row's modality; the direction of each (modality,
    metric) is the reference row's (two-sided metrics give ``|z|``).
    """
    out = raw.copy()
    for r in reference.itertuples(index=False):
        if r.metric not in out.columns:
            continue
        rows = out.index[modalities == str(r.modality)]
        out.loc[rows, r.metric] = _towards_degradation(raw.loc[rows, r.metric].to_numpy(dtype=float), int(r.direction))
    return out
