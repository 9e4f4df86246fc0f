"""A corpus of bad inputs, each built from tiny synthetic data into a temporary folder.

Every :class:`BadInput` knows how to build one broken input, how to feed it
to the cheapest real entry point that validates it (the same function the
pipeline calls, never a copy of its checks), and what the one-line message
must say. ``tests/test_bad_inputs.py`` runs them all; the corpus lives apart
from the test so other tests and benchmarks can reuse the builders.

A case's ``trigger`` returns the one message the user sees: the text of the
:class:`~pipeline.core.errors.NeurocurateError` that stops the work, or, for inputs
the pipeline repairs or skips (qform/sform disagreement, header/sidecar TR
mismatch, non-BIDS names, phenotype rows without labels), the logged or
reported line about that file. ``verify`` (optional) checks that nothing
else was lost: the other files were still processed, the store unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pipeline.core.errors import NeurocurateError

__all__ = ["BadInput", "Built", "Ctx", "CASES", "error_of", "logged_about"]

VOXEL_MM = 2.0
SHAPE = (16, 16, 16)
ROIS = ["roiA", "roiB", "roiC", "roiD"]


@dataclass(frozen=True)
class Ctx:
    """Where a case builds (``tmp``) and pytest's ``monkeypatch`` for the few that must fake the OS."""

    tmp: Path
    monkeypatch: Any


@dataclass
class Built:
    """A built bad input: the file the message must name, plus what the trigger needs."""

    offending: Path
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadInput:
    """One bad input of the corpus.

    Attributes
    ----------
    name : str
        Test id.
    build : callable
        ``build(ctx) -> Built``: writes the bad input (and any good neighbours).
    trigger : callable
        ``trigger(ctx, built) -> str``: runs the real validation and returns
        the message it produced.
    reason : str
        Regular expression the message must match (the stated reason).
    verify : callable, optional
        ``verify(ctx, built)``: asserts that nothing else was lost.
    full_path : bool
        The message names the file by its full path (False: by its name,
        for reports about files of a folder the user passed).
    """

    name: str
    build: Callable[[Ctx], Built]
    trigger: Callable[[Ctx, Built], str]
    reason: str
    verify: Callable[[Ctx, Built], None] | None = None
    full_path: bool = True


# --------------------------------------------------------------------------- capture helpers


def error_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Call ``fn`` and return the text of the :class:`NeurocurateError` it raises.

    Raises
    ------
    AssertionError
        When ``fn`` returns without raising (the bad input went unnoticed).
    """
    try:
        fn(*args, **kwargs)
    except NeurocurateError as exc:
        return str(exc)
    raise AssertionError(f"{getattr(fn, '__name__', fn)} accepted the bad input without an error")


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _capture(logger_name: str) -> Iterator[_ListHandler]:
    logger = logging.getLogger(logger_name)
    handler = _ListHandler()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(old_level or logging.WARNING, logging.WARNING))
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def logged_about(logger_name: str, path: Path, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Run ``fn`` and return the warning it logged about ``path`` (all warnings when none names it)."""
    with _capture(logger_name) as handler:
        fn(*args, **kwargs)
    about = [m for m in handler.messages if path.name in m]
    return about[0] if len(about) == 1 else "\n".join(handler.messages) or "(nothing logged)"


# --------------------------------------------------------------------------- tiny images


