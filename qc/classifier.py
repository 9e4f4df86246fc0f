"""Curation layer 4: a gradient-boosting classifier of severe artifacts, refitted from reviewer ratings.

Features are the reference robust z-scores (:func:`qc.reference.bad_z`,
positive = towards degradation, so one model serves every modality and site)
of the metrics in :data:`FEATURE_METRICS`: the scale-free artifact detectors,
the bias-field range, template-brain coverage, template correlation and the
tissue-contrast ratios. The model is constrained to be monotone in every
feature (a scan further towards degradation is never judged more likely
clean), which keeps it from learning a scanner's quirks as an artifact: on
the leave-one-source-out benchmark (277 cases, 9 sources) the unconstrained
model on every metric rejected 22.5 % of the held-out source's clean and mild
scans, this one 3.3 % (benchmarks/README.md, issue 16). The shipped training table
``qc/data/classifier_training.tsv`` holds the metrics of real clean scans of
six sources and of mild and severe synthetic artifacts of ten kinds made from
them (``benchmarks/qc_generalisation.py``; label 1 = severe). Ratings
collected with ``neurocurate qc review`` / ``import-ratings`` are extra labels
(exclude = 1, include = 0) of this dataset's own scans, each repeated
``QCConfig.rating_weight`` times; :func:`pipeline.stages.qc.refit_classifier` refits the model
from them and rewrites the curation table and reports. A scan from a site
with enough scans of its modality is read against that site's typical scan
(:func:`qc.reference.site_shifts`), and the training rows of sources with
enough scans are read the same way (:func:`cohort_shifts`), so that the model
learns and judges "worse than its own site", not "unlike the other scanners"
(benchmarks/README.md, issue 16). The model is fitted
when needed (under a second on the shipped table), so no pickled model with a
scikit-learn version tie is shipped.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.errors import InputError
from qc.reference import ANAT_MODALITIES, directed_z, raw_z_frame, site_shift, z_frame

__all__ = [
    "FEATURES",
    "FEATURE_METRICS",
    "cohort_shifts",
    "features",
    "fit",
    "load_training",
    "predict",
    "rating_rows",
    "shipped_training_path",
    "style_transplants",
]

log = logging.getLogger(__name__)

#: Metrics whose reference z-scores are the classifier's features (chosen leave-one-source-out, see
#: benchmarks/README.md, issue 16).
FEATURE_METRICS: tuple[str, ...] = (
    "blur_ap_lr", "air_signal", "wm_trend", "inu_range", "brain_coverage",
    "correlation", "wm_gm_ratio", "csf_gm_ratio",
)
FEATURES: tuple[str, ...] = tuple(f"z_{m}" for m in FEATURE_METRICS)


def shipped_training_path() -> Path:
    """Path of the artifact training table shipped with the package."""
    return Path(str(resources.files("qc") / "data" / "classifier_training.tsv"))


def load_training(path: str | Path | None = None) -> pd.DataFrame:
    """Read a training table (``modality``, metric columns, ``label`` 0/1).

    Raises
    ------
    InputError
        When it is missing or lacks ``modality``/``label``.
    """
    path = Path(path) if path else shipped_training_path()
    try:
        df = pd.read_csv(path, sep="\t")
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read QC classifier training table ({exc})") from None
    for col in ("modality", "label"):
        if col not in df.columns:
            raise InputError(path, f"QC classifier training table lacks column {col!r}")
    return df


def features(df: pd.DataFrame, reference: pd.DataFrame, shift: pd.DataFrame | None = None) -> np.ndarray:
    """Feature matrix (rows of ``df``, columns :data:`FEATURES`); NaN where a metric is missing.

    ``shift`` (:func:`qc.reference.site_shifts`) measures each row's z from its site's typical scan.
    """
    return _clip(z_frame(df, reference, FEATURE_METRICS, shift=shift))


def _clip(z: pd.DataFrame) -> np.ndarray:
    # A z of 200 says no more than one of 30, and clipping keeps the trees' splits in the useful range.
    return np.clip(z.to_numpy(dtype=float), -30.0, 30.0)


def style_transplants(table: pd.DataFrame, raw: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Every labelled row re-expressed in the style of each other source of its modality.

    A source's *style* is the median raw z (:func:`qc.reference.raw_z_frame`,
    after any site calibration) of its clean scans of one modality: how that
    scanner and population sit against the reference when nothing is wrong.
    A row of source ``s`` is moved by ``style(s') - style(s)`` for every other
    source ``s'`` with clean scans of the same modality: the same clean scan,
    or the same artifact at the same severity, as it would measure on the
    other scanner. Training on these copies teaches the classifier that a
    scanner's style (several metrics a few scales off at once, as on a 5 mm
    glioma protocol) is not an artifact, and that an artifact on a good
    scanner reads smaller than on a poor one -- the cases that a model trained
    on a handful of sources otherwise learns only from the sources it saw.

    Parameters
    ----------
    table : DataFrame
        Labelled rows with ``source``, ``modality`` and ``severity`` columns.
    raw : DataFrame
        Their raw z (same index), one column per metric.

    Returns
    -------
    (moved, rows, weight) : tuple
        ``moved``, the transplanted raw z (a fresh RangeIndex);
        ``rows``, the position in ``table`` of each moved row's original;
        ``weight``, ``1 / (number of other sources)``, so that the copies of
        one row weigh as much as the row.
    """
    empty = (pd.DataFrame(columns=raw.columns, dtype=float), np.zeros(0, dtype=int), np.zeros(0))
    if not {"source", "modality", "severity"} <= set(table.columns) or table.empty:
        return empty
    source = table["source"].astype(str).to_numpy()
    modality = table["modality"].astype(str).to_numpy()
    clean = (table["severity"] == "clean").to_numpy()
    values = raw.to_numpy(dtype=float)
    styles: dict[tuple[str, str], np.ndarray] = {}
    for key in sorted(set(zip(source[clean], modality[clean], strict=True))):
        sel = clean & (source == key[0]) & (modality == key[1])
        with warnings.catch_warnings():  # a metric no clean scan of the source has: no style on it (0)
            warnings.simplefilter("ignore", RuntimeWarning)
            styles[key] = np.nan_to_num(np.nanmedian(values[sel], axis=0), nan=0.0)
    parts, rows, weight = [], [], []
    for (src, mod), own in styles.items():
        others = [style for (s2, m2), style in styles.items() if m2 == mod and s2 != src]
        sel = np.flatnonzero((source == src) & (modality == mod))
        for style in others:
            parts.append(values[sel] - own + style)
            rows.append(sel)
            weight.append(np.full(len(sel), 1.0 / len(others)))
    if not parts:
        return empty
    moved = pd.DataFrame(np.concatenate(parts), columns=raw.columns)
    return moved, np.concatenate(rows), np.concatenate(weight)


