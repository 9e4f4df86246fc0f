"""BIDS dataset indexing (pybids) with a cached index in the work directory.

pybids' SQLite index is kept in ``WORK_DIR/bids_db``. A cheap fingerprint of
the dataset tree (every path, size and modification time) decides whether the
cached index is still valid, so a rerun does not re-crawl an unchanged
dataset but a new subject is always seen.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError, NeurocurateError

__all__ = [
    "Scan", "SubjectScans", "check_bids_root", "check_output_dir", "collect_scans", "dataset_fingerprint", "index_dataset",
    "load_bold_image", "read_participants",
]

LOG = logging.getLogger(__name__)

ANAT_SUFFIXES = ("T1w", "T2w", "FLAIR")
# Entities that identify a scan inside a subject and end up in derivative names.
SCAN_ENTITIES = ("subject", "session", "task", "acquisition", "ceagent", "reconstruction", "direction", "run", "echo")
_SHORT = {
    "subject": "sub", "session": "ses", "task": "task", "acquisition": "acq", "ceagent": "ce",
    "reconstruction": "rec", "direction": "dir", "run": "run", "echo": "echo",
}


@dataclass(frozen=True)
class Scan:
    """One image of the dataset."""

    path: str
    suffix: str
    entities: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        """A short name unique within the subject, safe for nipype node names."""
        parts = [f"{k}_{v}" for k, v in self.entities.items() if k != "sub"]
        return "_".join([*parts, self.suffix]).replace("-", "_")


@dataclass(frozen=True)
class SubjectScans:
    subject: str
    anat: tuple[Scan, ...]
    bold: tuple[Scan, ...]


def check_output_dir(bids_dir: str | Path, output_dir: str | Path) -> tuple[Path, Path]:
    """Resolved ``(bids_dir, output_dir)``; one line when they are the same folder."""
    bids_dir, output_dir = Path(bids_dir).resolve(), Path(output_dir).resolve()
    if output_dir == bids_dir:
        raise NeurocurateError(f"{output_dir}: the output folder must differ from the BIDS folder")
    return bids_dir, output_dir


def check_bids_root(bids_dir: str | Path) -> Path:
    """Fail with one line when ``bids_dir`` is not a BIDS dataset."""
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise InputError(bids_dir, "BIDS directory does not exist")
    desc = bids_dir / "dataset_description.json"
    if not desc.is_file():
        raise InputError(bids_dir, "not a BIDS dataset: dataset_description.json is missing")
    try:
        content = json.loads(desc.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(desc, f"is not valid JSON ({exc})") from None
    if not isinstance(content, dict) or "Name" not in content:
        raise InputError(desc, 'must be a JSON object with a "Name" field')
    if not any(p.is_dir() and p.name.startswith("sub-") for p in bids_dir.iterdir()):
        raise InputError(bids_dir, "not a BIDS dataset: no sub-* folders")
    return bids_dir


def dataset_fingerprint(bids_dir: str | Path) -> str:
    """SHA-256 over every path, size and mtime under the dataset (not the contents)."""
    h = hashlib.sha256()
    root = Path(bids_dir)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("derivatives", "sourcedata"))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def index_dataset(bids_dir: str | Path, work_dir: str | Path):
    """Return a pybids ``BIDSLayout``, reusing the cached index when the dataset is unchanged."""
    from bids import BIDSLayout

    bids_dir = check_bids_root(bids_dir)
    db = Path(work_dir) / "bids_db"
    stamp = db / "neurocurate_fingerprint.txt"
    fingerprint = dataset_fingerprint(bids_dir)
    fresh = not (stamp.is_file() and stamp.read_text() == fingerprint)
    if fresh and db.exists():
        shutil.rmtree(db)
    db.mkdir(parents=True, exist_ok=True)
    try:
        layout = BIDSLayout(str(bids_dir), validate=True, database_path=str(db), reset_database=fresh)
    except Exception as exc:  # pybids raises its own validation errors
        raise InputError(bids_dir, f"pybids could not index the dataset ({exc})") from None
    if fresh:
        stamp.write_text(fingerprint)
        LOG.info("indexed %s (cached in %s)", bids_dir, db)
    else:
        LOG.info("reused the cached BIDS index in %s", db)
    return layout


def _entities(bids_file) -> dict[str, str]:
    ents = bids_file.get_entities()
    return {_SHORT[k]: str(ents[k]) for k in SCAN_ENTITIES if k in ents and ents[k] not in (None, "")}


def collect_scans(
    layout, participant_labels: list[str] | None = None, errors: dict[str, InputError] | None = None
) -> dict[str, SubjectScans]:
    """Every T1w, T2w, FLAIR and BOLD NIfTI per subject.

    Parameters
    ----------
    layout : BIDSLayout
    participant_labels : list of str, optional
    errors : dict, optional
        When given, a subject whose scans cannot be processed (a duplicate
        image) is left out and its error stored here under its label, so one
        bad subject never stops the others; otherwise the error is raised.

    Raises
    ------
    NeurocurateError
        When a requested participant label is not in the dataset, or none of
        the selected subjects has a usable image.
    InputError
        When a selected subject has two images with the same entities.
    """
    available = sorted(layout.get_subjects())
    if participant_labels:
        wanted = [label.removeprefix("sub-") for label in participant_labels]
        missing = [w for w in wanted if w not in available]
        if missing:
            raise NeurocurateError(
                f"participant label(s) {', '.join(missing)} not found in {layout.root} "
                f"(available: {', '.join(available) or 'none'})"
            )
    else:
        wanted = available
    out: dict[str, SubjectScans] = {}
    for sub in wanted:
        _warn_unindexed(layout, sub)
        anat = [
            Scan(f.path, f.entities["suffix"], _entities(f))
            for f in layout.get(subject=sub, datatype="anat", suffix=list(ANAT_SUFFIXES), extension=[".nii", ".nii.gz"])
        ]
        bold = []
        for f in layout.get(subject=sub, datatype="func", suffix="bold", extension=[".nii", ".nii.gz"]):
            try:
                meta = f.get_metadata()
            except Exception:  # a malformed sidecar is reported by the BOLD validation
                meta = {}
            bold.append(Scan(f.path, "bold", _entities(f), dict(meta)))
        try:
            _check_duplicates([*anat, *bold])
        except InputError as exc:
            if errors is None:
                raise
            errors[sub] = exc
            continue
        out[sub] = SubjectScans(sub, tuple(sorted(anat, key=lambda s: s.path)), tuple(sorted(bold, key=lambda s: s.path)))
    if not any(s.anat or s.bold for s in out.values()) and not errors:
        raise NeurocurateError(f"no T1w, T2w, FLAIR or BOLD images found for the selected participants in {layout.root}")
    return out


def _warn_unindexed(layout, subject: str) -> None:
    """Log one line per image under ``sub-<label>/`` that pybids skipped because its name is not BIDS."""
    indexed = {os.path.realpath(p) for p in layout.get(subject=subject, extension=[".nii", ".nii.gz"], return_type="file")}
    for path in sorted(Path(layout.root, f"sub-{subject}").rglob("*.nii*")):
        if path.name.endswith((".nii", ".nii.gz")) and os.path.realpath(path) not in indexed:
            LOG.warning("%s: not a valid BIDS file name; ignored", path)


def _check_duplicates(scans: list[Scan]) -> None:
    """Refuse two images of one subject with the same entities (``.nii`` next to ``.nii.gz``, ``run-1`` and ``run-01``).

    Both would write the same derivatives (or BIDS-equal ones), and which one
    the user meant cannot be guessed.
    """
    seen: dict[tuple, str] = {}
    for scan in scans:
        ents = tuple(sorted(
            (k, str(int(v)) if k in ("run", "echo") and v.isdigit() else v) for k, v in scan.entities.items()
        ))
        key = (scan.suffix, ents)
        if key in seen:
            raise InputError(scan.path, f"duplicate of {seen[key]} (same subject, session, task, run and suffix); remove one")
        seen[key] = scan.path


def load_bold_image(bold_file: str | Path):
    """Open a BOLD run, failing with one line that names the file unless it is a readable 4-D image."""
    import nibabel as nib

    try:
        img = nib.load(str(bold_file))
    except FileNotFoundError:
        raise InputError(bold_file, "BOLD file does not exist") from None
    except Exception as exc:
        raise InputError(bold_file, f"cannot read BOLD image ({exc})") from None
    if img.ndim != 4:
        raise InputError(bold_file, f"BOLD image must be 4-D, got shape {img.shape}")
    return img


def read_participants(bids_dir: str | Path) -> list[dict[str, str]] | None:
    """Rows of ``participants.tsv`` (or None when absent); a malformed table is an InputError."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    if not rows or "participant_id" not in rows[0]:
        raise InputError(path, 'malformed participants table: the first row must hold a "participant_id" column')
    header = rows[0]
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InputError(path, f"malformed participants table: line {n} has {len(row)} fields, expected {len(header)}")
    return [dict(zip(header, row)) for row in rows[1:]]
