"""Group level: metrics for every derivative in OUTPUT_DIR, curation table, reports.

``neurocurate prep BIDS_DIR OUTPUT_DIR group`` calls :func:`run_group`; the
participant level may call :func:`write_subject_report` for one subject.
Derivatives are found through the names of :mod:`pipeline.core.derivatives`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.core.config import Config, write_resolved_config
from pipeline.core.derivatives import SPACE, anat_outputs, func_outputs, parse_name, raw_source, source_dataset
from pipeline.core.errors import EXIT_OK, EXIT_PARTIAL, InputError, NeurocurateError
from pipeline.core.faults import crash_point
from pipeline.core.layout import CURATION_NON_METRIC_COLUMNS, OutputLayout
from pipeline.core.templates import get_template

__all__ = [
    "Scan",
    "anat_metrics",
    "crash_log_subjects",
    "discover_scans",
    "find_crash_logs",
    "metric_cache",
    "run_group",
    "scan_inputs",
    "scan_metrics",
    "scan_record",
    "write_group_report",
    "write_subject_report",
]

log = logging.getLogger(__name__)

_ANAT = ("T1w", "T2w", "FLAIR")
_ENTITY_COLS = {"ses": "session", "task": "task", "acq": "acq", "ce": "ce", "run": "run"}
#: Keys of a curation record that are not metrics (see :func:`_identity`).
_IDENTITY_COLUMNS = frozenset({"subject", "modality", "site", "path", *_ENTITY_COLS.values()})


@dataclass(frozen=True)
class Scan:
    """One derivative that gets a curation row."""

    subject: str
    modality: str  # T1w, T2w, FLAIR, bold, timeseries
    path: Path  # absolute
    entities: dict[str, str]


def discover_scans(output_dir: Path, subject: str | None = None) -> list[Scan]:
    """Every anat/BOLD/ROI-series derivative under ``output_dir`` (optionally one subject)."""
    pattern = f"sub-{subject}" if subject else "sub-*"
    scans = []
    for folder in sorted(output_dir.glob(pattern)):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            ents, suffix, ext = parse_name(path)
            if "sub" not in ents or path.name.startswith("."):
                continue
            if (
                path.parent.name == "anat" and suffix in _ANAT and ext == ".nii.gz"
                and ents.get("space") == SPACE and ents.get("res") == "2" and ents.get("desc") == "preproc"
            ):
                scans.append(Scan(ents["sub"], suffix, path, ents))
            elif (
                path.parent.name == "func" and suffix == "bold" and ext == ".nii.gz"
                and ents.get("space") == SPACE and ents.get("res") == "2" and ents.get("desc") == "preproc"
            ):
                scans.append(Scan(ents["sub"], "bold", path, ents))
            elif path.parent.name == "func" and suffix == "timeseries" and ext == ".tsv" and "atlas" in ents:
                scans.append(Scan(ents["sub"], "timeseries", path, ents))
    return scans


def find_crash_logs(output_dir: Path, subject: str) -> list[tuple[str, str]]:
    """``(name, text)`` of crash/error files in ``OUTPUT_DIR/logs`` that name ``sub-<subject>``."""
    logs = OutputLayout(output_dir).logs_dir
    if not logs.is_dir():
        return []
    pattern = re.compile(rf"(^|[_\-./])sub-{re.escape(subject)}([_\-.]|$)")
    out = []
    for path in sorted(logs.rglob("*")):
        if path.is_file() and pattern.search(path.relative_to(logs).as_posix()):
            text = path.read_text(errors="replace")
            out.append((path.relative_to(logs).as_posix(), text[-20000:]))
    return out


def _sites(output_dir: Path, column: str = "site") -> dict[str, str]:
    """Site of each subject from column ``column`` of ``OUTPUT_DIR/participants.tsv``.

    Subjects without one (no table, no default column, an empty or ``n/a`` value) are left
    out: their scans' site is their acquisition (:func:`acquisition_site`).
    """
    path = OutputLayout(output_dir).participants
    if not path.is_file():
        return {}
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read participants table ({exc})") from None
    if "participant_id" not in df.columns:
        raise InputError(path, "no participant_id column")
    if column not in df.columns:
        from pipeline.core.config import QCConfig

        if column != QCConfig.site_column:  # named by the user: a typo must not switch two layers off silently
            raise InputError(path, f"no column {column!r} ([qc] site_column); columns: {', '.join(df.columns)}")
        log.warning("%s has no %r column: each scan's site is its acquisition (voxel size, data type and, where "
                    "the BIDS sidecar says, scanner), for the dataset layer and the classifier's site calibration "
                    "([qc] site_column names another column)", path, column)
        return {}
    return {
        pid.removeprefix("sub-"): site
        for pid, site in zip(df["participant_id"], df[column], strict=True)
        if site and site not in ("n/a", "not recorded")
    }


def acquisition_site(scan: Scan, raw_root: Path | None) -> str:
    """The acquisition a derivative came from, as a site label; ``"unknown"`` when it cannot be read.

    Scans of one protocol on one scanner share voxel size and stored data type (and,
    where the raw BIDS sidecar has them, manufacturer, model and field strength), so
    in a dataset whose ``participants.tsv`` names no site these stand in for it: e.g.
    ``"2x2x2 mm uint8"`` or ``"1x1x1 mm int16 Philips Ingenia Elition X 3T"``. The raw
    image is found through the derivative's sidecar (``Sources``) under ``raw_root``
    (:func:`pipeline.core.derivatives.source_dataset`); only its header is read.
    """
    if raw_root is None:
        return "unknown"
    try:
        sidecar = json.loads(scan.path.with_name(scan.path.name.removesuffix(".nii.gz") + ".json").read_text())
        rel = raw_source(sidecar)
        if rel is None:
            return "unknown"
        raw = raw_root / rel
        header = nib.load(raw).header
        zooms = "x".join(f"{float(z):.3g}" for z in header.get_zooms()[:3])
        parts = [f"{zooms} mm", str(header.get_data_dtype())]
        raw_sidecar = raw.with_name(raw.name.removesuffix(".nii.gz").removesuffix(".nii") + ".json")
        if raw_sidecar.is_file():
            meta = json.loads(raw_sidecar.read_text())
            parts += [str(meta[k]) for k in ("Manufacturer", "ManufacturersModelName") if meta.get(k)]
            if meta.get("MagneticFieldStrength"):
                parts.append(f"{meta['MagneticFieldStrength']:g}T" if isinstance(meta["MagneticFieldStrength"], float | int)
                             else str(meta["MagneticFieldStrength"]))
        return " ".join(parts)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.debug("%s: acquisition unknown (%s)", scan.path, exc)
        return "unknown"


def _scan_site(scan: Scan, sites: dict[str, str], raw_root: Path | None) -> str:
    """Site of one scan: its subject's in the participants table, else its acquisition."""
    return sites.get(scan.subject) or acquisition_site(scan, raw_root)


