"""The one owner of every path under OUTPUT_DIR, SHARDS_DIR and RUN_DIR, and of the curation-table schema.

Nothing else in the code base spells a folder or file name of the outputs: it asks
these classes. A derivative's own BIDS name (``sub-01/anat/sub-01_..._T1w.nii.gz``)
is built by :mod:`pipeline.core.derivatives`; this module owns everything around it::

    OUTPUT_DIR/
        dataset_description.json, participants.tsv   BIDS-Derivatives descriptions
        sub-<label>/...                               derivatives (pipeline.core.derivatives)
        logs/sub-<label>_<node>_crash.txt             one file per failed scan or subject
        curation/curation.{parquet,tsv}               the curation table (CURATION_* columns below)
        curation/ratings.json                         reviewer ratings
        curation/neurocurate_config.toml              the config the QC group step ran with
        reports/group.html, reports/sub-<label>.html  QC reports
        gradients/atlas-<name>_gradients.{tsv,json}   group gradients of the curated ROI series
        shards/                                       SHARDS_DIR (default; [shards].shards_dir moves it)
        pretrain/                                     RUN_DIR of ``neurocurate run``
        .work/                                        nipype work folder (default)
        .manifests/<stage>.json                       what each stage last ran on
        .qc-cache/<sha256>.json                       QC metrics of one scan, keyed by its inputs' content (qc.cache)

    SHARDS_DIR/
        index.parquet                                 the sample index (all stores)
        <store>/                                      one Zarr v3 store: fmri-<atlas> or anat
            catalog.parquet, norm.json, shards/shard-<6 digits>/ (see pipeline.store.write)

    RUN_DIR/
        checkpoints/step-<8 digits>.pt, metrics.jsonl
        training_data.json, training_gradients.npy    what the run was trained on (shards, store, ROI set, gradients)
        evaluation/<target>_<split>/report.{html,json}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ANAT_STORE",
    "CATALOG_NAME",
    "CONFIG_NAME",
    "CURATION_DECISION_COLUMNS",
    "CURATION_ENTITY_COLUMNS",
    "EVALUATION_REPORT",
    "CURATION_NON_METRIC_COLUMNS",
    "OutputLayout",
    "RunLayout",
    "INDEX_NAME",
    "NORM_NAME",
    "ShardsLayout",
    "curation_metric_columns",
    "shard_path",
    "store_gradients",
    "store_shards_dir",
]

#: Name of the resolved config written next to a stage's outputs.
CONFIG_NAME = "neurocurate_config.toml"
#: SHARDS_DIR/index.parquet: one row per curated sample of every store.
INDEX_NAME = "index.parquet"
#: SHARDS_DIR/<store>/catalog.parquet: every sample ever published in the store.
CATALOG_NAME = "catalog.parquet"
#: SHARDS_DIR/<store>/norm.json: per-ROI robust statistics of the training split.
NORM_NAME = "norm.json"
#: The HTML page of an evaluation report folder (next to ``results.json`` and ``predictions.tsv``).
EVALUATION_REPORT = "report.html"
#: Name of the anatomical store (fMRI stores are ``fmri-<atlas>``).
ANAT_STORE = "anat"

#: Curation table: the scan's identity (BIDS entities, modality, site, derivative path relative to OUTPUT_DIR).
CURATION_ENTITY_COLUMNS: tuple[str, ...] = ("subject", "session", "task", "acq", "ce", "run", "modality", "site", "path")
#: Curation table: the decision columns, after the metric columns, in this order.
#: ``qc_layer``: the curation layers that rejected the scan (absolute, reference, dataset, classifier);
#: ``qc_reason``: why, in words; ``p_artifact``: the classifier's probability of a severe artifact.
CURATION_DECISION_COLUMNS: tuple[str, ...] = (
    "qc_pass", "qc_layer", "failed_rules", "qc_reason", "p_artifact", "outlier_metrics",
    "override", "override_comment", "include",
)
#: Every column of the curation table that is not a QC metric.
CURATION_NON_METRIC_COLUMNS: frozenset[str] = frozenset(CURATION_ENTITY_COLUMNS + CURATION_DECISION_COLUMNS)


def curation_metric_columns(columns) -> list[str]:
    """The QC-metric columns among ``columns`` of a curation table, in their order."""
    return [c for c in columns if c not in CURATION_NON_METRIC_COLUMNS]


@dataclass(frozen=True)
class OutputLayout:
    """Paths of a derivatives root (OUTPUT_DIR)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- BIDS-Derivatives descriptions
    @property
    def dataset_description(self) -> Path:
        return self.root / "dataset_description.json"

    @property
    def participants(self) -> Path:
        return self.root / "participants.tsv"

    def subject_dir(self, label: str) -> Path:
        return self.root / f"sub-{label}"

    def subject_dirs(self) -> list[Path]:
        """Existing ``sub-*`` folders, sorted."""
        return sorted(p for p in self.root.glob("sub-*") if p.is_dir())

    # -- logs
    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def crash_log(self, label: str, node: str) -> Path:
        return self.logs_dir / f"sub-{label}_{node}_crash.txt"

    def crash_logs(self, label: str | None = None) -> list[Path]:
        """Existing crash files, of one subject or of all."""
        pattern = f"sub-{label}_*_crash.txt" if label else "sub-*_crash.txt"
        return sorted(self.logs_dir.glob(pattern))

    # -- curation
    @property
    def curation_dir(self) -> Path:
        return self.root / "curation"

    @property
    def curation_table(self) -> Path:
        return self.curation_dir / "curation.parquet"

    @property
    def curation_tsv(self) -> Path:
        return self.curation_dir / "curation.tsv"

    @property
    def ratings(self) -> Path:
        return self.curation_dir / "ratings.json"

    @property
    def curation_config(self) -> Path:
        return self.curation_dir / CONFIG_NAME

    # -- reports
    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def group_report(self) -> Path:
        return self.reports_dir / "group.html"

    def subject_report(self, label: str) -> Path:
        return self.reports_dir / f"sub-{label}.html"

    # -- gradients
    @property
    def gradients_dir(self) -> Path:
        return self.root / "gradients"

    def gradients_tsv(self, atlas: str) -> Path:
        return self.gradients_dir / f"atlas-{atlas}_gradients.tsv"

    def gradients_json(self, atlas: str) -> Path:
        return self.gradients_dir / f"atlas-{atlas}_gradients.json"

    def gradients_files(self) -> list[Path]:
        return sorted(self.gradients_dir.glob("atlas-*_gradients.tsv"))

    # -- downstream defaults
    @property
    def default_shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def pretrain_dir(self) -> Path:
        return self.root / "pretrain"

    @property
    def default_work_dir(self) -> Path:
        return self.root / ".work"

    @property
    def manifests_dir(self) -> Path:
        return self.root / ".manifests"

    def manifest(self, stage: str) -> Path:
        return self.manifests_dir / f"{stage}.json"

    @property
    def qc_cache_dir(self) -> Path:
        """Per-scan QC metrics of the group step, one file per content key (:mod:`qc.cache`)."""
        return self.root / ".qc-cache"

    def qc_cache_entry(self, key: str) -> Path:
        return self.qc_cache_dir / f"{key}.json"

    @property
    def resolved_config(self) -> Path:
        return self.root / CONFIG_NAME


