"""Curation in four layers: absolute rules, reference rules, dataset outliers, classifier; reviewer overrides.

A scan fails (``qc_pass`` False) when any layer rejects it; ``qc_layer``
names the layers that did, ``failed_rules`` lists the machine-readable
failures and ``qc_reason`` says why in words.

1. **absolute** - physically unambiguous limits, the ``min_<metric>`` /
   ``max_<metric>`` fields of each modality's section of
   :class:`pipeline.core.config.QCConfig` (template-brain coverage, the
   contrast signature of the modality; BOLD and ROI-series limits).
2. **reference** - each anatomical metric against its distribution on real
   clean scans of the same modality (:mod:`qc.reference`): robust z beyond
   ``reference_z_limit`` in the direction of degradation.
3. **dataset** - robust z within the scan's (modality, site) group of the
   dataset being curated; a suggestion (``outlier_metrics``) from
   ``outlier_min_group`` scans, a rule from ``outlier_rule_min_group`` scans
   of a known site.
4. **classifier** - P(severe artifact) from :mod:`qc.classifier` at or above
   ``classifier_threshold`` (``p_artifact`` column). A scan of a known site
   with at least ``site_calibration_min_group`` scans of its modality is read
   against its site's typical scan (:func:`qc.reference.site_shifts`), so
   that a whole site's style is not taken for an artifact.

A scan acquired with a contrast agent (BIDS ``ce`` entity, ``ce`` column)
is judged by layers 2-4 on the contrast-free metrics only
(:func:`qc.reference.contrast_judged`): no reference describes it.

The final ``include`` column is the reviewer's override when one is set,
else ``qc_pass``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.atomic import atomic_path, atomic_write_text
from pipeline.core.config import QCConfig
from pipeline.core.layout import (
    CURATION_DECISION_COLUMNS,
    CURATION_ENTITY_COLUMNS,
    OutputLayout,
)
from qc.reference import (
    ACQUISITION_METRICS,
    ANAT_MODALITIES,
    DIRECTION,
    bad_z,
    contrast_judged,
    direction,
    load_reference,
    site_shifts,
)

__all__ = [
    "ENTITY_COLUMNS",
    "LAYERS",
    "TRAILING_COLUMNS",
    "apply_overrides",
    "build_table",
    "dataset_rule_z",
    "evaluate_rules",
    "mad_outliers",
    "read_table",
    "reference_failures",
    "rules_for",
    "scale_floor",
    "site_outliers",
    "table_paths",
    "write_table",
]

ENTITY_COLUMNS = CURATION_ENTITY_COLUMNS
TRAILING_COLUMNS = CURATION_DECISION_COLUMNS
LAYERS = ("absolute", "reference", "dataset", "classifier")
_SECTION = {"T1w": "t1w", "T2w": "t2w", "FLAIR": "flair", "bold": "bold", "timeseries": "timeseries"}

#: Reviewer-facing names of the metrics.
METRIC_WORDS = {
    "brain_coverage": "share of the template brain with signal",
    "wm_gm_ratio": "white-to-grey-matter intensity ratio",
    "csf_gm_ratio": "CSF-to-grey-matter intensity ratio",
    "correlation": "intensity correlation with the template",
    "edge_correlation": "edge alignment with the template",
    "nmi": "normalised mutual information with the template",
    "mi": "mutual information with the template",
    "psnr": "PSNR against the template",
    "snr": "white-matter SNR",
    "cnr": "grey/white contrast-to-noise ratio",
    "cjv": "grey/white intensity overlap (CJV)",
    "efc": "ghosting/blurring (EFC)",
    "fber": "signal in the head vs. in the air (FBER)",
    "wm2max": "white-matter-to-maximum intensity ratio",
    "inu_med": "median bias-field strength (N4)",
    "inu_range": "bias-field (intensity non-uniformity) range",
    "blur_ap_lr": "front-to-back vs. left-right sharpness (motion blur)",
    "air_signal": "signal in the air around the head (ghosting, noise)",
    "brain_holes": "share of the template brain without signal",
    "signal_void": "share of the template brain in signal voids (at least 12 mm across)",
    "wm_trend": "residual intensity trend across the white matter",
    "tsnr": "temporal SNR",
    "fd_mean": "mean head motion (FD)",
    "fd_max": "largest head movement (FD)",
    "fd_perc": "share of volumes with FD above 0.2 mm",
    "n_volumes": "number of volumes",
    "zero_variance_fraction": "share of constant ROI series",
    "n_rois": "number of atlas regions",
    "empty_roi_fraction": "share of atlas regions without signal",
    "dvars_mean": "mean frame-to-frame signal change (DVARS)",
}


def _words(metric: str) -> str:
    return METRIC_WORDS.get(metric, metric)


def rules_for(modality: str, qc: QCConfig) -> list[tuple[str, str, float]]:
    """The rules of one modality as ``(metric, "min"|"max", threshold)``.

    Raises
    ------
    ValueError
        For a modality without a threshold section.
    """
    if modality not in _SECTION:
        raise ValueError(f"no QC thresholds for modality {modality!r}; known {sorted(_SECTION)}")
    section = getattr(qc, _SECTION[modality])
    rules = []
    for f in dataclasses.fields(section):
        kind, _, metric = f.name.partition("_")
        if kind in ("min", "max") and metric:
            rules.append((metric, kind, float(getattr(section, f.name))))
    return rules


def evaluate_rules(metrics: Mapping[str, float], modality: str, qc: QCConfig) -> tuple[bool, list[str]]:
    """Apply every rule of ``modality`` to one scan's metrics.

    A metric that is missing or NaN skips its rule: it cannot be measured on
    this scan (e.g. FBER without background noise), which is not evidence of
    a bad scan.

    Returns
    -------
    (passed, failed) : tuple
        ``failed`` lists readable rule failures such as ``"snr=3.1<6"``.
    """
    failed = []
    for metric, kind, thr in rules_for(modality, qc):
        value = metrics.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        value = float(value)
        if kind == "min" and value < thr:
            failed.append(f"{metric}={value:.4g}<{thr:g}")
        elif kind == "max" and value > thr:
            failed.append(f"{metric}={value:.4g}>{thr:g}")
    return not failed, failed


def _robust(values: pd.Series) -> tuple[float, float]:
    med = float(values.median())
    return med, 1.4826 * float((values - med).abs().median())


def site_outliers(
    df: pd.DataFrame, metrics: Iterable[str], min_group: int,
    scale_floor: Mapping[tuple[str, str], float] | None = None, floored_only: Iterable[str] = (),
) -> pd.DataFrame:
    """Robust z of each metric within its (modality, site) group, positive = towards degradation.

    Metrics with a known direction (:data:`qc.reference.DIRECTION`) are
    one-sided (a scan better than its site is not an outlier); others are
    two-sided (``|z|``). Groups smaller than ``min_group`` get NaN: a median
    of three scans is not a population. The scale is 1.4826 MAD, so z reads
    as standard deviations for normal data, raised to ``scale_floor[(modality,
    metric)]`` where given; a zero scale gives NaN, and so does a metric
    without a floor in a modality of ``floored_only`` (no known spread of
    clean scans to read a site's spread against).

    Returns
    -------
    pandas.DataFrame
        Same index as ``df``, one column per metric present.
    """
    metrics = [m for m in metrics if m in df.columns]
    out = pd.DataFrame(np.nan, index=df.index, columns=metrics)
    if df.empty:
        return out
    scale_floor = scale_floor or {}
    floored_only = frozenset(floored_only)
    for (modality, _), group in df.groupby(["modality", "site"], sort=False):
        if len(group) < min_group:
            continue
        for metric in metrics:
            if modality in floored_only and (str(modality), metric) not in scale_floor:
                continue
            values = pd.to_numeric(group[metric], errors="coerce").astype(float)
            finite = values[np.isfinite(values)]
            if len(finite) < min_group:
                continue
            med, mad = _robust(finite)
            scale = max(mad, scale_floor.get((str(modality), metric), 0.0))
            if scale == 0:
                continue
            z = (finite - med) / scale
            try:
                d = direction(str(modality), metric)
            except KeyError:
                d = 0
            out.loc[finite.index, metric] = z.abs() if d == 0 else -d * z
    return out


def dataset_rule_z(df: pd.DataFrame, reference: pd.DataFrame, qc: QCConfig) -> pd.DataFrame:
    """The z-scores the dataset layer's rule judges (it fails a scan above ``qc.outlier_k``).

    Anatomical scans of a known site (``site`` not ``"unknown"``) in (modality,
    site) groups of at least ``qc.outlier_rule_min_group`` scans, on the
    metrics of the acquisition (:data:`qc.reference.ACQUISITION_METRICS`: what
    the scans of one site share whoever is scanned). Each metric's site scale
    is at least ``qc.outlier_scale_floor`` times its scale in ``reference``
    (the spread of clean scans across scanners): a protocol whose scans agree
    to a fraction of a percent does not make a fraction of a percent an
    outlier. NaN where the rule does not apply.
    """
    metrics = [m for m in ACQUISITION_METRICS if m in df.columns]
    anat = df[df["modality"].isin(ANAT_MODALITIES) & (df["site"].astype(str) != "unknown")]
    z = site_outliers(anat, metrics, max(qc.outlier_rule_min_group, 2), scale_floor(reference, qc))
    return z.reindex(df.index)


def scale_floor(reference: pd.DataFrame, qc: QCConfig) -> dict[tuple[str, str], float]:
    """``(modality, metric) -> qc.outlier_scale_floor * reference scale``: the smallest site scale of the dataset
    layer (its rule and its ``outlier_metrics`` suggestions)."""
    return {(str(r.modality), str(r.metric)): qc.outlier_scale_floor * float(r.scale)
            for r in reference.itertuples(index=False)}


def mad_outliers(
    df: pd.DataFrame, metrics: Iterable[str], k: float, min_group: int,
    scale_floor: Mapping[tuple[str, str], float] | None = None, floored_only: Iterable[str] = (),
) -> pd.Series:
    """Names of the metrics whose site-relative robust z (:func:`site_outliers`) exceeds ``k``, ``;``-joined per row."""
    z = site_outliers(df, metrics, min_group, scale_floor, floored_only)
    return pd.Series(
        [";".join(c for c in z.columns if row[c] > k) for _, row in z.iterrows()], index=df.index, dtype=str
    )


def reference_failures(
    metrics: Mapping[str, float], modality: str, reference: pd.DataFrame, limit: float
) -> list[tuple[str, float]]:
    """``(metric, z)`` of the metrics further than ``limit`` robust SDs from the clean reference towards degradation."""
    return [(m, z) for m, z in bad_z(metrics, modality, reference).items() if z > limit]


def _reason_absolute(failure: str) -> str:
    metric, _, rest = failure.partition("=")
    op = "<" if "<" in rest else ">"
    value, _, thr = rest.partition(op)
    if metric == "brain_coverage":
        return f"only {100 * float(value):.0f}% of the template brain has signal (at least {100 * float(thr):.0f}% needed): cropped, empty or a slab missing"
    if metric == "signal_void":
        return (f"signal voids at least 12 mm across fill {100 * float(value):.1f}% of the template brain "
                f"(at most {100 * float(thr):g}% allowed): missing tissue, a signal-dropout slab or a cut field of view")
    if metric in ("wm_gm_ratio", "csf_gm_ratio"):
        return f"{_words(metric)} {float(value):.2f} {'below' if op == '<' else 'above'} {thr}: the contrast is not that of the labelled modality (wrong modality or orientation)"
    return f"{_words(metric)} {value} {'below the minimum' if op == '<' else 'above the maximum'} {thr}"


def _direction_word(modality: str, metric: str) -> str:
    d = direction(modality, metric) if metric in DIRECTION else 0
    return {1: "far lower than", -1: "far higher than", 0: "far from"}[d]


def apply_overrides(df: pd.DataFrame, ratings: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    """Set ``override``/``override_comment``/``include`` from reviewer ratings keyed by ``path``.

    Ratings for paths not in the table are ignored (a scan may have been
    removed since it was rated); an empty decision clears the override.
    """
    df = df.copy()
    override = []
    comment = []
    for path in df["path"]:
        r = ratings.get(path, {})
        decision = r.get("decision", "")
        if decision not in ("include", "exclude", ""):
            raise ValueError(f"rating for {path!r} has decision {decision!r}; use include, exclude or ''")
        override.append(decision)
        comment.append(r.get("comment", "") if decision else "")
    df["override"] = override
    df["override_comment"] = comment
    df["include"] = [
        (o == "include") if o else bool(p) for o, p in zip(df["override"], df["qc_pass"], strict=True)
    ]
    return df


def _rule_failures(df: pd.DataFrame, judged: pd.DataFrame, qc: QCConfig, metric_names: list[str],
                   ratings: Mapping[str, Mapping[str, str]], reference: pd.DataFrame) -> pd.DataFrame:
    """Evaluate the four layers on every row; returns the decision columns (without overrides).

    ``judged`` is ``df`` with the metrics no layer may judge blanked (:func:`qc.reference.contrast_judged`):
    the z-scores of layers 2-4 see to that themselves (:func:`qc.reference.raw_z_frame`), the dataset layer and
    the reference rule read metric values, so they read these.
    """
    site_z = dataset_rule_z(judged, reference, qc)
    group_size = df.groupby(["modality", "site"])["path"].transform("size")
    p_artifact = np.full(len(df), np.nan)
    calibrated = pd.Series(False, index=df.index)
    if qc.classifier and df["modality"].isin(ANAT_MODALITIES).any():
        from qc import classifier

        site = df["site"].where(df["site"] != "unknown")
        shift = site_shifts(df, reference, classifier.FEATURE_METRICS, site, qc.site_calibration_min_group,
                            qc.reference_z_limit)
        calibrated = (shift != 0).any(axis=1)
        rated = classifier.rating_rows(df, ratings)
        if rated.empty:
            model = classifier.default_model(qc.classifier_training, qc.reference_table,
                                             qc.site_calibration_min_group, qc.reference_z_limit,
                                             qc.classifier_style_transplant)
        else:
            training = classifier.load_training(qc.classifier_training or None)
            model = classifier.fit(training, reference, rated, qc.rating_weight, extra_shift=shift,
                                   site_min_group=qc.site_calibration_min_group, site_cap=qc.reference_z_limit,
                                   style_transplant=qc.classifier_style_transplant)
        p_artifact = classifier.predict(model, df, reference, shift)
    out = []
    for i, (idx, row) in enumerate(df.iterrows()):
        modality = str(row["modality"])
        metrics = {m: row[m] for m in metric_names if pd.notna(row[m])}
        layers, failed, reasons = [], [], []
        ok, abs_failed = evaluate_rules(metrics, modality, qc)
        if not ok:
            layers.append("absolute")
            failed += abs_failed
            reasons += ["absolute: " + _reason_absolute(f) for f in abs_failed]
        if modality in ANAT_MODALITIES:
            judged_metrics = {m: judged.at[idx, m] for m in metric_names if pd.notna(judged.at[idx, m])}
            ref_failed = reference_failures(judged_metrics, modality, reference, qc.reference_z_limit)
            if ref_failed:
                layers.append("reference")
                failed += [f"ref:{m} z={z:.1f}>{qc.reference_z_limit:g}" for m, z in ref_failed]
                reasons += [
                    f"reference: {_words(m)} ({metrics[m]:.3g}) is {_direction_word(modality, m)} on clean {modality} scans of "
                    f"other scanners (robust z {z:.1f}, limit {qc.reference_z_limit:g})"
                    for m, z in ref_failed
                ]
            # NaN (never above the limit) where the rule does not apply: unknown site, group too small.
            site_failed = [(m, float(z)) for m, z in site_z.loc[idx].items() if z > qc.outlier_k]
            if site_failed:
                layers.append("dataset")
                failed += [f"site:{m} z={z:.1f}>{qc.outlier_k:g}" for m, z in site_failed]
                reasons += [
                    f"dataset: {_words(m)} is an outlier among the {int(group_size[idx])} {modality} scans of site "
                    f"{row['site']} (robust z {z:.1f}, limit {qc.outlier_k:g})"
                    for m, z in site_failed
                ]
            p = p_artifact[i]
            if np.isfinite(p) and p >= qc.classifier_threshold:
                layers.append("classifier")
                failed.append(f"classifier:p={p:.2f}>={qc.classifier_threshold:g}")
                against = (f", its metrics read against the typical {modality} scan of site {row['site']}"
                           if calibrated[idx] else "")
                reasons.append(
                    f"classifier: the artifact classifier gives a {100 * p:.0f}% probability of a severe artifact "
                    f"(rejects from {100 * qc.classifier_threshold:.0f}%{against})"
                )
        out.append({
            "qc_pass": not layers,
            "qc_layer": ";".join(layers),
            "failed_rules": "; ".join(failed),
            "qc_reason": "; ".join(reasons),
            "p_artifact": float(p_artifact[i]),
        })
    return pd.DataFrame(out, index=df.index)


def build_table(
    records: list[dict[str, Any]], qc: QCConfig, ratings: Mapping[str, Mapping[str, str]] | None = None
) -> pd.DataFrame:
    """Curation table from per-scan records.

    Parameters
    ----------
    records : list of dict
        One per scan: the :data:`ENTITY_COLUMNS` plus metric values.
    qc : QCConfig
    ratings : mapping, optional
        Reviewer ratings keyed by ``path`` (see :mod:`qc.review`): overrides,
        and extra labels of the layer-4 classifier.
    """
    rows = []
    metric_names: list[str] = []
    for rec in records:
        missing = [c for c in ("subject", "modality", "path") if not rec.get(c)]
        if missing:
            raise ValueError(f"curation record lacks {missing}: {rec}")
        if rec["modality"] not in _SECTION:
            raise ValueError(f"no QC thresholds for modality {rec['modality']!r}; known {sorted(_SECTION)}")
        row = {c: str(rec.get(c) or "") for c in ENTITY_COLUMNS}
        row["site"] = row["site"] or "unknown"
        metrics = {k: v for k, v in rec.items() if k not in ENTITY_COLUMNS}
        for k in metrics:
            if k not in metric_names:
                metric_names.append(k)
        rows.append({**row, **{k: float(v) for k, v in metrics.items()}})
    df = pd.DataFrame(rows, columns=[*ENTITY_COLUMNS, *metric_names])
    for m in metric_names:
        df[m] = df[m].astype(float)
    df = df.sort_values(["subject", "session", "modality", "task", "acq", "run", "path"], kind="stable").reset_index(drop=True)
    ratings = ratings or {}
    judged = contrast_judged(df)  # a contrast-enhanced scan is judged on contrast-free metrics only
    reference = load_reference(qc.reference_table or None)
    decisions = _rule_failures(df, judged, qc, metric_names, ratings, reference) if len(df) else pd.DataFrame(
        columns=["qc_pass", "qc_layer", "failed_rules", "qc_reason", "p_artifact"])
    for col in decisions.columns:
        df[col] = decisions[col]
    df["qc_pass"] = df["qc_pass"].astype(bool)
    df["p_artifact"] = df["p_artifact"].astype(float)
    floor = scale_floor(reference, qc)
    # Anatomical suggestions only on metrics with a reference spread (FBER, holes, the N4 median have none).
    df["outlier_metrics"] = mad_outliers(judged, metric_names, qc.outlier_k, qc.outlier_min_group, floor,
                                         floored_only=ANAT_MODALITIES)
    df["override"] = ""
    df["override_comment"] = ""
    df["include"] = df["qc_pass"]
    df = apply_overrides(df, ratings)
    return df[[*ENTITY_COLUMNS, *metric_names, *TRAILING_COLUMNS]]


def table_paths(output_dir: str | Path) -> tuple[Path, Path]:
    """``(curation.parquet, curation.tsv)`` of ``OUTPUT_DIR`` (:class:`pipeline.core.layout.OutputLayout`)."""
    layout = OutputLayout(Path(output_dir))
    return layout.curation_table, layout.curation_tsv


def write_table(df: pd.DataFrame, output_dir: str | Path) -> tuple[Path, Path]:
    """Write the table as parquet and TSV (``n/a`` for missing values), atomically."""
    parquet, tsv = table_paths(output_dir)
    with atomic_path(parquet) as tmp:
        df.to_parquet(tmp, index=False)
    atomic_write_text(tsv, df.to_csv(sep="\t", index=False, na_rep="n/a"))
    return parquet, tsv


def read_table(output_dir: str | Path) -> pd.DataFrame:
    """Read ``curation.parquet``.

    Raises
    ------
    pipeline.core.errors.InputError
        When the table does not exist yet.
    """
    from pipeline.core.errors import InputError

    parquet, _ = table_paths(output_dir)
    if not parquet.is_file():
        raise InputError(parquet, "no curation table; run 'neurocurate prep BIDS_DIR OUTPUT_DIR group' first")
    return pd.read_parquet(parquet)