class _Templates:
    """Templates loaded once per run."""

    def __init__(self, cfg: Config):
        tdir = cfg.templates.template_dir or None
        self._paths = {
            "T1w": get_template(2, "T1w", template_dir=tdir),
            "T2w": get_template(2, "T2w", template_dir=tdir),
            "mask": get_template(2, "mask", "brain", template_dir=tdir),
        }
        self._cache: dict[str, np.ndarray] = {}
        self._tissues: dict[str, np.ndarray] | None = None

    @property
    def paths(self) -> dict[str, Path]:
        """The template files (``T1w``, ``T2w``, ``mask``)."""
        return dict(self._paths)

    def tissues(self) -> dict[str, np.ndarray]:
        """Core CSF/GM/WM regions of the T1 template (for the contrast-signature metrics)."""
        from qc.metrics import template_tissues

        if self._tissues is None:
            self._tissues = template_tissues(self.get("T1w"), self.get("mask") > 0)
        return self._tissues

    def get(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = np.asanyarray(nib.load(self._paths[key]).dataobj).astype(np.float32)
        return self._cache[key]

    def for_modality(self, modality: str) -> np.ndarray:
        # No FLAIR template exists; T2 is the closest contrast. The FLAIR-vs-T2 intensity correlation is
        # negative (dark CSF) and is judged against real FLAIRs (qc.reference); edge_correlation and the
        # tissue ratios do not assume the template's contrast.
        return self.get("T1w" if modality == "T1w" else "T2w")


_SHARED_TEMPLATES: dict[tuple, _Templates] = {}


def _shared_templates(cfg: Config) -> _Templates:
    """A :class:`_Templates` kept for the life of the process (one per set of template files and their versions).

    The participant level draws one subject report per node, many in the same worker process: the templates
    and their tissue regions are loaded once there instead of once per subject.
    """
    tpl = _Templates(cfg)
    key = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for _, p in sorted(tpl.paths.items()))
    if key not in _SHARED_TEMPLATES:
        if len(_SHARED_TEMPLATES) >= 4:
            _SHARED_TEMPLATES.clear()
        _SHARED_TEMPLATES[key] = tpl
    return _SHARED_TEMPLATES[key]


