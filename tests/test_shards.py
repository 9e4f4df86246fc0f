"""Shard writer + index: round trip, incremental byte-identical appends, crash safety."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import zarr

from pipeline.core.layout import INDEX_NAME, NORM_NAME, shard_path
from pipeline.stages.shards import build_shards
from pipeline.store.read import _plain_layout, read_anat_rows, read_fmri_rows, read_index, read_store_meta
from pipeline.store import write as store_write
from pipeline.store.write import _fmri_arrays, assign_splits, center_crop_pad, write_shards
from pipeline.core.config import ShardsConfig
from pipeline.core.derivatives import anat_outputs, timeseries_output
from pipeline.core.errors import InputError, NeurocurateError

ATLAS = "Toy"
ROIS = [f"roi{i}" for i in range(6)]
CFG = ShardsConfig(samples_per_shard=3, anat_samples_per_shard=2, chunk_frames=16, crop_box=(16, 12, 10))


def _series(subject: str, run: int) -> np.ndarray:
    seed = int(hashlib.sha1(f"{subject}-{run}".encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    T = int(rng.integers(20, 60))
    return (rng.standard_normal((T, len(ROIS))) * np.arange(1, len(ROIS) + 1) + 5).astype(np.float32)


def make_output_dir(root: Path, subjects: list[str], *, runs: int = 2, anat: bool = False,
                    exclude: tuple[str, ...] = ()) -> Path:
    """A tiny OUTPUT_DIR: ROI series, participants.tsv, gradients and a curation table."""
    out = root
    out.mkdir(parents=True, exist_ok=True)
    rows, parts = [], []
    for i, sub in enumerate(subjects):
        site = "A" if i % 2 else "B"
        parts.append({"participant_id": f"sub-{sub}", "age": 20.0 + i, "sex": "F" if i % 2 else "M",
                      "diagnosis": "ASD" if i % 3 == 0 else "TD"})
        for run in range(1, runs + 1):
            ents = {"sub": sub, "task": "rest", "run": str(run)}
            path = timeseries_output(out, ents, ATLAS)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                pd.DataFrame(_series(sub, run), columns=ROIS).to_csv(path, sep="\t", index=False, float_format="%.9g")
            include = f"{sub}-{run}" not in exclude
            rows.append({"subject": sub, "session": "", "task": "rest", "acq": "", "run": str(run),
                         "modality": "timeseries", "site": site, "path": str(path.relative_to(out)),
                         "fd_mean": 0.1 * run, "qc_pass": include, "failed_rules": "", "override": "",
                         "override_comment": "", "include": include})
        if anat:
            outs = anat_outputs(out, {"sub": sub}, "T1w")
            outs.preproc.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(i)
            vol = rng.uniform(0, 100, (20, 10, 9)).astype(np.float32)
            nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])), outs.preproc)
            nib.save(nib.Nifti1Image((vol > 50).astype(np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])), outs.mask)
            rows.append({"subject": sub, "session": "", "task": "", "acq": "", "run": "", "modality": "T1w",
                         "site": site, "path": str(outs.preproc.relative_to(out)), "fd_mean": np.nan,
                         "qc_pass": True, "failed_rules": "", "override": "", "override_comment": "",
                         "include": True})
    pd.DataFrame(parts).to_csv(out / "participants.tsv", sep="\t", index=False)
    (out / "curation").mkdir(exist_ok=True)
    pd.DataFrame(rows).to_parquet(out / "curation" / "curation.parquet")
    grads = pd.DataFrame({"roi": ROIS, "g1": np.linspace(-1, 1, 6), "g2": np.linspace(0, 1, 6)})
    (out / "gradients").mkdir(exist_ok=True)
    grads.to_csv(out / "gradients" / f"atlas-{ATLAS}_gradients.tsv", sep="\t", index=False)
    return out


def _file_hashes(store: Path) -> dict[str, str]:
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((store / "shards").rglob("*")) if p.is_file()}


def _assert_consistent(shards_dir: Path) -> pd.DataFrame:
    """Every index row points at a complete shard whose data can be read."""
    index, _ = read_index(shards_dir)
    for (store, shard), group in index.groupby(["store", "shard"]):
        path = shard_path(shards_dir / store, shard)
        assert path.is_dir()
        node = zarr.open_group(str(path), mode="r")
        assert set(group["sample_id"]) <= set(node.attrs["sample_ids"])
        if group["kind"].iloc[0] == "fmri":
            arrays = read_fmri_rows(shards_dir / store, shard, group["offset"].to_numpy(), group["length"].to_numpy())
            assert [a.shape[0] for a in arrays] == group["length"].tolist()
    leftovers = [p for p in shards_dir.rglob(".*tmp*")]
    assert leftovers == []
    return index


def test_round_trip_index_and_labels(tmp_path):
    out = make_output_dir(tmp_path / "out", ["01", "02", "03", "04"], exclude=("02-2",))
    index = build_shards(out, cfg=CFG)
    shards_dir = out / "shards"
    assert (shards_dir / INDEX_NAME).exists()
    assert len(index) == 7 and "sub-02_task-rest_run-2_atlas-Toy" not in set(index["sample_id"])
    for rec in index.to_dict("records"):
        (x_TR,) = read_fmri_rows(shards_dir / rec["store"], rec["shard"], np.array([rec["offset"]]), np.array([rec["length"]]))
        np.testing.assert_array_equal(x_TR, _series(rec["subject"], int(rec["run"])))
    # A subject's runs always share one split; labels and QC metrics travel with the samples.
    assert index.groupby("subject")["split"].nunique().max() == 1
    row = index[index["subject"] == "03"].iloc[0]
    assert row["age"] == 22.0 and row["sex"] == "M" and row["diagnosis"] == "TD"
    assert "fd_mean" in index and set(index["store"]) == {"fmri-Toy"}
    _, meta = read_index(shards_dir)
    assert meta["label_columns"] == ["age", "sex", "diagnosis"] and "fd_mean" in meta["qc_columns"]
    store_meta = read_store_meta(shards_dir / "fmri-Toy")
    assert store_meta["atlas"] == ATLAS and store_meta["roi_names"] == ROIS
    assert store_meta["gradient_columns"] == ["g1", "g2"]
    grads = zarr.open_array(str(shards_dir / "fmri-Toy" / "gradients"), mode="r")[...]
    np.testing.assert_allclose(grads[:, 0], np.linspace(-1, 1, 6))
    # Many samples per shard file: one zarr shard file holds all runs of the shard.
    shard_files = list((shard_path(shards_dir / "fmri-Toy", 0) / "data" / "c").rglob("*"))
    assert len([p for p in shard_files if p.is_file()]) == 1
    norm = json.loads((shards_dir / "fmri-Toy" / NORM_NAME).read_text())
    assert len(norm["median"]) == 6 and norm["source"] in ("train", "all splits (no training samples)")
    # ROI k has scale k+1 in the synthetic series, so the IQRs must increase.
    assert np.all(np.diff(norm["iqr"]) > 0)
    _assert_consistent(shards_dir)


def test_norm_stats_come_from_training_split_only(tmp_path):
    out = make_output_dir(tmp_path / "out", [f"{i:02d}" for i in range(12)], runs=1)
    index = build_shards(out, cfg=ShardsConfig(samples_per_shard=4, norm_frames_per_sample=1000))
    train = index[index["split"] == "train"]
    assert 0 < len(train) < len(index)
    frames = np.concatenate([_series(s, 1) for s in train["subject"]])
    norm = json.loads((out / "shards" / "fmri-Toy" / NORM_NAME).read_text())
    np.testing.assert_allclose(norm["median"], np.median(frames, axis=0), rtol=1e-5)
    assert norm["n_samples"] == len(train)


def test_anat_volumes_cropped_with_mask(tmp_path):
    out = make_output_dir(tmp_path / "out", ["01", "02", "03"], runs=1, anat=True)
    index = build_shards(out, cfg=CFG)
    anat = index[index["store"] == "anat"]
    assert len(anat) == 3 and set(anat["modality"]) == {"T1w"}
    for rec in anat.to_dict("records"):
        ((vol, mask),) = read_anat_rows(out / "shards" / "anat", rec["shard"], np.array([rec["position"]]))
        src = nib.load(anat_outputs(out, {"sub": rec["subject"]}, "T1w").preproc).get_fdata(dtype=np.float32)
        expected, shift = center_crop_pad(src, CFG.crop_box)
        assert vol.shape == CFG.crop_box and shift == (2, -1, -0)
        np.testing.assert_allclose(vol, expected.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(mask, center_crop_pad((src > 50).astype(np.uint8), CFG.crop_box)[0])
    node = zarr.open_group(str(shard_path(out / "shards" / "anat", 0)), mode="r")
    assert node["x"].dtype == np.float16 and node["x"].shards == (2, *CFG.crop_box)
    # The box affine starts 2 voxels into x and one voxel before y of the source grid.
    assert node.attrs["geometry"][0]["affine"][0][3] == 4.0 and node.attrs["geometry"][0]["affine"][1][3] == -2.0


def test_center_crop_pad_shapes():
    vol = np.arange(91 * 109 * 91, dtype=np.float32).reshape(91, 109, 91)
    out, shift = center_crop_pad(vol, (96, 112, 96))
    assert out.shape == (96, 112, 96) and shift == (-2, -1, -2)
    np.testing.assert_array_equal(out[2:93, 1:110, 2:93], vol)
    small, shift = center_crop_pad(vol, (80, 100, 90))
    np.testing.assert_array_equal(small, vol[5:85, 4:104, 0:90])


def test_incremental_append_keeps_existing_shards_byte_identical(tmp_path):
    out = make_output_dir(tmp_path / "out", ["01", "02", "03"])
    first = build_shards(out, cfg=CFG)
    store = out / "shards" / "fmri-Toy"
    before = _file_hashes(store)
    splits_before = dict(zip(first["subject"], first["split"]))
    make_output_dir(tmp_path / "out", ["01", "02", "03", "04", "05"])
    second = build_shards(out, cfg=CFG)
    after = _file_hashes(store)
    assert all(after[k] == v for k, v in before.items())
    assert len(after) > len(before) and len(second) == 10
    assert set(second[second["subject"].isin(["04", "05"])]["shard"]) == {2, 3}
    assert all(second.set_index("subject")["split"].to_dict()[s] == splits_before[s] for s in splits_before)
    # A rerun with nothing new writes nothing.
    third = build_shards(out, cfg=CFG)
    assert _file_hashes(store) == after
    pd.testing.assert_frame_equal(third.sort_values("sample_id").reset_index(drop=True),
                                  second.sort_values("sample_id").reset_index(drop=True))


def test_changed_source_is_rewritten_into_a_new_shard(tmp_path):
    out = make_output_dir(tmp_path / "out", ["01", "02"])
    build_shards(out, cfg=CFG)
    before = _file_hashes(out / "shards" / "fmri-Toy")
    path = timeseries_output(out, {"sub": "01", "task": "rest", "run": "1"}, ATLAS)
    new_TR = np.ones((30, len(ROIS)), dtype=np.float32)
    pd.DataFrame(new_TR, columns=ROIS).to_csv(path, sep="\t", index=False)
    index = build_shards(out, cfg=CFG)
    assert all(_file_hashes(out / "shards" / "fmri-Toy")[k] == v for k, v in before.items())
    rec = index.set_index("sample_id").loc["sub-01_task-rest_run-1_atlas-Toy"]
    assert rec["shard"] == 2 and rec["length"] == 30
    (x_TR,) = read_fmri_rows(out / "shards" / "fmri-Toy", 2, np.array([rec["offset"]]), np.array([30]))
    np.testing.assert_array_equal(x_TR, new_TR)


def test_exclusion_removes_from_index_but_keeps_shard_files(tmp_path):
    out = make_output_dir(tmp_path / "out", ["01", "02"])
    build_shards(out, cfg=CFG)
    before = _file_hashes(out / "shards" / "fmri-Toy")
    make_output_dir(tmp_path / "out", ["01", "02"], exclude=("01-1",))
    index = build_shards(out, cfg=CFG)
    assert len(index) == 3 and _file_hashes(out / "shards" / "fmri-Toy") == before


def test_interrupted_write_leaves_store_consistent(tmp_path, monkeypatch):
    out = make_output_dir(tmp_path / "out", ["01", "02", "03"])
    build_shards(out, cfg=CFG)
    index_bytes = (out / "shards" / INDEX_NAME).read_bytes()
    make_output_dir(tmp_path / "out", ["01", "02", "03", "04", "05", "06"])

    calls = {"n": 0}
    real = _fmri_arrays

    def crash_on_second_shard(job, read_sample):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash while writing a shard")
        return real(job, read_sample)

    monkeypatch.setattr(store_write, "_fmri_arrays", crash_on_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_shards(out, cfg=CFG)
    # The old index is untouched and still points only at complete shards.
    assert (out / "shards" / INDEX_NAME).read_bytes() == index_bytes
    assert len(_assert_consistent(out / "shards")) == 6
    # A hard kill leaves a temporary directory and an unpublished shard behind.
    store = out / "shards" / "fmri-Toy"
    (store / "shards" / ".shard-000009.tmp-1234" / "data").mkdir(parents=True)
    assert shard_path(store, 2).is_dir()  # written before the crash, never published
    monkeypatch.setattr(store_write, "_fmri_arrays", real)
    index = build_shards(out, cfg=CFG)
    assert len(index) == 12
    assert sorted(p.name for p in (store / "shards").iterdir() if p.is_dir()) == [f"shard-{i:06d}" for i in range(4)]
    _assert_consistent(out / "shards")


def test_parallel_dask_build_matches_serial(tmp_path):
    subjects = [f"{i:02d}" for i in range(6)]
    a = make_output_dir(tmp_path / "a", subjects)
    serial = build_shards(a, cfg=CFG)
    parallel = build_shards(a, tmp_path / "par", cfg=ShardsConfig(**{**CFG.__dict__, "workers": 2}))
    assert _file_hashes(a / "shards" / "fmri-Toy") == _file_hashes(tmp_path / "par" / "fmri-Toy")
    cols = ["sample_id", "shard", "position", "offset", "length", "split"]
    pd.testing.assert_frame_equal(serial[cols], parallel[cols])


def test_missing_curation_table_names_the_qc_step(tmp_path):
    with pytest.raises(InputError, match="run the QC group step"):
        build_shards(tmp_path, cfg=CFG)


def test_roi_mismatch_is_an_input_error(tmp_path):
    out = make_output_dir(tmp_path / "out", ["01", "02"])
    path = timeseries_output(out, {"sub": "02", "task": "rest", "run": "1"}, ATLAS)
    pd.DataFrame(np.zeros((10, 6)), columns=ROIS[::-1]).to_csv(path, sep="\t", index=False)
    with pytest.raises(InputError, match="ROI names differ"):
        build_shards(out, cfg=CFG)
    assert not (out / "shards" / INDEX_NAME).exists()


def test_non_numeric_series_is_an_input_error(tmp_path):
    out = make_output_dir(tmp_path / "out", ["01"])
    path = timeseries_output(out, {"sub": "01", "task": "rest", "run": "2"}, ATLAS)
    path.write_text("\t".join(ROIS) + "\n" + "\t".join(["x"] * 6) + "\n")
    with pytest.raises(InputError, match="non-numeric"):
        build_shards(out, cfg=CFG)


def test_splits_are_stable_and_roughly_proportional():
    subjects = pd.Series([f"s{i}" for i in range(2000)])
    splits = assign_splits(subjects, (0.8, 0.1, 0.1), seed=3)
    frac = splits.value_counts(normalize=True)
    assert abs(frac["train"] - 0.8) < 0.04 and abs(frac["val"] - 0.1) < 0.03
    more = assign_splits(pd.concat([subjects, pd.Series(["new1", "new2"])], ignore_index=True), (0.8, 0.1, 0.1), 3)
    assert (more.iloc[:2000].to_numpy() == splits.to_numpy()).all()
    assert (assign_splits(subjects, (0.8, 0.1, 0.1), 4) != splits).any()
    with pytest.raises(ValueError, match="sum"):
        assign_splits(subjects, (0.5, 0.1, 0.1), 0)


def test_cli_command_builds_shards(tmp_path, capsys):
    from pipeline.cli import main

    out = make_output_dir(tmp_path / "out", ["01", "02"])
    assert main(["shards", str(out), "--samples-per-shard", "2"]) == 0
    assert "4 samples in 1 store(s)" in capsys.readouterr().out
    assert (out / "shards" / "neurocurate_config.toml").exists()
    index, _ = read_index(out / "shards")
    assert index["shard"].max() == 1


def test_concurrent_writer_is_refused(tmp_path):
    import fcntl

    out = make_output_dir(tmp_path / "out", ["01"])
    (out / "shards").mkdir()
    with open(out / "shards" / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(NeurocurateError, match="another 'neurocurate shards' run"):
            build_shards(out, cfg=CFG)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_direct_shard_reader_matches_zarr(tmp_path, dtype):
    runs = {"a-0": np.zeros((40, 4), np.float32), "a-1": np.arange(4 * 70, dtype=np.float32).reshape(70, 4),
            "a-2": np.full((9, 4), -2.5, np.float32)}
    samples = pd.DataFrame({"sample_id": list(runs), "subject": ["x", "y", "z"], "store": "fmri-T", "kind": "fmri",
                            "atlas": "T"})
    cfg = ShardsConfig(samples_per_shard=3, chunk_frames=16, fmri_dtype=dtype)
    index = write_shards(samples, tmp_path, cfg, read_sample=lambda r: {"x_TR": runs[r["sample_id"]]})
    data_dir = shard_path(tmp_path / "fmri-T", 0) / "data"
    assert _plain_layout(data_dir) is not None
    full = zarr.open_array(str(data_dir), mode="r")[...].astype(np.float32)
    # The all-zero first run fills whole chunks, which zarr does not store.
    for lo, hi in [(0, 119), (0, 40), (15, 33), (47, 48), (100, 119)]:
        (got,) = read_fmri_rows(tmp_path / "fmri-T", 0, np.array([lo]), np.array([hi - lo]))
        np.testing.assert_array_equal(got, full[lo:hi])
    for rec in index.to_dict("records"):
        (got,) = read_fmri_rows(tmp_path / "fmri-T", 0, np.array([rec["offset"]]), np.array([rec["length"]]))
        np.testing.assert_array_equal(got, runs[rec["sample_id"]].astype(dtype).astype(np.float32))
    compressed = tmp_path / "z"
    write_shards(samples, compressed, ShardsConfig(samples_per_shard=3, chunk_frames=16, compressor="zstd"),
                    read_sample=lambda r: {"x_TR": runs[r["sample_id"]]})
    assert _plain_layout(shard_path(compressed / "fmri-T", 0) / "data") is None
    (got,) = read_fmri_rows(compressed / "fmri-T", 0, np.array([40]), np.array([70]))
    np.testing.assert_array_equal(got, runs["a-1"])


def test_interrupted_shard_write_waits_for_zarr_io_before_cleanup(tmp_path):
    """A write still pending on zarr's IO loop lands before the cleanup that follows an interrupt."""
    import asyncio

    from zarr.core import sync as zsync

    from pipeline.store.write import _wait_for_zarr_io

    zarr.create_array(str(tmp_path / "warm"), shape=(2,), dtype="f4")  # starts zarr's IO loop
    late = tmp_path / "late"

    async def slow_write() -> None:
        await asyncio.sleep(0.3)
        late.write_text("landed")

    asyncio.run_coroutine_threadsafe(slow_write(), zsync.loop[0])
    _wait_for_zarr_io(timeout=10)
    assert late.read_text() == "landed"