def cohort_shifts(table: pd.DataFrame, reference: pd.DataFrame, min_group: int, cap: float) -> pd.DataFrame:
    """Site shift (:func:`qc.reference.site_shift`) of every row of a labelled artifact table.

    A row (a clean scan or a corrupted copy of one) is read as a scan of its
    source's dataset: its cohort is the other clean scans of its ``source``
    with its ``modality`` plus the row itself, and it is shifted when the
    cohort has at least ``min_group`` scans -- as :func:`qc.reference.site_shifts`
    does for a dataset being curated. Needs ``source``, ``modality``,
    ``severity`` and ``scan`` (or ``case`` = ``<scan>__<artifact>__<severity>``)
    columns; a table without them gets no shift.
    """
    out = pd.DataFrame(0.0, index=table.index, columns=list(FEATURE_METRICS))
    if min_group <= 0 or table.empty or not {"source", "severity"} <= set(table.columns):
        return out
    if "scan" in table.columns:
        scan = table["scan"].astype(str)
    elif "case" in table.columns:
        scan = table["case"].astype(str).str.split("__").str[0]
    else:
        return out
    raw = raw_z_frame(table, reference, FEATURE_METRICS)
    clean = (table["severity"] == "clean").to_numpy()
    source = table["source"].astype(str).to_numpy()
    modality = table["modality"].astype(str).to_numpy()
    scan_ = scan.to_numpy()
    for i, idx in enumerate(table.index):
        if modality[i] not in ANAT_MODALITIES:
            continue
        peers = clean & (source == source[i]) & (modality == modality[i]) & (scan_ != scan_[i])
        if peers.sum() + 1 >= min_group:
            cohort = [*table.index[peers], idx]
            out.loc[idx] = site_shift(raw.loc[cohort], modality[i], cap).to_numpy()
    return out