def _load(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, "missing derivative")
    try:
        data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"cannot read image ({exc})") from None
    if shape is not None and data.shape[:3] != tuple(shape):
        raise InputError(path, f"grid {data.shape[:3]} is not the 2 mm template grid {tuple(shape)}")
    return data


def anat_metrics(
    image: np.ndarray,
    modality: str,
    template: np.ndarray,
    template_mask: np.ndarray,
    tissues: dict[str, np.ndarray],
    brain: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    bins: int = 64,
) -> dict[str, float]:
    """Every anatomical QC metric of one scan in MNI space (pure; arrays on the template grid).

    Parameters
    ----------
    image : ndarray
        N4-corrected head image.
    modality : {"T1w", "T2w", "FLAIR"}
    template, template_mask : ndarray
        The contrast's template and the template brain mask.
    tissues : dict
        Template CSF/GM/WM regions (:func:`qc.metrics.template_tissues`).
    brain : ndarray, optional
        The scan's brain mask (default: the template's).
    bias : ndarray, optional
        N4 bias field.
    """
    from qc.iqms import structural_iqms
    from qc.metrics import artifact_metrics, template_similarity, tissue_contrast

    tmask = template_mask > 0
    metrics = template_similarity(image, template, tmask, bins=bins)
    metrics.update(artifact_metrics(image, template, tmask, tissues))
    metrics.update(structural_iqms(image, tmask if brain is None else brain > 0, modality, bias))
    metrics.update(tissue_contrast(image, tissues))
    return metrics


def _anat_metrics(scan: Scan, output_dir: Path, cfg: Config, tpl: _Templates) -> dict[str, float]:
    outs = anat_outputs(output_dir, scan.entities, scan.modality, 2)
    template = tpl.for_modality(scan.modality)
    tmask = tpl.get("mask")
    image = _load(scan.path, template.shape)
    brain = _load(outs.mask, template.shape) if outs.mask.is_file() else None
    bias = _load(outs.biasfield, template.shape) if outs.biasfield.is_file() else None
    return anat_metrics(image, scan.modality, template, tmask, tpl.tissues(), brain, bias, cfg.qc.mi_bins)


def _bold_metrics(scan: Scan, output_dir: Path, tpl: _Templates) -> dict[str, float]:
    from qc.iqms import bold_iqms, read_confounds

    outs = func_outputs(output_dir, scan.entities, 2)
    bold = _load(scan.path)
    if bold.ndim != 4:
        raise InputError(scan.path, f"expected a 4-D BOLD series, got shape {bold.shape}")
    mask = _load(outs.mask, bold.shape[:3]) > 0 if outs.mask.is_file() else tpl.get("mask") > 0
    if not outs.confounds.is_file():
        raise InputError(outs.confounds, "missing confounds TSV for this BOLD run")
    return bold_iqms(bold, mask, read_confounds(outs.confounds))


def _timeseries_metrics(scan: Scan) -> dict[str, float]:
    sidecar = scan.path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise InputError(sidecar, "missing JSON sidecar of the ROI time series") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(sidecar, f"not valid JSON ({exc})") from None
    names = meta.get("ROINames")
    if not isinstance(names, list) or not names:
        raise InputError(sidecar, "ROINames must be a non-empty list")
    if not isinstance(meta.get("NumberOfVolumes"), int):
        raise InputError(sidecar, "NumberOfVolumes must be an integer")
    n = len(names)
    return {
        "n_volumes": float(meta["NumberOfVolumes"]),
        "n_rois": float(n),
        "zero_variance_fraction": len(meta.get("ZeroVarianceROIs") or []) / n,
        "empty_roi_fraction": len(meta.get("EmptyROIs") or []) / n,
    }


