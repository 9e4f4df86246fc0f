"""BIDS-Derivatives names for every output, in one place.

Every stage finds or writes derivatives through these functions rather than
formatting names itself, so the layout changes in one place only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipeline import __version__
from pipeline.core.atomic import atomic_write_text

__all__ = [
    "ENTITY_ORDER",
    "SPACE",
    "AnatOutputs",
    "FuncOutputs",
    "anat_outputs",
    "build_name",
    "func_outputs",
    "parse_name",
    "raw_source",
    "raw_source_uri",
    "source_dataset",
    "write_dataset_description",
]

SPACE = "MNI152NLin6Asym"

# BIDS entity order for file names.
ENTITY_ORDER = (
    "sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "part",
    "from", "to", "mode", "space", "res", "atlas", "label", "desc",
)
_ENTITY_RE = re.compile(r"^[A-Za-z0-9]+$")
_NAME_RE = re.compile(r"(?P<key>[a-zA-Z]+)-(?P<value>[a-zA-Z0-9]+)")


def build_name(entities: Mapping[str, str | int | None], suffix: str, extension: str) -> str:
    """Compose a BIDS file name from entities in canonical order.

    Parameters
    ----------
    entities : mapping
        Entity key (``sub``, ``ses``, ``space``, ...) to value; ``None`` or
        ``""`` values are skipped.
    suffix : str
        BIDS suffix (``T1w``, ``mask``, ``bold``, ``xfm``, ``timeseries``...).
    extension : str
        With its leading dot (``.nii.gz``).
    """
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown BIDS entities {sorted(unknown)}")
    parts = []
    for key in ENTITY_ORDER:
        value = entities.get(key)
        if value is None or value == "":
            continue
        value = str(value)
        if not _ENTITY_RE.match(value):
            raise ValueError(f"entity {key}-{value!r} must be alphanumeric")
        parts.append(f"{key}-{value}")
    parts.append(suffix)
    return "_".join(parts) + extension


def parse_name(path: str | Path) -> tuple[dict[str, str], str, str]:
    """Split a BIDS file name into (entities, suffix, extension)."""
    name = Path(path).name
    stem, dot, ext = name.partition(".")
    pieces = stem.split("_")
    entities = {}
    for piece in pieces[:-1]:
        m = _NAME_RE.fullmatch(piece)
        if m:
            entities[m.group("key")] = m.group("value")
    return entities, pieces[-1], dot + ext


def _subject_dir(output_dir: Path, entities: Mapping[str, str | None], datatype: str) -> Path:
    d = output_dir / f"sub-{entities['sub']}"
    if entities.get("ses"):
        d = d / f"ses-{entities['ses']}"
    return d / datatype


def source_entities(entities: Mapping[str, str | int | None]) -> dict[str, str]:
    """Keep the entities that identify a scan (sub, ses, task, acq, ce, rec, dir, run, echo)."""
    keep = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo")
    return {k: str(entities[k]) for k in keep if entities.get(k) not in (None, "")}


@dataclass(frozen=True)
class AnatOutputs:
    """Paths of one anatomical scan's derivatives at one resolution."""

    preproc: Path
    sidecar: Path
    mask: Path
    biasfield: Path
    xfm: Path
    #: With ``[anat] registration = "syn"``: the ITK composite (affine + SyN warp, HDF5) the MNI outputs went through.
    warp: Path


def anat_outputs(output_dir: str | Path, entities: Mapping[str, str | int | None], modality: str, res: int = 2) -> AnatOutputs:
    """Derivative paths for an anatomical scan.

    The T1w brain mask is ``..._desc-brain_mask.nii.gz``; a T2w or FLAIR scan of
    the same subject gets ``desc-<modality>brain`` so the masks do not collide.
    """
    output_dir = Path(output_dir)
    ents = source_entities(entities)
    folder = _subject_dir(output_dir, ents, "anat")
    std = {**ents, "space": SPACE, "res": str(res)}
    mask_desc = "brain" if modality == "T1w" else f"{modality}brain"
    preproc = folder / build_name({**std, "desc": "preproc"}, modality, ".nii.gz")
    return AnatOutputs(
        preproc=preproc,
        sidecar=preproc.with_name(preproc.name.replace(".nii.gz", ".json")),
        mask=folder / build_name({**std, "desc": mask_desc}, "mask", ".nii.gz"),
        biasfield=folder / build_name({**std, "desc": "biasfield"}, modality, ".nii.gz"),
        xfm=folder / build_name({**ents, "from": modality, "to": SPACE, "mode": "image"}, "xfm", ".mat"),
        warp=folder / build_name({**ents, "from": modality, "to": SPACE, "mode": "image"}, "xfm", ".h5"),
    )


