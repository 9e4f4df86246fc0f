"""Stage ``qc``: group QC of whatever derivatives OUTPUT_DIR holds, and the reviewer's actions on it.

Entry points: :func:`run_qc` (metrics, curation table, subject and group reports), :func:`import_ratings`
(merge ratings exported from the offline report), :func:`refit_classifier` (learn from the reviewer's ratings)
and :func:`review_server` (the 127.0.0.1 review server).
QC works on the derivatives alone (preprocessed scans, ROI series, imported series): a BIDS folder is
only checked when one is given (the BIDS-App ``group`` level).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import Config, load_config
from pipeline.core.console import USER_LOG
from pipeline.core.layout import OutputLayout

__all__ = ["RatingsImport", "import_ratings", "refit_classifier", "review_server", "run_qc"]

LOG = logging.getLogger(__name__)


def run_qc(output_dir: str | Path, cfg: Config, *, bids_dir: str | Path | None = None) -> int:
    """Measure every derivative, write the curation table and the QC reports.

    Parameters
    ----------
    output_dir : path-like
        Derivatives root (of ``prep`` or ``import-timeseries``).
    cfg : Config
        Resolved configuration (the ``[qc]`` and ``[templates]`` sections apply).
    bids_dir : path-like, optional
        The raw dataset, checked to be a BIDS folder other than ``output_dir`` when given.

    Returns
    -------
    int
        ``EXIT_OK``, or ``EXIT_PARTIAL`` when some scans could not be measured.
    """
    from qc.group import run_group

    output_dir = Path(output_dir).resolve()
    if bids_dir is not None:
        from pipeline.core.bids import check_bids_root, check_output_dir

        check_output_dir(bids_dir, output_dir)
        check_bids_root(bids_dir)
    code = run_group(output_dir, cfg)
    _summarise(output_dir)
    return code


def _summarise(output_dir: Path) -> None:
    from qc.curation import read_table

    layout = OutputLayout(output_dir)
    df = read_table(output_dir)
    USER_LOG.info(f"curation: {int(df['include'].sum())} of {len(df)} scan(s) included -> {layout.curation_table}")
    USER_LOG.info(f"QC report: {layout.group_report}")


def _rerender(output_dir: Path, subjects: set[str]) -> None:
    """Refresh the group report and the rated subjects' reports with the config of the last group run."""
    from qc.curation import read_table
    from qc.group import crash_log_subjects, write_group_report, write_subject_report

    saved = OutputLayout(output_dir).curation_config
    cfg = load_config(saved if saved.is_file() else None)
    write_group_report(output_dir, read_table(output_dir), cfg, sorted(crash_log_subjects(output_dir)))
    for subject in sorted(subjects):
        write_subject_report(output_dir, subject, cfg)


@dataclass(frozen=True)
class RatingsImport:
    """What :func:`import_ratings` did."""

    imported: int
    included: int
    scans: int


def import_ratings(output_dir: str | Path, file: str | Path) -> RatingsImport:
    """Merge a ratings file exported from the offline group report; refresh the table and reports."""
    from qc.curation import read_table
    from qc.review import import_ratings as merge, load_ratings

    output_dir = Path(output_dir)
    n = merge(output_dir, file)
    df = read_table(output_dir)
    rated = set(load_ratings(output_dir))
    _rerender(output_dir, set(df.loc[df["path"].isin(rated), "subject"]))
    result = RatingsImport(n, int(df["include"].sum()), len(df))
    USER_LOG.info(f"imported {result.imported} rating(s); {result.included}/{result.scans} scans included")
    return result


def review_server(output_dir: str | Path, port: int = 8765):
    """The review server on 127.0.0.1 (not yet serving: call ``serve_forever``)."""
    from qc.review import make_server

    return make_server(Path(output_dir), port)

def refit_classifier(output_dir: str | Path, cfg: Config):
    """Refit the classifier with this dataset's reviewer ratings and re-decide every scan.

    Reads the curation table and ``ratings.json`` of ``output_dir``, refits the
    layer-4 classifier (shipped training table + rated scans), recomputes the
    decisions of all layers from the stored metrics (no image is read again),
    and rewrites the table and the group report.

    Parameters
    ----------
    output_dir : path
        OUTPUT_DIR with a curation table (``neurocurate prep ... group``).
    cfg : pipeline.core.config.Config

    Returns
    -------
    pandas.DataFrame
        The new curation table.
    """
    import pandas as pd

    from pipeline.core.layout import CURATION_ENTITY_COLUMNS, curation_metric_columns
    from qc.classifier import rating_rows
    from qc.curation import build_table, read_table, write_table
    from qc.group import crash_log_subjects, write_group_report
    from qc.review import load_ratings

    output_dir = Path(output_dir)
    table = read_table(output_dir)
    ratings = load_ratings(output_dir)
    n_rated = len(rating_rows(table, ratings))
    if n_rated == 0:
        USER_LOG.warning(f"{output_dir}: no ratings of anatomical scans; the classifier keeps its shipped training")
    records = []
    metric_cols = curation_metric_columns(table.columns)
    for _, row in table.iterrows():
        rec = {c: row.get(c, "") for c in CURATION_ENTITY_COLUMNS}  # tables older than a column lack it
        rec.update({m: float(row[m]) for m in metric_cols if pd.notna(row[m])})
        records.append(rec)
    new = build_table(records, cfg.qc, ratings)
    write_table(new, output_dir)
    write_group_report(output_dir, new, cfg, sorted(crash_log_subjects(output_dir)))
    before = dict(zip(table["path"], table["qc_pass"], strict=True))
    changed = sum(bool(before.get(p)) != bool(q) for p, q in zip(new["path"], new["qc_pass"], strict=True))
    USER_LOG.info("classifier refitted with %d rated scans; %d automatic decisions changed", n_rated, changed)
    return new