def scan_inputs(scan: Scan, output_dir: Path) -> dict[str, Path]:
    """Every file the metrics of ``scan`` read, by role (a companion file may be absent).

    The QC metric cache (:mod:`qc.cache`) keys a scan by the content of these files.
    """
    if scan.modality in _ANAT:
        outs = anat_outputs(output_dir, scan.entities, scan.modality, 2)
        return {"image": scan.path, "brain_mask": outs.mask, "bias_field": outs.biasfield}
    if scan.modality == "bold":
        outs = func_outputs(output_dir, scan.entities, 2)
        return {"bold": scan.path, "mask": outs.mask, "confounds": outs.confounds}
    return {"series": scan.path, "sidecar": scan.path.with_suffix(".json")}


def scan_metrics(scan: Scan, output_dir: Path, cfg: Config, tpl: Any = None) -> dict[str, float]:
    """The QC metrics of one scan, measured now (plain floats, in a fixed order).

    Raises
    ------
    InputError
        When a derivative the metrics need is missing or unreadable.
    """
    from qc.cache import normalise_metrics

    tpl = tpl or _Templates(cfg)
    if scan.modality in _ANAT:
        metrics = _anat_metrics(scan, output_dir, cfg, tpl)
    elif scan.modality == "bold":
        metrics = _bold_metrics(scan, output_dir, tpl)
    else:
        metrics = _timeseries_metrics(scan)
    return normalise_metrics(metrics)


def _identity(scan: Scan, output_dir: Path, site: str) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "subject": scan.subject,
        "modality": scan.modality,
        "site": site,
        "path": scan.path.relative_to(output_dir).as_posix(),
    }
    for ent, col in _ENTITY_COLS.items():
        rec[col] = scan.entities.get(ent, "")
    return rec


def scan_record(scan: Scan, output_dir: Path, cfg: Config, tpl: Any = None, site: str = "unknown") -> dict[str, Any]:
    """Curation record (entities + metrics) of one scan, measured now.

    Raises
    ------
    InputError
        When a derivative the metrics need is missing or unreadable.
    """
    rec = _identity(scan, output_dir, site)
    rec.update(scan_metrics(scan, output_dir, cfg, tpl))
    return rec


def metric_cache(output_dir: Path, cfg: Config, tpl: Any = None):
    """The :class:`qc.cache.MetricCache` of ``output_dir`` for this config.

    What changes metric values besides a scan's own files: the metric code (source digest of
    :mod:`qc.metrics`, :mod:`qc.iqms` and the measuring functions here), the templates' content, and for
    anatomical scans ``[qc] mi_bins``. Nothing that decides (thresholds, reference z limit, classifier,
    ratings) is part of it.
    """
    from pipeline.core.provenance import file_digest
    from qc import iqms, metrics
    from qc.cache import MetricCache, code_digest

    tpl = tpl or _Templates(cfg)
    code = code_digest([metrics, iqms, _Templates, _load, anat_metrics, _anat_metrics, _bold_metrics,
                        _timeseries_metrics, scan_inputs, scan_metrics])
    templates = {name: file_digest(path) for name, path in sorted(tpl.paths.items())}
    anat = {"code": code, "templates": templates, "mi_bins": cfg.qc.mi_bins}
    contexts: dict[str, object] = {m: anat for m in _ANAT}
    contexts["bold"] = {"code": code, "template_mask": templates["mask"]}
    contexts["timeseries"] = {"code": code}
    return MetricCache(output_dir, contexts)


