"""Curation: fixed per-modality rules, robust-outlier suggestions, reviewer overrides.

A scan fails when ANY rule of its modality fails (Neuro-JEPA). Rules come
from the threshold sections of :class:`pipeline.core.config.QCConfig`: a field
``min_<metric>`` requires ``metric >= value`` and ``max_<metric>`` requires
``metric <= value``, so adding a threshold field adds a rule. The final
``include`` column is the reviewer's override when one is set, else
``qc_pass``.
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

__all__ = [
    "ENTITY_COLUMNS",
    "TRAILING_COLUMNS",
    "apply_overrides",
    "build_table",
    "evaluate_rules",
    "mad_outliers",
    "read_table",
    "rules_for",
    "table_paths",
    "write_table",
]

ENTITY_COLUMNS = ("subject", "session", "task", "acq", "run", "modality", "site", "path")
TRAILING_COLUMNS = ("qc_pass", "failed_rules", "outlier_metrics", "override", "override_comment", "include")
_SECTION = {"T1w": "t1w", "T2w": "t2w", "FLAIR": "flair", "bold": "bold", "timeseries": "timeseries"}


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


def mad_outliers(df: pd.DataFrame, metrics: Iterable[str], k: float, min_group: int) -> pd.Series:
    """Robust-outlier suggestion: metrics outside median +/- k * MAD within modality and site.

    MAD is scaled by 1.4826 so ``k`` reads as standard deviations for
    normal data. Groups smaller than ``min_group`` get no suggestion because
    a median of three scans is not a population.

    Returns
    -------
    pandas.Series of str
        Per row, the ``;``-joined names of outlying metrics ("" if none).
    """
    out = pd.Series([""] * len(df), index=df.index, dtype=str)
    if df.empty:
        return out
    flags: dict[Any, list[str]] = {i: [] for i in df.index}
    for _, group in df.groupby(["modality", "site"], sort=False):
        if len(group) < min_group:
            continue
        for metric in metrics:
            if metric not in group.columns:
                continue
            values = pd.to_numeric(group[metric], errors="coerce").astype(float)
            finite = values[np.isfinite(values)]
            if len(finite) < min_group:
                continue
            med = float(finite.median())
            mad = 1.4826 * float((finite - med).abs().median())
            if mad == 0:
                continue
            for idx in finite.index[(finite - med).abs() > k * mad]:
                flags[idx].append(metric)
    for idx, names in flags.items():
        out[idx] = ";".join(names)
    return out


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
        Reviewer ratings keyed by ``path`` (see :mod:`qc.review`).
    """
    rows = []
    metric_names: list[str] = []
    for rec in records:
        missing = [c for c in ("subject", "modality", "path") if not rec.get(c)]
        if missing:
            raise ValueError(f"curation record lacks {missing}: {rec}")
        row = {c: str(rec.get(c) or "") for c in ENTITY_COLUMNS}
        row["site"] = row["site"] or "unknown"
        metrics = {k: v for k, v in rec.items() if k not in ENTITY_COLUMNS}
        for k in metrics:
            if k not in metric_names:
                metric_names.append(k)
        passed, failed = evaluate_rules(metrics, row["modality"], qc)
        rows.append({**row, **{k: float(v) for k, v in metrics.items()}, "qc_pass": passed, "failed_rules": "; ".join(failed)})
    columns = [*ENTITY_COLUMNS, *metric_names, "qc_pass", "failed_rules"]
    df = pd.DataFrame(rows, columns=columns)
    for m in metric_names:
        df[m] = df[m].astype(float)
    df["qc_pass"] = df["qc_pass"].astype(bool)
    df = df.sort_values(["subject", "session", "modality", "task", "acq", "run", "path"], kind="stable").reset_index(drop=True)
    df["outlier_metrics"] = mad_outliers(df, metric_names, qc.outlier_k, qc.outlier_min_group)
    df["override"] = ""
    df["override_comment"] = ""
    df["include"] = df["qc_pass"]
    return apply_overrides(df, ratings or {})


def table_paths(output_dir: str | Path) -> tuple[Path, Path]:
    """``(curation.parquet, curation.tsv)`` under ``OUTPUT_DIR/curation``."""
    folder = Path(output_dir) / "curation"
    return folder / "curation.parquet", folder / "curation.tsv"


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