@dataclass(frozen=True)
class ShardsLayout:
    """Paths of a shards folder (SHARDS_DIR)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def index(self) -> Path:
        return self.root / INDEX_NAME

    def store_dir(self, store: str) -> Path:
        return self.root / store

    def catalog(self, store: str) -> Path:
        return self.store_dir(store) / CATALOG_NAME

    def norm(self, store: str) -> Path:
        return self.store_dir(store) / NORM_NAME

    @property
    def resolved_config(self) -> Path:
        return self.root / CONFIG_NAME


def store_shards_dir(store_dir: str | Path) -> Path:
    """The folder of a store's shards (a zarr group)."""
    return Path(store_dir) / "shards"


def shard_path(store_dir: str | Path, shard: int) -> Path:
    """Directory of shard number ``shard`` inside a store."""
    return store_shards_dir(store_dir) / f"shard-{int(shard):06d}"


def store_gradients(store_dir: str | Path) -> Path:
    """A store's ``[R, k]`` gradient array (zarr)."""
    return Path(store_dir) / "gradients"


@dataclass(frozen=True)
class RunLayout:
    """Paths of a pretraining run folder (RUN_DIR)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{int(step):08d}.pt"

    def checkpoints(self) -> list[Path]:
        """Existing checkpoints, oldest step first (the zero-padded name order is the step order)."""
        return sorted(self.checkpoints_dir.glob("step-*.pt"))

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def training_data(self) -> Path:
        """What the run was trained on: shards folder, store, split, ROI set and the gradients' digest (JSON)."""
        return self.root / "training_data.json"

    @property
    def training_gradients(self) -> Path:
        """The ``[R, k]`` gradient coordinates the run positioned its ROIs with (a copy, ``.npy``)."""
        return self.root / "training_gradients.npy"

    def evaluation_dir(self, target: str, split: str, few_shot: int | None = None) -> Path:
        """The one home of an evaluation report: ``RUN_DIR/evaluation/<target>_<split>[_k<K>]``."""
        return self.root / "evaluation" / f"{target}_{split}{f'_k{few_shot}' if few_shot else ''}"

    @property
    def resolved_config(self) -> Path:
        return self.root / CONFIG_NAME
