"""Stage ``import``: precomputed ROI series (ABIDE PCP ``.1D``, TSV, CSV, NPY) as derivatives.

Entry point: :func:`run_import`. What follows (``neurocurate qc OUT``, ``gradients``, ``shards``,
``pretrain``, ``evaluate``) treats imported runs exactly like preprocessed ones.

Each input file becomes one run ``sub-<label>/func/sub-<label>_task-<task>_atlas-<name>_timeseries.tsv``
with the same JSON sidecar as a preprocessed run (``Source: "imported"``), so
curation, gradients and shards treat both alike. With an ABIDE phenotypic CSV
the subjects are merged into ``OUTPUT_DIR/participants.tsv``.

ABIDE conventions: the file ``<FILE_ID>_rois_cc200.1D`` belongs to the
phenotype row with that ``FILE_ID``; the subject label is ``SUB_ID``
zero-padded to 7 digits (``0050952``), as in ABIDE's own file names;
``DX_GROUP`` 1/2 -> ``autism``/``control``; ``SEX`` 1/2 -> ``M``/``F``;
-9999 and empty cells -> missing (reported, not fatal).

One bad file never stops the others: problems are collected in
:class:`ImportReport` and the command exits 3 ("partial") when any file failed.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_write_text
from pipeline.core.config import ImportConfig
from pipeline.core.config import Config, write_resolved_config
from pipeline.core.console import USER_LOG
from pipeline.core.layout import OutputLayout
from pipeline.core.derivatives import parse_name, timeseries_output, write_dataset_description
from pipeline.core.errors import InputError
from pipeline.roi.parcellation import write_timeseries, zero_variance_columns

__all__ = [
    "IMPORT_CONFIG_NAME",
    "ImportReport",
    "ImportedRun",
    "abide_file_id",
    "import_timeseries",
    "run_import",
    "load_abide_phenotypes",
    "merge_participants",
    "read_series",
    "sanitize_label",
]

#: The config an import ran with, next to its outputs (apart from the pipeline's own resolved config).
IMPORT_CONFIG_NAME = "neurocurate_import_config.toml"
MISSING_CODE = -9999
_SERIES_EXT = (".1D", ".tsv", ".csv", ".npy")
_FILE_ID_RE = re.compile(r"_rois_[A-Za-z0-9]+$")

# Phenotype columns kept in participants.tsv, beyond the four labels.
_EXTRA_COLUMNS = {
    "FILE_ID": "file_id",
    "SUB_ID": "abide_sub_id",
    "DSM_IV_TR": "dsm_iv_tr",
    "FIQ": "fiq",
    "VIQ": "viq",
    "PIQ": "piq",
    "HANDEDNESS_CATEGORY": "handedness",
    "EYE_STATUS_AT_SCAN": "eye_status_at_scan",
    "CURRENT_MED_STATUS": "current_med_status",
    "ADOS_TOTAL": "ados_total",
    "SRS_RAW_TOTAL": "srs_raw_total",
    "func_mean_fd": "func_mean_fd",
    "func_perc_fd": "func_perc_fd",
}
_REQUIRED_COLUMNS = ("FILE_ID", "SUB_ID", "SITE_ID", "DX_GROUP", "SEX", "AGE_AT_SCAN")


def sanitize_label(text: str) -> str:
    """BIDS label: keep letters and digits only."""
    return re.sub(r"[^A-Za-z0-9]", "", str(text))


def abide_file_id(path: str | Path) -> str:
    """``NYU_0050952_rois_cc200.1D`` -> ``NYU_0050952``."""
    return _FILE_ID_RE.sub("", Path(path).name.split(".")[0])


def read_series(path: str | Path, atlas_name: str = "CC200") -> tuple[np.ndarray, tuple[str, ...]]:
    """Read one ROI series file into ``(series_TR, roi_names)``.

    Parameters
    ----------
    path : path-like
        ``.1D`` (whitespace table, optional ``#1 #2 ...`` header), ``.tsv`` /
        ``.csv`` (optional header row of ROI names) or ``.npy`` (2-D array,
        time x ROI).
    atlas_name : str
        Prefix for numbered ROIs: header ``#7`` or column 7 -> ``<atlas>_7``.

    Raises
    ------
    InputError
        When the file is missing, not a rectangular numeric table, empty, or
        holds non-finite values.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise InputError(path, "series file does not exist")
    if suffix == ".npy":
        try:
            series = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(path, f"not a readable .npy array ({exc})") from None
        if series.ndim != 2 or not np.issubdtype(series.dtype, np.number):
            raise InputError(path, f"expected a 2-D numeric array (time x ROI), got {series.dtype} {series.shape}")
        names: list[str] | None = None
    else:
        series, names = _read_text_table(path, suffix)
    series = np.asarray(series, dtype=np.float64)
    if series.shape[0] == 0 or series.shape[1] == 0:
        raise InputError(path, "series file holds no data rows")
    if not np.all(np.isfinite(series)):
        bad = np.argwhere(~np.isfinite(series))[0]
        raise InputError(path, f"non-finite value at row {bad[0] + 1}, column {bad[1] + 1}")
    if names is None or all(re.fullmatch(r"#?\d+", n) for n in names):
        numbers = [n.lstrip("#") for n in names] if names else [str(i + 1) for i in range(series.shape[1])]
        names = [f"{atlas_name}_{n}" for n in numbers]
    if len(set(names)) != len(names):
        raise InputError(path, "ROI names in the header are not unique")
    return series, tuple(names)


def _read_text_table(path: Path, suffix: str) -> tuple[np.ndarray, list[str] | None]:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise InputError(path, "not a text table") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise InputError(path, "series file is empty")
    if suffix == ".csv":
        split = lambda ln: [c.strip() for c in ln.split(",")]  # noqa: E731
    elif suffix == ".tsv":
        split = lambda ln: [c.strip() for c in ln.split("\t")]  # noqa: E731
    else:
        split = str.split
    header: list[str] | None = None
    first = split(lines[0])
    if lines[0].lstrip().startswith("#") or not _all_numeric(first):
        header = [c for c in first if c]
        if suffix == ".1D" and lines[0].lstrip().startswith("#"):
            # ".1D" headers are "#1\t#2 ..." or "# 1 2 ..." (AFNI comment)
            header = [h for h in re.split(r"\s+", lines[0].strip()) if h and h != "#"]
        lines = lines[1:]
    first_line = 2 if header is not None else 1
    rows = [split(ln) for ln in lines]
    if not rows:
        raise InputError(path, "series file holds no data rows")
    widths = [len(r) for r in rows]
    width = widths[0]
    for k, w in enumerate(widths):
        if w != width:
            raise InputError(path, f"line {k + first_line}: {w} columns, expected {width}")
    if header is not None and len(header) != width:
        raise InputError(path, f"header names {len(header)} ROIs but rows have {width} columns")
    try:
        return np.array(rows, dtype=np.float64), header
    except ValueError:
        for k, cells in enumerate(rows):
            try:
                [float(c) for c in cells]
            except ValueError:
                raise InputError(path, f"line {k + first_line}: non-numeric value in {lines[k][:60]!r}") from None
        raise


def _all_numeric(cells: Sequence[str]) -> bool:
    try:
        [float(c) for c in cells if c]
    except ValueError:
        return False
    return True


def load_abide_phenotypes(path: str | Path):
    """Read the ABIDE PCP phenotypic CSV, indexed by ``FILE_ID``.

    -9999 and empty cells become NaN.

    Raises
    ------
    InputError
        When the file is unreadable, lacks a required column or repeats a FILE_ID.
    """
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path, na_values=[str(MISSING_CODE), f"{MISSING_CODE}.0"], low_memory=False)
    except FileNotFoundError:
        raise InputError(path, "phenotypic file does not exist") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InputError(path, f"not a readable CSV ({exc})") from None
    missing = [c for c in _REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}")
    table = table.replace(MISSING_CODE, np.nan)
    table = table[table["FILE_ID"].notna() & (table["FILE_ID"] != "no_filename")]
    dup = table["FILE_ID"][table["FILE_ID"].duplicated()]
    if len(dup):
        raise InputError(path, f"FILE_ID {dup.iloc[0]!r} appears more than once")
    return table.set_index("FILE_ID", drop=False)


