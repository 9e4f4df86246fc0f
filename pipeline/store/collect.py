"""Collecting samples: the curated scans of an OUTPUT_DIR (curation table + participants.tsv + gradients) as
the samples table that :func:`pipeline.store.write.write_shards` writes, and the readers of their source files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.config import ShardsConfig
from pipeline.core.errors import InputError
from pipeline.core.layout import ANAT_STORE, CURATION_NON_METRIC_COLUMNS, OutputLayout
from pipeline.core.provenance import file_digest
from pipeline.store.read import ANAT_MODALITIES, FMRI_MODALITIES

__all__ = ["collect_samples", "default_read_sample", "file_fingerprint", "read_anat_files", "read_gradients_table", "read_timeseries_tsv"]

log = logging.getLogger(__name__)


def file_fingerprint(path: str | Path) -> str:
    """SHA-1 of a file's bytes: a changed source is written again (SHA-1 so existing stores keep matching)."""
    return file_digest(path, "sha1", 1 << 20)


def read_timeseries_tsv(path: str | Path) -> dict[str, Any]:
    """Read a ``_timeseries.tsv`` (header = ROI names) into ``{"x_TR", "roi_names"}``."""
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t")
    except FileNotFoundError:
        raise InputError(path, "ROI time-series file listed in the curation table does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable TSV ({exc})") from None
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise InputError(path, "ROI time series is empty")
    try:
        x_TR = table.to_numpy(dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(path, "ROI time series has non-numeric values") from None
    if not np.isfinite(x_TR).all():
        raise InputError(path, "ROI time series has NaN or infinite values")
    return {"x_TR": x_TR, "roi_names": [str(c) for c in table.columns]}

def read_anat_files(preproc: str | Path, mask: str | Path) -> dict[str, Any]:
    """Read an MNI anatomical image and its brain mask as ``{"volume", "mask", "affine"}``."""
    import nibabel as nib

    out: dict[str, Any] = {}
    for key, path in (("volume", Path(preproc)), ("mask", Path(mask))):
        try:
            img = nib.load(str(path))
        except FileNotFoundError:
            raise InputError(path, "anatomical derivative listed in the curation table does not exist") from None
        except Exception as exc:  # nibabel raises several unrelated types for corrupt files
            raise InputError(path, f"not a readable NIfTI image ({exc})") from None
        data = np.asarray(img.dataobj)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise InputError(path, f"expected a 3-D image, got shape {data.shape}")
        out[key] = data
        if key == "volume":
            out["affine"] = img.affine
    if out["volume"].shape != out["mask"].shape:
        raise InputError(mask, f"mask shape {out['mask'].shape} differs from image shape {out['volume'].shape}")
    return out

def default_read_sample(row: Mapping[str, Any]) -> dict[str, Any]:
    """Read one sample from the files named in its row (``path``, ``mask_path``)."""
    if row["kind"] == "fmri":
        return read_timeseries_tsv(row["path"])
    return read_anat_files(row["path"], row["mask_path"])

def _atlas_of(path: str) -> str:
    from pipeline.core.derivatives import parse_name

    entities, suffix, _ = parse_name(path)
    if suffix != "timeseries" or "atlas" not in entities:
        raise InputError(path, "fMRI rows of the curation table must point at an _atlas-<name>_timeseries.tsv")
    return entities["atlas"]

def _clean(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)

def collect_samples(output_dir: str | Path, cfg: ShardsConfig = ShardsConfig()) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Turn ``OUTPUT_DIR/curation/curation.parquet`` + participants.tsv into a samples table.

    Returns
    -------
    samples : pandas.DataFrame
        Included rows only, with ``sample_id``, ``store``, ``kind``, ``atlas``,
        absolute ``path`` / ``mask_path``, ``fingerprint``, labels and QC metrics.
    label_columns, qc_columns : list of str
    """
    from pipeline.core.derivatives import anat_outputs

    output_dir = Path(output_dir)
    cur_path = OutputLayout(output_dir).curation_table
    if not cur_path.exists():
        raise InputError(cur_path, "no curation table; run the QC group step first (it writes curation/curation.parquet)")
    try:
        cur = pd.read_parquet(cur_path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise InputError(cur_path, f"not a readable parquet file ({exc})") from None
    missing = {"subject", "modality", "path", "include"} - set(cur.columns)
    if missing:
        raise InputError(cur_path, f"missing column(s) {sorted(missing)}")
    bad = set(cur["modality"]) - set(FMRI_MODALITIES) - set(ANAT_MODALITIES)
    if bad:
        raise InputError(cur_path, f"unknown modality value(s) {sorted(bad)}")
    qc_columns = [c for c in cur.columns if c not in CURATION_NON_METRIC_COLUMNS] + [c for c in ("qc_pass", "override") if c in cur]
    cur = cur[cur["include"].fillna(False).astype(bool)].copy()
    # A preprocessed BOLD run is curated as a scan, but its sample in the shards is its ROI series (own row).
    cur = cur[cur["modality"] != "bold"]
    for col in ("session", "task", "acq", "run", "site"):
        cur[col] = cur[col].map(_clean) if col in cur else ""
    cur["subject"] = cur["subject"].astype(str).str.removeprefix("sub-")

    labels, label_columns = _participants(output_dir)
    rows = []
    for rec in cur.to_dict("records"):
        rel = str(rec["path"])
        rec["source_path"] = rel
        rec["path"] = str(output_dir / rel)
        ents = {"sub": rec["subject"], "ses": rec["session"], "task": rec["task"], "acq": rec["acq"], "run": rec["run"]}
        if rec["modality"] in FMRI_MODALITIES:
            rec["kind"], rec["atlas"] = "fmri", _atlas_of(rel)
            if cfg.atlas and rec["atlas"] != cfg.atlas:
                continue
            rec["store"] = f"fmri-{rec['atlas']}"
            rec["mask_path"] = ""
            rec["sample_id"] = Path(rel).name.removesuffix("_timeseries.tsv")
        else:
            rec["kind"], rec["atlas"], rec["store"] = "anat", "", ANAT_STORE
            outs = anat_outputs(output_dir, ents, rec["modality"])
            rec["mask_path"] = str(outs.mask)
            rec["sample_id"] = Path(rel).name.removesuffix(".nii.gz")
        if not Path(rec["path"]).exists():
            raise InputError(rec["path"], "listed in the curation table but does not exist")
        rec["fingerprint"] = file_fingerprint(rec["path"])
        if rec["kind"] == "anat" and Path(rec["mask_path"]).exists():
            rec["fingerprint"] += ":" + file_fingerprint(rec["mask_path"])
        rows.append(rec)
    samples = pd.DataFrame(rows)
    if samples.empty:
        return samples, label_columns, qc_columns
    if labels is not None:
        overlap = [c for c in label_columns if c in samples.columns]
        samples = samples.merge(labels.rename(columns={c: f"{c}__p" for c in overlap}), on="subject", how="left")
        for c in overlap:
            # The curation table wins (it is per scan); participants.tsv fills its gaps.
            filled = samples[c].replace("", np.nan).fillna(samples[f"{c}__p"])
            samples[c] = filled
            samples = samples.drop(columns=f"{c}__p")
    return samples, label_columns, qc_columns

def _participants(output_dir: Path) -> tuple[pd.DataFrame | None, list[str]]:
    path = OutputLayout(output_dir).participants
    if not path.exists():
        log.warning("%s not found: the index will have no labels", path)
        return None, []
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a", "N/A", ""], dtype={"participant_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable TSV ({exc})") from None
    if "participant_id" not in table:
        raise InputError(path, "has no participant_id column")
    if table["participant_id"].duplicated().any():
        raise InputError(path, f"participant {table.loc[table['participant_id'].duplicated(), 'participant_id'].iloc[0]} listed twice")
    table["subject"] = table["participant_id"].astype(str).str.removeprefix("sub-")
    label_columns = [c for c in table.columns if c not in ("participant_id", "subject")]
    return table.drop(columns="participant_id"), label_columns

def read_gradients_table(output_dir: Path, atlas: str) -> pd.DataFrame | None:
    path = OutputLayout(output_dir).gradients_tsv(atlas)
    if not path.exists():
        return None
    try:
        table = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable TSV ({exc})") from None
    if "roi" not in table or table.shape[1] < 2:
        raise InputError(path, "needs a 'roi' column followed by g1..gk")
    table.attrs["path"] = str(path)
    return table