def _figures(scan: Scan, output_dir: Path, tpl: _Templates) -> list[tuple[str, str]]:
    from qc import reports

    if scan.modality in _ANAT:
        outs = anat_outputs(output_dir, scan.entities, scan.modality, 2)
        template = tpl.for_modality(scan.modality)
        tmask = tpl.get("mask") > 0
        image = _load(scan.path, template.shape)
        figs = [("Registration: template brain outline (red) and white-matter edge (yellow) over the scan in MNI space",
                 reports.registration_mosaic(image, template, tmask))]
        if outs.mask.is_file():
            figs.append(("Skull strip: brain mask outline", reports.outline_mosaic(image, _load(outs.mask, template.shape))))
        if outs.biasfield.is_file():
            figs.append(("N4 bias field (viridis, 1st-99th percentile) over the corrected image", reports.bias_mosaic(image, _load(outs.biasfield, template.shape))))
        return figs
    if scan.modality == "bold":
        from qc.iqms import read_confounds, tsnr_map

        outs = func_outputs(output_dir, scan.entities, 2)
        bold = _load(scan.path)
        mask = _load(outs.mask, bold.shape[:3]) > 0 if outs.mask.is_file() else tpl.get("mask") > 0
        fd = read_confounds(outs.confounds)["framewise_displacement"] if outs.confounds.is_file() else None
        return [
            ("BOLD mean", reports.map_mosaic(bold.mean(axis=-1), mask, "gray")),
            ("tSNR map (hot colour map, 1st-99.5th percentile in the brain)",
             reports.map_mosaic(tsnr_map(bold) * mask, mask, "hot")),
            ("Carpet plot: brain voxels z-scored (rows) by volume; above, framewise displacement "
             "0-1 mm with the 0.2 mm line in red", reports.carpet_plot(bold, mask, fd)),
        ]
    return []


def _scan_view(row: pd.Series, cfg: Config, figures: list[tuple[str, str]]) -> dict[str, Any]:
    from qc.curation import rules_for
    from qc.reports import _fmt

    rules = []
    for metric, kind, thr in rules_for(str(row["modality"]), cfg.qc):
        value = row.get(metric, float("nan"))
        value = float(value) if pd.notna(value) else float("nan")
        ok = not np.isfinite(value) or (value >= thr if kind == "min" else value <= thr)
        rules.append((metric, kind, f"{thr:g}", _fmt(value), bool(ok)))
    skip = CURATION_NON_METRIC_COLUMNS
    # The table holds every modality's metrics; show the ones this scan has.
    metrics = [
        (k, _fmt(v) if isinstance(v, float) else str(v))
        for k, v in row.items()
        if k not in skip and not (isinstance(v, float) and np.isnan(v))
    ]
    ents = [f"{k}-{row[k]}" for k in ("session", "task", "acq", "run") if str(row.get(k, "") or "")]
    return {
        "title": " ".join([str(row["modality"]), *ents]),
        "path": str(row["path"]),
        "modality": str(row["modality"]),
        "rules": rules,
        "metrics": metrics,
        "qc_pass": bool(row["qc_pass"]),
        "reasons": [tuple(r.split(": ", 1)) if ": " in r else ("", r) for r in str(row.get("qc_reason", "") or "").split("; ") if r],
        "p_artifact": f"{100 * float(row['p_artifact']):.0f}%" if pd.notna(row.get("p_artifact", float("nan"))) else None,
        "include": bool(row["include"]),
        "override": str(row.get("override", "")),
        "comment": str(row.get("override_comment", "")),
        "figures": figures,
    }