def _head(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    """A bright ellipsoid in noise: enough contrast to pass every structural check."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape[:3], dtype=np.float32)
    centre = (np.array(shape[:3], dtype=np.float32) - 1) / 2
    r2 = sum(((g - c) / (c * 0.8)) ** 2 for g, c in zip(grid, centre))
    vol = np.where(r2 < 1, 100.0, 5.0).astype(np.float32) + rng.normal(0, 1, shape[:3]).astype(np.float32)
    if len(shape) == 4:
        vol = np.repeat(vol[..., None], shape[3], axis=3) + rng.normal(0, 1, shape).astype(np.float32)
    return vol


def _affine() -> np.ndarray:
    return np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None, tr: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, _affine() if affine is None else affine)
    if tr is not None:
        img.header.set_zooms((VOXEL_MM,) * 3 + (tr,))
        img.header.set_xyzt_units("mm", "sec")
    img.to_filename(path)
    return path


def _t1w(ctx: Ctx, name: str = "sub-01_T1w.nii.gz", **kwargs: Any) -> Path:
    return _save(ctx.tmp / name, _head(), **kwargs)


def _bids(ctx: Ctx, files: dict[str, np.ndarray], description: bool = True) -> Path:
    root = ctx.tmp / "bids"
    root.mkdir(parents=True, exist_ok=True)
    if description:
        (root / "dataset_description.json").write_text(json.dumps({"Name": "bad inputs", "BIDSVersion": "1.9.0"}))
    for rel, data in files.items():
        _save(root / rel, data)
    return root


# --------------------------------------------------------------------------- anatomical images


def _validate_anat(ctx: Ctx, built: Built) -> str:
    from workflows.ops.anat import validate_anat_file

    return error_of(validate_anat_file, str(built.offending), str(ctx.tmp / "validated.nii.gz"))


def _build_truncated(ctx: Ctx) -> Built:
    path = _t1w(ctx)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return Built(path)


def _build_zero_byte(ctx: Ctx) -> Built:
    path = ctx.tmp / "sub-01_T1w.nii.gz"
    path.touch()
    return Built(path)


def _build_4d_t1w(ctx: Ctx) -> Built:
    return Built(_save(ctx.tmp / "sub-01_T1w.nii.gz", _head((*SHAPE, 3))))


def _build_nan_inf(ctx: Ctx) -> Built:
    data = _head()
    data[3, 3, 3] = np.nan
    data[4, 4, 4] = np.inf
    return Built(_save(ctx.tmp / "sub-01_T1w.nii.gz", data))


def _build_all_zero(ctx: Ctx) -> Built:
    return Built(_save(ctx.tmp / "sub-01_T1w.nii.gz", np.zeros(SHAPE, np.float32)))


def _build_degenerate_affine(ctx: Ctx) -> Built:
    path = ctx.tmp / "sub-01_T1w.nii.gz"
    singular = _affine()
    singular[:3, 2] = 0.0  # the third voxel axis maps nowhere
    img = nib.Nifti1Image(_head(), None)
    img.set_sform(singular, code=2)
    img.header["qform_code"] = 0
    img.header["pixdim"][1:4] = 0.0  # no voxel size to fall back on either
    img.to_filename(path)
    return Built(path)


def _build_qform_sform(ctx: Ctx) -> Built:
    path = ctx.tmp / "sub-01_T1w.nii.gz"
    img = nib.Nifti1Image(_head(), _affine())
    shifted = _affine()
    shifted[:3, 3] = [30.0, 0.0, 0.0]
    img.set_sform(_affine(), code=1)
    img.set_qform(shifted, code=1)
    img.to_filename(path)
    return Built(path)


def _trigger_qform_sform(ctx: Ctx, built: Built) -> str:
    from workflows.interfaces.anat import ValidateAnat

    work = ctx.tmp / "validate"
    work.mkdir()
    ctx.monkeypatch.chdir(work)
    return logged_about("workflows", built.offending, ValidateAnat(in_file=str(built.offending)).run)


def _build_unreadable(ctx: Ctx) -> Built:
    path = _t1w(ctx)
    path.chmod(0)
    if os.geteuid() == 0:
        # root reads any file whatever its mode; make the permission check see what a user would.
        import workflows.ops.anat as anat_ops

        real_access = os.access
        ctx.monkeypatch.setattr(anat_ops.os, "access",
                                lambda p, mode, **kw: False if Path(p) == path else real_access(p, mode, **kw))
    return Built(path)


# --------------------------------------------------------------------------- BOLD runs


def _build_bold(ctx: Ctx, n_vols: int, tr: float, name: str = "sub-01_task-rest_bold.nii.gz") -> Path:
    return _save(ctx.tmp / name, _head((8, 8, 8, n_vols)), tr=tr)


def _build_missing_tr(ctx: Ctx) -> Built:
    path = _build_bold(ctx, 10, tr=0.0)
    sidecar = path.with_name(path.name.replace(".nii.gz", ".json"))
    sidecar.write_text(json.dumps({"TaskName": "rest"}))  # no RepetitionTime
    return Built(path, {"sidecar": sidecar})


def _trigger_missing_tr(ctx: Ctx, built: Built) -> str:
    from workflows.ops.bold import validate_bold

    meta = json.loads(built.extra["sidecar"].read_text())
    return error_of(validate_bold, built.offending, meta.get("RepetitionTime"))


def _build_short_bold(ctx: Ctx) -> Built:
    return Built(_build_bold(ctx, 3, tr=2.0))


def _build_bold_3d(ctx: Ctx) -> Built:
    return Built(_save(ctx.tmp / "sub-01_task-rest_bold.nii.gz", _head((8, 8, 8))))


def _trigger_bold(ctx: Ctx, built: Built) -> str:
    from workflows.ops.bold import validate_bold

    return error_of(validate_bold, built.offending, 2.0)


def _build_tr_mismatch(ctx: Ctx) -> Built:
    return Built(_build_bold(ctx, 10, tr=1.79))


def _trigger_tr_mismatch(ctx: Ctx, built: Built) -> str:
    from workflows.interfaces.bold import ValidateBold

    work = ctx.tmp / "validate"
    work.mkdir()
    ctx.monkeypatch.chdir(work)
    node = ValidateBold(bold_file=str(built.offending), repetition_time=2.0)
    message = logged_about("workflows", built.offending, node.run)
    if json.loads((work / "validation.json").read_text())["RepetitionTime"] != 2.0:
        raise AssertionError("the sidecar RepetitionTime must win over the header")
    return message


# --------------------------------------------------------------------------- BIDS layout


def _build_bad_participants(ctx: Ctx) -> Built:
    root = _bids(ctx, {"sub-01/anat/sub-01_T1w.nii.gz": _head()})
    path = root / "participants.tsv"
    path.write_text("participant_id\tage\tsex\nsub-01\t33\tM\nsub-02\t41\n")
    return Built(path, {"root": root})


def _trigger_participants(ctx: Ctx, built: Built) -> str:
    from pipeline.core.bids import read_participants

    return error_of(read_participants, built.extra["root"])


def _build_no_description(ctx: Ctx) -> Built:
    root = _bids(ctx, {"sub-01/anat/sub-01_T1w.nii.gz": _head()}, description=False)
    return Built(root, {"root": root})


def _trigger_cli_prep(ctx: Ctx, built: Built) -> str:
    from pipeline.cli import main
    from pipeline.core.errors import EXIT_ERROR

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["prep", str(built.extra["root"]), str(ctx.tmp / "out"), "participant"])
    if code != EXIT_ERROR:
        raise AssertionError(f"neurocurate prep exited {code}, expected {EXIT_ERROR}")
    return err.getvalue().strip()


def _build_bad_description(ctx: Ctx) -> Built:
    root = _bids(ctx, {"sub-01/anat/sub-01_T1w.nii.gz": _head()}, description=False)
    path = root / "dataset_description.json"
    path.write_text('{"Name": "cut off", ')
    return Built(path, {"root": root})


def _trigger_check_root(ctx: Ctx, built: Built) -> str:
    from pipeline.core.bids import check_bids_root

    return error_of(check_bids_root, built.extra["root"])


def _collect(ctx: Ctx, built: Built):
    from pipeline.core.bids import collect_scans, index_dataset

    return collect_scans(index_dataset(built.extra["root"], ctx.tmp / "work"))


def _build_non_bids_name(ctx: Ctx) -> Built:
    root = _bids(ctx, {
        "sub-01/anat/sub-01_T1w.nii.gz": _head(),
        "sub-01/anat/sub-01_T1.nii.gz": _head(seed=1),  # "T1" is no BIDS suffix
        "sub-02/anat/sub-02_T1w.nii.gz": _head(seed=2),
    })
    return Built(root / "sub-01/anat/sub-01_T1.nii.gz", {"root": root})


def _trigger_non_bids(ctx: Ctx, built: Built) -> str:
    with _capture("pipeline.core.bids") as handler:
        built.extra["scans"] = _collect(ctx, built)
    built.extra["messages"] = handler.messages
    return handler.messages[0] if len(handler.messages) == 1 else "\n".join(handler.messages)


def _verify_non_bids(ctx: Ctx, built: Built) -> None:
    scans = built.extra["scans"]
    assert len(built.extra["messages"]) == 1, "only the misnamed file is reported"
    assert sorted(scans) == ["01", "02"], scans
    assert [Path(s.path).name for s in scans["01"].anat] == ["sub-01_T1w.nii.gz"]


def _build_duplicate_runs(ctx: Ctx) -> Built:
    root = _bids(ctx, {
        "sub-01/anat/sub-01_run-1_T1w.nii.gz": _head(),
        "sub-01/anat/sub-01_run-01_T1w.nii.gz": _head(seed=1),  # the same run index written twice
        "sub-02/anat/sub-02_T1w.nii.gz": _head(seed=2),
    })
    return Built(root / "sub-01/anat/sub-01_run-1_T1w.nii.gz", {"root": root})


def _build_duplicate_extension(ctx: Ctx) -> Built:
    root = _bids(ctx, {
        "sub-01/anat/sub-01_T1w.nii": _head(),
        "sub-01/anat/sub-01_T1w.nii.gz": _head(seed=1),  # converted twice, once uncompressed
        "sub-02/anat/sub-02_T1w.nii.gz": _head(seed=2),
    })
    return Built(root / "sub-01/anat/sub-01_T1w.nii.gz", {"root": root})


def _trigger_duplicate(ctx: Ctx, built: Built) -> str:
    from pipeline.core.bids import collect_scans, index_dataset

    layout = index_dataset(built.extra["root"], ctx.tmp / "work")
    built.extra["other"] = collect_scans(layout, ["02"])
    return error_of(collect_scans, layout, ["01"])


def _verify_duplicate(ctx: Ctx, built: Built) -> None:
    # Only the subject with the duplicate is refused: another subject (an HPC array job) still runs.
    assert [Path(s.path).name for s in built.extra["other"]["02"].anat] == ["sub-02_T1w.nii.gz"]


# --------------------------------------------------------------------------- shards, checkpoints


def _shard_samples(ctx: Ctx, subjects: list[str]):
    import pandas as pd

    rows = [{"sample_id": f"sub-{s}_run-1", "subject": s, "store": "fmri-Toy", "kind": "fmri", "atlas": "Toy",
             "fingerprint": "v1", "split": "train"} for s in subjects]
    return pd.DataFrame(rows)


def _read_sample(row: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(int(row["subject"]))
    return {"x_TR": rng.standard_normal((24, len(ROIS))).astype(np.float32), "roi_names": ROIS}


def _shard_cfg():
    from pipeline.core.config import ShardsConfig

    return ShardsConfig(samples_per_shard=2, chunk_frames=8)


def _build_corrupted_shard(ctx: Ctx) -> Built:
    from pipeline.core.layout import shard_path
    from pipeline.store.write import write_shards

    shards = ctx.tmp / "shards"
    index = write_shards(_shard_samples(ctx, ["01", "02"]), shards, _shard_cfg(), read_sample=_read_sample)
    shard_file = shard_path(shards / "fmri-Toy", 0) / "data" / "c" / "0" / "0"
    raw = shard_file.read_bytes()
    shard_file.write_bytes(raw[: len(raw) // 3])
    return Built(shard_file, {"index": index, "store": shards / "fmri-Toy"})


def _trigger_corrupted_shard(ctx: Ctx, built: Built) -> str:
    from pipeline.store.read import read_fmri_rows

    index = built.extra["index"]
    return error_of(read_fmri_rows, built.extra["store"], 0, index["offset"].to_numpy(), index["length"].to_numpy())


def _build_corrupted_shard_metadata(ctx: Ctx) -> Built:
    built = _build_corrupted_shard(ctx)
    meta = built.offending.parents[2] / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    return Built(meta, built.extra)


def _build_corrupted_anat_shard(ctx: Ctx) -> Built:
    import pandas as pd

    from pipeline.core.config import ShardsConfig
    from pipeline.core.layout import shard_path
    from pipeline.store.write import write_shards

    rows = pd.DataFrame([{"sample_id": f"sub-0{i}_T1w", "subject": f"0{i}", "store": "anat", "kind": "anat",
                          "split": "train"} for i in (1, 2)])

    def read_sample(row: dict[str, Any]) -> dict[str, Any]:
        volume = _head((8, 8, 8), seed=int(row["subject"]))
        return {"volume": volume, "mask": (volume > 50).astype(np.uint8), "affine": _affine()}

    write_shards(rows, ctx.tmp / "shards", ShardsConfig(anat_samples_per_shard=2, crop_box=(8, 8, 8)),
                 read_sample=read_sample)
    shard = shard_path(ctx.tmp / "shards" / "anat", 0)
    volumes = shard / "x" / "c" / "0" / "0" / "0" / "0"  # zstd-compressed, with a checksummed shard index
    raw = volumes.read_bytes()
    volumes.write_bytes(raw[: len(raw) // 2])
    return Built(shard)


def _trigger_anat_shard(ctx: Ctx, built: Built) -> str:
    from pipeline.store.read import read_anat_rows

    return error_of(read_anat_rows, built.offending.parents[1], 0, np.array([0, 1]))


def _build_corrupted_index(ctx: Ctx) -> Built:
    from pipeline.core.layout import INDEX_NAME
    from pipeline.store.write import write_shards

    shards = ctx.tmp / "shards"
    write_shards(_shard_samples(ctx, ["01"]), shards, _shard_cfg(), read_sample=_read_sample)
    path = shards / INDEX_NAME
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return Built(path, {"shards": shards})


def _trigger_corrupted_index(ctx: Ctx, built: Built) -> str:
    from pipeline.store.read import read_index

    return error_of(read_index, built.extra["shards"])


def _build_disk_full(ctx: Ctx) -> Built:
    from zarr.storage import LocalStore

    from pipeline.core.layout import CATALOG_NAME, INDEX_NAME, shard_path

    from pipeline.store.write import write_shards

    shards = ctx.tmp / "shards"
    store = shards / "fmri-Toy"
    write_shards(_shard_samples(ctx, ["01", "02"]), shards, _shard_cfg(), read_sample=_read_sample)
    before = {p: p.read_bytes() for p in (shards / INDEX_NAME, store / CATALOG_NAME)}
    before.update({p: p.read_bytes() for p in shard_path(store, 0).rglob("*") if p.is_file()})

    async def no_space(self, key, value):  # every zarr chunk and metadata write goes through here
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(str(self.root)) / key))

    ctx.monkeypatch.setattr(LocalStore, "set", no_space)
    return Built(shard_path(store, 1), {"shards": shards, "store": store, "before": before})


def _trigger_disk_full(ctx: Ctx, built: Built) -> str:
    from pipeline.store.write import write_shards

    return error_of(write_shards, _shard_samples(ctx, ["01", "02", "03"]), built.extra["shards"], _shard_cfg(),
                    read_sample=_read_sample)


def _verify_disk_full(ctx: Ctx, built: Built) -> None:
    from pipeline.store.read import read_fmri_rows, read_index
    from pipeline.store.write import write_shards

    store = built.extra["store"]
    for path, raw in built.extra["before"].items():
        assert path.read_bytes() == raw, f"{path} changed after a failed write"
    leftovers = sorted(p.name for p in (store / "shards").iterdir() if p.is_dir())
    assert leftovers == ["shard-000000"], leftovers
    index, _ = read_index(built.extra["shards"])
    assert sorted(index["subject"]) == ["01", "02"]
    x = read_fmri_rows(store, 0, index["offset"].to_numpy(), index["length"].to_numpy())
    assert all(np.isfinite(a).all() and a.shape == (24, len(ROIS)) for a in x)
    # With space again the same call publishes the missing sample and leaves shard 0 alone.
    ctx.monkeypatch.undo()
    index = write_shards(_shard_samples(ctx, ["01", "02", "03"]), built.extra["shards"], _shard_cfg(),
                         read_sample=_read_sample)
    assert sorted(index["subject"]) == ["01", "02", "03"] and set(index["shard"]) == {0, 1}


def _build_corrupted_checkpoint(ctx: Ctx) -> Built:
    import torch

    from pipeline.pretrain.checkpoint import checkpoint_path, save_checkpoint

    path = checkpoint_path(ctx.tmp / "run", 100)
    path.parent.mkdir(parents=True)
    save_checkpoint(path, {"model": {"w": torch.zeros(64, 64)}, "step": 100})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return Built(path)


def _build_foreign_checkpoint(ctx: Ctx) -> Built:
    import torch

    path = ctx.tmp / "step-00000001.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)  # someone else's checkpoint
    return Built(path)


def _build_pickled_checkpoint(ctx: Ctx) -> Built:
    import torch

    path = ctx.tmp / "step-00000002.pt"
    torch.save({"model": {}, "step": 2, "stats": np.arange(3)}, path)  # a numpy array is no plain type
    return Built(path)


def _trigger_checkpoint(ctx: Ctx, built: Built) -> str:
    from pipeline.pretrain.checkpoint import load_checkpoint

    return error_of(load_checkpoint, built.offending)


# --------------------------------------------------------------------------- atlases, series, phenotypes


def _labels_image(ctx: Ctx, labels: list[int], dtype=np.int16) -> Path:
    data = np.zeros((8, 8, 8), dtype=dtype)
    for k, label in enumerate(labels):
        data[k * 2:(k + 1) * 2, :, :] = label
    return _save(ctx.tmp / "atlas-Toy_dseg.nii.gz", data)


def _build_atlas_mismatch(ctx: Ctx) -> Built:
    image = _labels_image(ctx, [1, 2, 3])
    table = ctx.tmp / "atlas-Toy_dseg.tsv"
    table.write_text("index\tname\n1\tleft\n2\tright\n3\tmiddle\n4\textra\n")
    return Built(table, {"image": image})


def _trigger_atlas(ctx: Ctx, built: Built) -> str:
    from pipeline.roi.atlas import load_atlas

    image = built.extra.get("image", built.offending)
    table = built.offending if "image" in built.extra else None
    return error_of(load_atlas, image, table)


def _build_float_atlas(ctx: Ctx) -> Built:
    path = ctx.tmp / "atlas-Prob_probseg.nii.gz"
    _save(path, np.random.default_rng(0).uniform(0, 1, (8, 8, 8)).astype(np.float32))
    return Built(path)


def _series_file(ctx: Ctx, file_id: str, values: np.ndarray | None = None) -> Path:
    path = ctx.tmp / "rois" / f"{file_id}_rois_cc200.1D"
    path.parent.mkdir(parents=True, exist_ok=True)
    x_TR = np.random.default_rng(len(file_id)).standard_normal((30, 3)) if values is None else values
    lines = ["\t".join(f"#{i + 1}" for i in range(x_TR.shape[1]))]
    lines += ["\t".join(f"{v:.6f}" for v in row) for row in x_TR]
    path.write_text("\n".join(lines) + "\n")
    return path


def _build_series_nan(ctx: Ctx) -> Built:
    values = np.random.default_rng(0).standard_normal((30, 3))
    values[7, 1] = np.nan
    return Built(_series_file(ctx, "NYU_0050952", values))


def _trigger_series(ctx: Ctx, built: Built) -> str:
    from pipeline.stages.import_series import read_series

    return error_of(read_series, built.offending)


def _build_no_labels(ctx: Ctx) -> Built:
    good = _series_file(ctx, "NYU_0050951")
    bad = _series_file(ctx, "NYU_0050952")
    pheno = ctx.tmp / "phenotypes.csv"
    pheno.write_text(
        "FILE_ID,SUB_ID,SITE_ID,DX_GROUP,SEX,AGE_AT_SCAN\n"
        "NYU_0050951,50951,NYU,1,1,12.5\n"
        "NYU_0050952,50952,NYU,-9999,,-9999\n"
    )
    return Built(bad, {"good": good, "pheno": pheno, "out": ctx.tmp / "derivatives"})


def _trigger_no_labels(ctx: Ctx, built: Built) -> str:
    from pipeline.core.config import ImportConfig
    from pipeline.stages.import_series import import_timeseries

    report = import_timeseries([built.offending.parent], built.extra["out"], ImportConfig(atlas_name="CC200",
                               repetition_time=2.0), phenotypes=built.extra["pheno"])
    built.extra["report"] = report
    about = [w for w in report.warnings + report.errors if built.offending.name in w]
    return about[0] if len(about) == 1 else "\n".join(report.warnings + report.errors)


def _verify_no_labels(ctx: Ctx, built: Built) -> None:
    import pandas as pd

    report = built.extra["report"]
    assert report.ok and len(report.runs) == 2, report.summary()
    table = pd.read_csv(built.extra["out"] / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    rows = dict(zip(table["participant_id"], table["diagnosis"]))
    assert rows == {"sub-0050951": "autism", "sub-0050952": "n/a"}, rows


def _build_unknown_file_id(ctx: Ctx) -> Built:
    built = _build_no_labels(ctx)
    stray = _series_file(ctx, "UCLA_0051201")
    return Built(stray, built.extra)


def _verify_unknown_file_id(ctx: Ctx, built: Built) -> None:
    report = built.extra["report"]
    assert len(report.runs) == 2 and len(report.errors) == 1, report.summary()


def _build_bad_timeseries_tsv(ctx: Ctx) -> Built:
    path = ctx.tmp / "sub-01_task-rest_atlas-Toy_timeseries.tsv"
    path.write_text("roiA\troiB\n0.1\t0.2\n0.3\tabc\n")
    return Built(path)


def _trigger_timeseries_tsv(ctx: Ctx, built: Built) -> str:
    from pipeline.store.collect import read_timeseries_tsv

    return error_of(read_timeseries_tsv, built.offending)


CASES: tuple[BadInput, ...] = (
    BadInput("truncated_nii_gz", _build_truncated, _validate_anat, r"cannot be read as NIfTI"),
    BadInput("zero_byte_file", _build_zero_byte, _validate_anat, r"empty \(0 bytes\)"),
    BadInput("t1w_4d", _build_4d_t1w, _validate_anat, r"expected a 3D structural image, got shape \(16, 16, 16, 3\)"),
    BadInput("nan_inf_voxels", _build_nan_inf, _validate_anat, r"contains 2 NaN/Inf voxels"),
    BadInput("all_zero_image", _build_all_zero, _validate_anat, r"all zeros"),
    BadInput("degenerate_affine", _build_degenerate_affine, _validate_anat, r"degenerate affine"),
    BadInput("qform_ne_sform", _build_qform_sform, _trigger_qform_sform,
             r"qform and sform disagreed by up to 30\.0 mm: kept the sform"),
    BadInput("unreadable_file", _build_unreadable, _validate_anat, r"not readable \(permission denied\)"),
    BadInput("missing_repetition_time", _build_missing_tr, _trigger_missing_tr,
             r"no RepetitionTime in the sidecar and none in the NIfTI header"),
    BadInput("too_few_bold_volumes", _build_short_bold, _trigger_bold, r"3 volumes, fewer than the 5 required"),
    BadInput("bold_not_4d", _build_bold_3d, _trigger_bold, r"must be 4-D"),
    BadInput("header_sidecar_tr_mismatch", _build_tr_mismatch, _trigger_tr_mismatch,
             r"header TR 1\.79 s disagrees with sidecar RepetitionTime 2 s"),
    BadInput("malformed_participants_tsv", _build_bad_participants, _trigger_participants,
             r"line 3 has 2 fields, expected 3"),
    BadInput("missing_dataset_description", _build_no_description, _trigger_cli_prep,
             r"dataset_description\.json is missing"),
    BadInput("invalid_dataset_description", _build_bad_description, _trigger_check_root, r"not valid JSON"),
    BadInput("non_bids_names", _build_non_bids_name, _trigger_non_bids, r"not a valid BIDS file name", _verify_non_bids),
    BadInput("duplicate_runs", _build_duplicate_runs, _trigger_duplicate, r"duplicate of .*sub-01_run-01_T1w",
             _verify_duplicate),
    BadInput("duplicate_nii_and_nii_gz", _build_duplicate_extension, _trigger_duplicate,
             r"duplicate of .*sub-01_T1w\.nii \(", _verify_duplicate),
    BadInput("corrupted_shard", _build_corrupted_shard, _trigger_corrupted_shard, r"corrupted shard"),
    BadInput("corrupted_shard_metadata", _build_corrupted_shard_metadata, _trigger_corrupted_shard,
             r"corrupted shard metadata"),
    BadInput("corrupted_anat_shard", _build_corrupted_anat_shard, _trigger_anat_shard, r"corrupted shard"),
    BadInput("corrupted_shard_index", _build_corrupted_index, _trigger_corrupted_index, r"not a readable shard index"),
    BadInput("disk_full_writing_shard", _build_disk_full, _trigger_disk_full,
             r"could not write the shard \(No space left on device\)", _verify_disk_full),
    BadInput("corrupted_checkpoint", _build_corrupted_checkpoint, _trigger_checkpoint, r"not a loadable checkpoint, truncated or corrupt"),
    BadInput("foreign_checkpoint", _build_foreign_checkpoint, _trigger_checkpoint, r"missing model/step"),
    BadInput("checkpoint_with_numpy_objects", _build_pickled_checkpoint, _trigger_checkpoint,
             r"holds numpy\S* objects, which a weights-only load refuses"),
    BadInput("atlas_label_table_mismatch", _build_atlas_mismatch, _trigger_atlas,
             r"label table does not match the atlas image: labels \[4\] \(1\) are in the table but not in"),
    BadInput("probabilistic_atlas", _build_float_atlas, _trigger_atlas, r"non-integer values"),
    BadInput("series_with_nan", _build_series_nan, _trigger_series, r"non-finite value at row 8, column 2"),
    BadInput("phenotype_row_without_labels", _build_no_labels, _trigger_no_labels,
             r"missing age, sex, diagnosis", _verify_no_labels, full_path=False),
    BadInput("series_without_phenotype_row", _build_unknown_file_id, _trigger_no_labels,
             r"FILE_ID 'UCLA_0051201' has no row in the phenotypic file", _verify_unknown_file_id),
    BadInput("timeseries_tsv_non_numeric", _build_bad_timeseries_tsv, _trigger_timeseries_tsv, r"non-numeric values"),
)