def fit(
    training: pd.DataFrame, reference: pd.DataFrame, extra: pd.DataFrame | None = None, extra_weight: int = 1,
    extra_shift: pd.DataFrame | None = None, site_min_group: int = 0, site_cap: float = 0.0,
    style_transplant: bool = True,
) -> Any:
    """Fit the classifier on ``training`` (and ``extra`` rated rows, each repeated ``extra_weight`` times).

    With ``site_min_group`` > 0 the training rows of sources with enough scans are read against their
    source's typical scan (:func:`cohort_shifts`, shift at most ``site_cap``), as scans of such sites
    are at prediction. ``extra_shift`` (index of ``extra``) is the site shift the rated rows get at
    prediction (:func:`predict`), so that a rating teaches the model about the features it will be
    applied to. With ``style_transplant`` the training rows are also seen in the style of every other
    source of their modality (:func:`style_transplants`; needs a ``source`` column, else a warning);
    rated rows are this dataset's own and are not moved.

    Returns
    -------
    sklearn.ensemble.HistGradientBoostingClassifier
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    train = training[training["modality"].isin(ANAT_MODALITIES)]
    raw = raw_z_frame(train, reference, FEATURE_METRICS) - cohort_shifts(train, reference, site_min_group, site_cap)
    modality = train["modality"].astype(str).to_numpy()
    X = _clip(directed_z(raw, modality, reference))
    y = train["label"].astype(int).to_numpy()
    w = np.ones(len(y))
    if style_transplant:
        if "source" not in train.columns:
            log.warning("QC classifier: the training table has no 'source' column, so its rows cannot be "
                        "seen in other scanners' styles (style_transplant); fitting on the rows as they are")
        moved, rows, weight = style_transplants(train, raw)
        if len(rows):
            X = np.concatenate([X, _clip(directed_z(moved, modality[rows], reference))])
            y = np.concatenate([y, y[rows]])
            w = np.concatenate([w, weight])
    if extra is not None and not extra.empty:
        extra = extra[extra["modality"].isin(ANAT_MODALITIES)]
        reps = max(int(extra_weight), 1)
        X_extra = features(extra, reference, None if extra_shift is None else extra_shift.loc[extra.index])
        X = np.concatenate([X, np.repeat(X_extra, reps, axis=0)])
        y = np.concatenate([y, np.repeat(extra["label"].astype(int).to_numpy(), reps)])
        w = np.concatenate([w, np.ones(len(extra) * reps)])
    if np.isnan(X).all():
        raise ValueError(f"the classifier's training rows have none of its features {list(FEATURE_METRICS)}")
    if len(np.unique(y)) < 2:
        raise ValueError("the classifier needs both clean (0) and artifact (1) examples")
    model = HistGradientBoostingClassifier(
        max_iter=100, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=5, l2_regularization=1.0, random_state=0,
        monotonic_cst=[1] * len(FEATURES),
    )
    model.fit(X, y, sample_weight=w)
    return model


def predict(model: Any, df: pd.DataFrame, reference: pd.DataFrame, shift: pd.DataFrame | None = None) -> np.ndarray:
    """P(severe artifact) per row; NaN for rows that are not anatomical.

    Contrast-enhanced rows are read on their contrast-free features only (:func:`qc.reference.raw_z_frame`).

    ``shift`` (same index as ``df``; :func:`qc.reference.site_shifts`) measures the features of rows
    from a site with enough scans from that site's typical scan instead of the reference median.
    """
    out = np.full(len(df), np.nan)
    anat = df["modality"].isin(ANAT_MODALITIES).to_numpy()
    if anat.any():
        sub = df[anat]
        out[anat] = model.predict_proba(features(sub, reference, None if shift is None else shift.loc[sub.index]))[:, 1]
    return out


@functools.lru_cache(maxsize=4)
def _default_model(training_path: str, reference_path: str, stamp: tuple[float, float], site_min_group: int,
                   site_cap: float, style_transplant: bool) -> Any:
    from qc.reference import load_reference

    return fit(load_training(training_path), load_reference(reference_path or None),
               site_min_group=site_min_group, site_cap=site_cap, style_transplant=style_transplant)


def default_model(training_path: str = "", reference_path: str = "", site_min_group: int = 0,
                  site_cap: float = 0.0, style_transplant: bool = True) -> Any:
    """The classifier fitted on a training table without ratings (cached per process and file version)."""
    from qc.reference import shipped_reference_path

    training_path = training_path or str(shipped_training_path())
    stamp = tuple(Path(p).stat().st_mtime if Path(p).is_file() else 0.0
                  for p in (training_path, reference_path or shipped_reference_path()))
    return _default_model(training_path, reference_path, stamp, int(site_min_group), float(site_cap),
                          bool(style_transplant))


def rating_rows(table: pd.DataFrame, ratings: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    """Rows of the curation table that a reviewer rated, with ``label`` 1 (exclude) or 0 (include)."""
    decisions = {p: r.get("decision", "") for p, r in ratings.items()}
    rated = table[table["path"].map(lambda p: decisions.get(p, "") in ("include", "exclude"))].copy()
    rated["label"] = [1 if decisions[p] == "exclude" else 0 for p in rated["path"]]
    return rated[rated["modality"].isin(ANAT_MODALITIES)]