def _subject_table(
    output_dir: Path, subject: str, scans: list[Scan], cfg: Config, tpl: _Templates,
    table: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The subject's curation rows and ``(path, error)`` of scans that could not be measured.

    Rows come from the curation table (``table``, else the one on disk) when it covers every scan (so
    the outlier suggestions and overrides show); otherwise they are built now, with the metrics from the
    QC metric cache where it has them (and stored there when measured).
    """
    from qc.curation import build_table, read_table, table_paths
    from qc.review import load_ratings

    wanted = {s.path.relative_to(output_dir).as_posix() for s in scans}
    if table is None and table_paths(output_dir)[0].is_file():
        table = read_table(output_dir)
    if table is not None:
        df = table[table["path"].isin(wanted)]
        if set(df["path"]) == wanted:
            return df, []
    sites, raw_root = _sites(output_dir, cfg.qc.site_column), source_dataset(output_dir)
    cache = metric_cache(output_dir, cfg, tpl)
    records, errors = [], []
    for scan in scans:
        key = cache.key(scan.modality, scan_inputs(scan, output_dir))
        metrics = cache.get(key)
        if metrics is None:
            try:
                metrics = scan_metrics(scan, output_dir, cfg, tpl)
            except (InputError, ValueError) as exc:
                errors.append((scan.path.relative_to(output_dir).as_posix(), f"QC metrics failed: {exc}"))
                continue
            cache.put(key, metrics, scan.path.relative_to(output_dir).as_posix())
        records.append({**_identity(scan, output_dir, _scan_site(scan, sites, raw_root)), **metrics})
    df = build_table(records, cfg.qc, load_ratings(output_dir)) if records else pd.DataFrame()
    return df, errors


def _report_code_digest() -> str:
    """Digest of the code and template that draw a subject report."""
    import hashlib

    from qc import reports
    from qc.cache import code_digest

    digest = hashlib.sha256(code_digest([reports, _figures, _scan_view, find_crash_logs]).encode())
    for name in ("subject.html",):
        digest.update(reports.template_source(name).encode("utf-8"))
    return digest.hexdigest()


def _subject_report(
    output_dir: Path, subject: str, cfg: Config, tpl: _Templates, *, table: pd.DataFrame | None = None,
    scan_keys: dict[str, str | None] | None = None, report_code: str | None = None,
) -> tuple[Path, bool]:
    """Write one subject's report unless the one on disk already shows the same; ``(path, written)``.

    The report carries a key over everything it shows: the rows (metrics, decisions, overrides), the
    errors, the content of the files its figures are drawn from (the scans' metric-cache keys) and the
    report code. A report whose key is unchanged is left as it is, so a group run re-renders only the
    subjects whose scans or decisions changed.
    """
    import hashlib

    from qc.reports import read_report_key, render_subject_report, write_html

    target = OutputLayout(output_dir).subject_report(subject)
    scans = discover_scans(output_dir, subject)
    errors = find_crash_logs(output_dir, subject)
    rows: list[tuple[pd.Series, Scan]] = []
    if scans:
        df, scan_errors = _subject_table(output_dir, subject, scans, cfg, tpl, table)
        errors += scan_errors
        by_path = {s.path.relative_to(output_dir).as_posix(): s for s in scans}
        rows = [(row, by_path[row["path"]]) for _, row in df.iterrows()]
    if scan_keys is None:
        cache = metric_cache(output_dir, cfg, tpl)
        scan_keys = {}
        for _, scan in rows:
            scan_keys[scan.path.relative_to(output_dir).as_posix()] = cache.key(
                scan.modality, scan_inputs(scan, output_dir))
    views = [_scan_view(row, cfg, []) for row, _ in rows]
    sources = [scan_keys.get(str(row["path"])) for row, _ in rows]
    content = json.dumps({"subject": subject, "views": views, "errors": errors, "sources": sources,
                          "code": report_code or _report_code_digest()}, default=str, sort_keys=True)
    key = hashlib.sha256(content.encode("utf-8")).hexdigest()
    if None not in sources and read_report_key(target) == key:
        return target, False
    errors = list(errors)
    for view, (row, scan) in zip(views, rows, strict=True):
        try:
            view["figures"] = _figures(scan, output_dir, tpl)
        except InputError as exc:
            errors.append((row["path"], f"figures could not be drawn: {exc}"))
    return write_html(target, render_subject_report(subject, views, errors, report_key=key)), True


def write_subject_report(output_dir: Path, subject: str, cfg: Config) -> Path:
    """Write ``OUTPUT_DIR/reports/sub-<subject>.html`` and return its path.

    Uses the curation table when it covers the subject's scans (so overrides
    show), else computes the metrics now (or takes them from the QC metric
    cache). Crash files in ``OUTPUT_DIR/logs`` that name the subject are shown
    at the top. A report that would show exactly what it already shows is not
    rewritten.
    """
    output_dir = Path(output_dir)
    return _subject_report(output_dir, subject.removeprefix("sub-"), cfg, _shared_templates(cfg))[0]


def write_group_report(output_dir: Path, df: pd.DataFrame, cfg: Config, error_subjects: list[str]) -> Path:
    """Write ``OUTPUT_DIR/reports/group.html`` from the curation table."""
    from qc.reports import render_group_report, write_html

    return write_html(OutputLayout(Path(output_dir)).group_report, render_group_report(df, cfg.qc, error_subjects))


def run_group(output_dir: Path, cfg: Config) -> int:
    """Group QC of whatever derivatives OUTPUT_DIR holds: metrics, curation table, subject and group reports.

    QC works on the derivatives alone (preprocessed scans, ROI series, imported series), so no BIDS
    dataset is needed. Only scans that are new or changed (or whose metric code or metric settings
    changed) are measured; the others' metrics come from the QC metric cache (:mod:`qc.cache`). The
    decisions are always taken again from the metrics, and only subject reports whose content changed
    are drawn again. Both counts are logged.

    Parameters
    ----------
    output_dir : Path
        Derivatives folder of the participant level.
    cfg : Config

    Returns
    -------
    int
        0, or 3 when some scans could not be measured (they are named in the
        log and in their subject's report, and left out of the table).
    """
    from pipeline.core.console import USER_LOG
    from pipeline.core.parallel import (  # threads, or the [dask] cluster
        MapError,
        Star,
        parallel_map,
    )
    from qc.curation import build_table, write_table
    from qc.review import load_ratings

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise InputError(output_dir, "output directory does not exist; run the participant level first")
    scans = discover_scans(output_dir)
    subjects = sorted({s.subject for s in scans} | crash_log_subjects(output_dir))
    if not subjects:
        raise NeurocurateError(f"{output_dir}: no derivatives (sub-*/anat, sub-*/func) and no crash logs found")
    sites = _sites(output_dir, cfg.qc.site_column)
    tpl = _Templates(cfg)
    cache = metric_cache(output_dir, cfg, tpl)
    # Metrics come from the cache where a scan's files, the metric code and the metric settings are unchanged;
    # only the other scans are measured. Decisions are always taken afresh (build_table).
    keys = [cache.key(scan.modality, scan_inputs(scan, output_dir)) for scan in scans]
    cached = [cache.get(key) for key in keys]
    todo = [i for i, metrics in enumerate(cached) if metrics is None]
    raw_root = source_dataset(output_dir)
    site_of = [_scan_site(scan, sites, raw_root) for scan in scans]
    results = parallel_map(Star(scan_record), [(scans[i], output_dir, cfg, tpl, site_of[i])
                                               for i in todo], workers=cfg.dask.workers,
                           dask=cfg.dask, catch=(InputError, ValueError), progress="qc", unit="scan") if todo else []
    measured = dict(zip(todo, results, strict=True))
    records, failed = [], {}
    for i, scan in enumerate(scans):
        rel = scan.path.relative_to(output_dir).as_posix()
        if cached[i] is not None:
            records.append({**_identity(scan, output_dir, site_of[i]), **cached[i]})
        elif isinstance(measured[i], MapError):
            log.error("QC of %s failed: %s", scan.path, measured[i].message)
            failed.setdefault(scan.subject, []).append(measured[i].message)
        else:
            record = measured[i]
            cache.put(keys[i], {k: v for k, v in record.items() if k not in _IDENTITY_COLUMNS}, rel)
            records.append(record)
        crash_point("qc.scan_recorded")
    USER_LOG.info(f"QC metrics: {cache.misses} scan(s) measured, {cache.hits} from the cache "
                  f"({OutputLayout(output_dir).qc_cache_dir})")
    df = build_table(records, cfg.qc, load_ratings(output_dir))
    write_table(df, output_dir)
    crash_point("qc.table_written")
    write_resolved_config(cfg, OutputLayout(output_dir).curation_dir)
    error_subjects = sorted(set(failed) | crash_log_subjects(output_dir))
    scan_keys = {scan.path.relative_to(output_dir).as_posix(): key for scan, key in zip(scans, keys, strict=True)}
    report_code = _report_code_digest()
    written = 0
    for subject in subjects:
        written += _subject_report(output_dir, subject, cfg, tpl, table=df, scan_keys=scan_keys,
                                   report_code=report_code)[1]
        crash_point("qc.subject_report_written")
    USER_LOG.info(f"QC reports: {written} subject report(s) drawn, {len(subjects) - written} unchanged")
    write_group_report(output_dir, df, cfg, error_subjects)
    cache.prune()
    log.info("curation: %d scans, %d included; reports in %s", len(df), int(df["include"].sum()), OutputLayout(output_dir).reports_dir)
    return EXIT_PARTIAL if failed else EXIT_OK


def crash_log_subjects(output_dir: Path) -> set[str]:
    """Labels of subjects named by a file in ``OUTPUT_DIR/logs``."""
    logs = OutputLayout(output_dir).logs_dir
    if not logs.is_dir():
        return set()
    found = set()
    for path in logs.rglob("*"):
        m = re.search(r"sub-([A-Za-z0-9]+)", path.name)
        if path.is_file() and m:
            found.add(m.group(1))
    return found