@dataclass(frozen=True)
class FuncOutputs:
    """Paths of one BOLD run's derivatives."""

    preproc: Path
    sidecar: Path
    mask: Path
    confounds: Path
    confounds_json: Path
    boldref: Path


def func_outputs(output_dir: str | Path, entities: Mapping[str, str | int | None], res: int = 2) -> FuncOutputs:
    """Derivative paths for a BOLD run in MNI space."""
    output_dir = Path(output_dir)
    ents = source_entities(entities)
    folder = _subject_dir(output_dir, ents, "func")
    std = {**ents, "space": SPACE, "res": str(res)}
    preproc = folder / build_name({**std, "desc": "preproc"}, "bold", ".nii.gz")
    confounds = folder / build_name({**ents, "desc": "confounds"}, "timeseries", ".tsv")
    return FuncOutputs(
        preproc=preproc,
        sidecar=preproc.with_name(preproc.name.replace(".nii.gz", ".json")),
        mask=folder / build_name({**std, "desc": "brain"}, "mask", ".nii.gz"),
        confounds=confounds,
        confounds_json=confounds.with_suffix(".json"),
        boldref=folder / build_name(std, "boldref", ".nii.gz"),
    )


def timeseries_output(output_dir: str | Path, entities: Mapping[str, str | int | None], atlas: str) -> Path:
    """Path of an ROI time-series TSV (its JSON sidecar has the same stem)."""
    ents = source_entities(entities)
    folder = _subject_dir(Path(output_dir), ents, "func")
    return folder / build_name({**ents, "atlas": atlas}, "timeseries", ".tsv")


def write_dataset_description(output_dir: str | Path, source_dir: str | Path | None = None) -> Path:
    """Write (or keep) ``dataset_description.json`` with ``GeneratedBy``."""
    output_dir = Path(output_dir)
    path = output_dir / "dataset_description.json"
    desc = {
        "Name": "neurocurate derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {"Name": "neurocurate", "Version": __version__, "CodeURL": "https://github.com/neurocurate/neurocurate"}
        ],
    }
    if source_dir is not None:
        desc["SourceDatasets"] = [{"URL": Path(source_dir).resolve().as_uri()}]
    text = json.dumps(desc, indent=2) + "\n"
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


#: BIDS URI scheme of a derivative's raw input in its sidecar's ``Sources`` (relative to the source dataset).
_RAW_SOURCE_PREFIX = "bids:raw:"


def raw_source_uri(relative_path: str | Path) -> str:
    """The ``Sources`` entry naming a raw file by its path inside the source dataset."""
    return f"{_RAW_SOURCE_PREFIX}{Path(relative_path).as_posix()}"


def raw_source(sidecar: Mapping[str, object]) -> str | None:
    """The raw file a derivative sidecar names (:func:`raw_source_uri`), relative to its source dataset;
    None when it names none."""
    sources = sidecar.get("Sources", [])
    if not isinstance(sources, list):
        return None
    return next((s.removeprefix(_RAW_SOURCE_PREFIX) for s in sources
                 if isinstance(s, str) and s.startswith(_RAW_SOURCE_PREFIX)), None)


def source_dataset(output_dir: str | Path) -> Path | None:
    """The local raw BIDS dataset named by :func:`write_dataset_description` (``SourceDatasets``);
    None when the description names none or cannot be read."""
    try:
        desc = json.loads((Path(output_dir) / "dataset_description.json").read_text())
        url = next(d["URL"] for d in desc.get("SourceDatasets", []) if str(d.get("URL", "")).startswith("file://"))
    except (OSError, ValueError, KeyError, StopIteration, TypeError, AttributeError):
        return None
    return Path(unquote(urlparse(url).path))