def _participant_row(row) -> tuple[dict, list[str]]:
    """participants.tsv row from a phenotype row, plus the labels that are missing."""
    dx = {1: "autism", 2: "control"}.get(_as_int(row["DX_GROUP"]))
    sex = {1: "M", 2: "F"}.get(_as_int(row["SEX"]))
    age = _as_float(row["AGE_AT_SCAN"])
    site = row["SITE_ID"] if isinstance(row["SITE_ID"], str) and row["SITE_ID"] else None
    out = {"age": age, "sex": sex, "diagnosis": dx, "site": site}
    missing = [k for k, v in out.items() if v is None or (isinstance(v, float) and np.isnan(v))]
    for src, dst in _EXTRA_COLUMNS.items():
        if src in row.index:
            value = row[src]
            out[dst] = None if (isinstance(value, float) and np.isnan(value)) else value
    return out, missing


def _as_int(value) -> int | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(f) else int(f)


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


@dataclass(frozen=True)
class ImportedRun:
    """One imported run."""

    source: Path
    output: Path
    subject: str
    site: str | None
    n_volumes: int
    zero_variance_rois: tuple[str, ...]
    repetition_time: float | None


@dataclass
class ImportReport:
    """What an import did: runs written, files that failed, warnings."""

    runs: list[ImportedRun] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    too_short: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no file failed."""
        return not self.errors

    def summary(self) -> str:
        """A few lines for the terminal."""
        n_zero = sum(1 for r in self.runs if r.zero_variance_rois)
        lines = [
            f"imported {len(self.runs)} run(s); {len(self.errors)} file(s) failed; "
            f"{n_zero} run(s) with zero-variance ROIs; {len(self.too_short)} too short"
        ]
        lines += [f"error: {e}" for e in self.errors]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _collect_files(inputs: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.is_file() and p.suffix in _SERIES_EXT)
        else:
            files.append(item)
    return files


def import_timeseries(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    cfg: ImportConfig = ImportConfig(),
    phenotypes: str | Path | None = None,
    sites: Sequence[str] | None = None,
    participant_labels: Sequence[str] | None = None,
    limit: int | None = None,
) -> ImportReport:
    """Import ROI series files into ``output_dir`` as BIDS derivatives.

    Parameters
    ----------
    inputs : sequence of path-like
        Files or folders (folders contribute their ``.1D/.tsv/.csv/.npy`` files).
    output_dir : path-like
        Derivatives root.
    cfg : ImportConfig
        Atlas name, task, TRs per site, minimum length.
    phenotypes : path-like, optional
        ABIDE PCP phenotypic CSV; each file's ``FILE_ID`` must have a row.
        Without it, the subject label is the file name made alphanumeric (or
        the ``sub-`` entity of a BIDS-like name) and no participants rows are
        written.
    sites : sequence of str, optional
        Keep only these ``SITE_ID`` values (needs ``phenotypes``).
    participant_labels : sequence of str, optional
        Keep only these subject labels (with or without ``sub-``).
    limit : int, optional
        Import at most this many files (after the other filters, in sorted order).

    Returns
    -------
    ImportReport
    """
    output_dir = Path(output_dir)
    for entity, value in (("atlas", cfg.atlas_name), ("task", cfg.task)):
        if not re.fullmatch(r"[A-Za-z0-9]+", value):
            raise InputError(f"{entity} name", f"{value!r} must be alphanumeric (it becomes a BIDS entity)")
    report = ImportReport()
    pheno = load_abide_phenotypes(phenotypes) if phenotypes is not None else None
    if sites and pheno is None:
        raise InputError("--sites", "filtering by site needs the phenotypic CSV (--phenotypes)")
    wanted = {sanitize_label(p.removeprefix("sub-")) for p in participant_labels} if participant_labels else None
    wanted_sites = {s.upper() for s in sites} if sites else None

    plan: list[tuple[Path, str, dict | None, str | None]] = []
    for path in _collect_files(inputs):
        subject, prow, site = _identify(path, pheno, report)
        if subject is None:
            continue
        if wanted_sites is not None and (site or "").upper() not in wanted_sites:
            continue
        if wanted is not None and subject not in wanted:
            continue
        if prow is not None:
            missing = prow.pop("_missing")
            if missing:
                report.warnings.append(f"sub-{subject} ({path.name}): missing {', '.join(missing)} (-9999 or empty; left as n/a)")
        plan.append((path, subject, prow, site))
    if limit is not None:
        plan = plan[: max(int(limit), 0)]

    participants: dict[str, dict] = {}
    written: dict[Path, Path] = {}
    for path, subject, prow, site in plan:
        run = _import_one(path, subject, site, output_dir, cfg, report, written)
        if run is None:
            continue
        report.runs.append(run)
        if prow is not None:
            participants[f"sub-{subject}"] = prow

    if report.runs:
        write_dataset_description(output_dir)
    if participants:
        merge_participants(OutputLayout(output_dir).participants, participants)
    return report


def _identify(path: Path, pheno, report: ImportReport) -> tuple[str | None, dict | None, str | None]:
    """Subject label, participants row and site of one input file."""
    if pheno is None:
        entities, _, _ = parse_name(path)
        label = entities.get("sub") or sanitize_label(abide_file_id(path))
        if not label:
            report.errors.append(f"{path}: cannot derive a subject label from the file name")
            return None, None, None
        return label, None, None
    file_id = abide_file_id(path)
    if file_id not in pheno.index:
        report.errors.append(f"{path}: FILE_ID {file_id!r} has no row in the phenotypic file")
        return None, None, None
    row = pheno.loc[file_id]
    sub_id = _as_int(row["SUB_ID"])
    if sub_id is None:
        report.errors.append(f"{path}: phenotype row {file_id!r} has no SUB_ID")
        return None, None, None
    subject = f"{sub_id:07d}"
    prow, missing = _participant_row(row)
    prow["_missing"] = missing
    return subject, prow, prow["site"]


def _import_one(path: Path, subject: str, site: str | None, output_dir: Path, cfg: ImportConfig, report: ImportReport, written: dict[Path, Path]) -> ImportedRun | None:
    try:
        series_TR, names = read_series(path, cfg.atlas_name)
    except InputError as exc:
        report.errors.append(str(exc))
        return None
    # BIDS-like input names keep their session/acquisition/run (and task) entities
    entities = {"task": cfg.task}
    entities.update({k: v for k, v in parse_name(path)[0].items() if k in ("ses", "task", "acq", "run")})
    out = timeseries_output(output_dir, {**entities, "sub": subject}, cfg.atlas_name)
    if out in written:
        report.errors.append(f"{path}: same output {out.name} as {written[out]} (one run per subject and task)")
        return None
    written[out] = path
    tr: float | None = cfg.repetition_time if cfg.repetition_time > 0 else cfg.site_repetition_time.get(site or "")
    if tr is None:
        report.warnings.append(f"{path}: RepetitionTime unknown (site {site!r}); pass --tr")
    zero_var = tuple(n for n, z in zip(names, zero_variance_columns(series_TR)) if z)
    n_vols = int(series_TR.shape[0])
    if n_vols < cfg.min_volumes:
        report.too_short.append(f"{path.name}: {n_vols} volumes < {cfg.min_volumes}")
    sidecar = {
        "RepetitionTime": tr,
        "AtlasName": cfg.atlas_name,
        "ROINames": list(names),
        "NumberOfVolumes": n_vols,
        "EmptyROIs": [],
        "ZeroVarianceROIs": list(zero_var),
        "Source": "imported",
        "Sources": [str(path.resolve())],
        "SiteID": site,
    }
    write_timeseries(out, series_TR, names, sidecar)
    return ImportedRun(path, out, subject, site, n_vols, zero_var, tr)


def merge_participants(path: str | Path, rows: dict[str, dict]) -> Path:
    """Merge ``{participant_id: columns}`` into a participants.tsv, atomically.

    Existing rows of other participants are kept; rows of the same
    participants are replaced; columns are the union (``n/a`` where missing).
    """
    import pandas as pd

    path = Path(path)
    new = pd.DataFrame.from_dict(rows, orient="index")
    new.index.name = "participant_id"
    new = new.reset_index()
    if path.exists():
        try:
            old = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype=str)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise InputError(path, f"existing participants.tsv is not readable ({exc})") from None
        if "participant_id" not in old.columns:
            raise InputError(path, "existing participants.tsv has no participant_id column")
        old = old[~old["participant_id"].isin(new["participant_id"])]
        merged = pd.concat([old, new.astype(object)], ignore_index=True)
    else:
        merged = new
    first = ["participant_id", "age", "sex", "diagnosis", "site"]
    columns = [c for c in first if c in merged.columns] + [c for c in merged.columns if c not in first]
    merged = merged[columns].sort_values("participant_id", kind="stable")
    buf = io.StringIO()
    merged.to_csv(buf, sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    atomic_write_text(path, buf.getvalue())
    return path


def run_import(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    cfg: Config,
    *,
    phenotypes: str | Path | None = None,
    sites: Sequence[str] | None = None,
    participant_labels: Sequence[str] | None = None,
    limit: int | None = None,
) -> ImportReport:
    """Import ROI series files into OUTPUT_DIR (the ``[timeseries_import]`` section applies).

    Writes the runs, their sidecars, ``participants.tsv`` and the config the import ran with. The report says
    what was imported and names every file that was not (``report.ok`` is False then; the others are imported).
    """
    report = import_timeseries(inputs, output_dir, cfg.timeseries_import, phenotypes=phenotypes, sites=sites,
                               participant_labels=participant_labels, limit=limit)
    if report.runs:
        write_resolved_config(cfg, output_dir, name=IMPORT_CONFIG_NAME)
    (USER_LOG.error if report.errors else USER_LOG.info)(report.summary())
    return report
