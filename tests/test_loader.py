"""Streaming loader: partitioning, shuffling, windows, normalisation, exact resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.layout import NORM_NAME
from pipeline.store.read import read_index
from pipeline.store.write import center_crop_pad, write_shards
from pipeline.core.config import LoaderConfig, ShardsConfig
from pipeline.store.loader import ShardDataset, StreamLoader, collate_samples

R = 5


def _series(sample_id: str) -> np.ndarray:
    i = int(sample_id.split("-")[-1])
    rng = np.random.default_rng(i)
    T = 20 + i % 17
    return (rng.standard_normal((T, R)) * 2 + 1).astype(np.float32)


def _read(row):
    return {"x_TR": _series(row["sample_id"]), "roi_names": [f"r{i}" for i in range(R)]}


def _samples(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "sample_id": [f"s-{i}" for i in range(n)],
        "subject": [f"sub{i // 2}" for i in range(n)],
        "store": "fmri-Toy", "kind": "fmri", "atlas": "Toy", "modality": "timeseries",
        "site": ["A" if i % 3 else "B" for i in range(n)],
        "age": [float(i) if i % 4 else np.nan for i in range(n)],
        "sex": ["F" if i % 2 else "M" for i in range(n)],
    })


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    grads = {"fmri-Toy": pd.DataFrame({"roi": [f"r{i}" for i in range(R)], "g1": np.arange(R, dtype=float)})}
    write_shards(_samples(60), root, ShardsConfig(samples_per_shard=7, chunk_frames=8), read_sample=_read,
                    gradients=grads, label_columns=["age", "sex"])
    return root


def _ids(batches) -> list[str]:
    return [sid for b in batches for sid in b["sample_id"]]


CFG = LoaderConfig(window_length=16, shuffle_buffer=8, seed=5)


def test_epoch_covers_every_sample_once_and_reshuffles(store):
    ds = ShardDataset(store, CFG, rank=0, world_size=1)
    first = [s["sample_id"] for s in ds]
    assert sorted(first) == sorted(f"s-{i}" for i in range(60))
    assert ds.epoch == 1
    second = [s["sample_id"] for s in ds]
    assert sorted(second) == sorted(first) and second != first
    ds.set_epoch(0)
    assert [s["sample_id"] for s in ds] == first


def test_two_ranks_two_workers_no_duplicates_no_gaps(store):
    seen = []
    per_rank = []
    for rank in range(2):
        ds = ShardDataset(store, CFG, rank=rank, world_size=2)
        ids = _ids(StreamLoader(ds, batch_size=4, num_workers=2))
        assert len(ids) == ds.num_samples(num_workers=2)
        per_rank.append(len(ids))
        seen += ids
    assert Counter(seen) == Counter(f"s-{i}" for i in range(60))
    assert abs(per_rank[0] - per_rank[1]) <= 1


def test_sample_contents_window_and_normalisation(store):
    norm = json.loads((store / "fmri-Toy" / NORM_NAME).read_text())
    median = np.asarray(norm["median"], dtype=np.float32)[:, None]
    iqr = np.asarray(norm["iqr"], dtype=np.float32)[:, None]
    ds = ShardDataset(store, CFG, training=True)
    for s in ds:
        raw_TR = _series(s["sample_id"])
        assert s["x"].shape == (R, 16) and s["x"].dtype == torch.float32
        assert s["length"] == raw_TR.shape[0] and s["n_frames"] == 16
        expected_RT = (raw_TR[s["start"]:s["start"] + 16].T - median) / iqr
        np.testing.assert_allclose(s["x"].numpy(), expected_RT, rtol=1e-5, atol=1e-5)
        assert s["gradients"].shape == (R, 1)
        i = int(s["sample_id"].split("-")[1])
        assert s["subject"] == f"sub{i // 2}" and s["sex"] == ("F" if i % 2 else "M")
        assert (np.isnan(s["age"]) if i % 4 == 0 else s["age"] == float(i))
    starts = {s["sample_id"]: s["start"] for s in ds}
    assert len(set(starts.values())) > 1
    evaluation = ShardDataset(store, CFG, training=False)
    for s in evaluation:
        assert s["start"] == (s["length"] - 16) // 2
    index, _ = read_index(store)
    assert [s["sample_id"] for s in evaluation] == index.sort_values(["shard", "position"])["sample_id"].tolist()


def test_short_runs_are_padded_or_dropped(store):
    long_cfg = LoaderConfig(window_length=30, shuffle_buffer=4, normalization="none")
    samples = {s["sample_id"]: s for s in ShardDataset(store, long_cfg, training=False)}
    short = samples["s-3"]  # 23 frames
    assert short["n_frames"] == 23 and short["x"].shape == (R, 30)
    np.testing.assert_array_equal(short["x"][:, :23].numpy(), _series("s-3").T)
    assert torch.all(short["x"][:, 23:] == 0)
    dropped = ShardDataset(store, LoaderConfig(window_length=30, short_policy="drop"), training=False)
    assert "s-3" not in {s["sample_id"] for s in dropped} and dropped.num_samples() == len(dropped.index)


def test_filters(store):
    by_site = ShardDataset(store, CFG, sites=["B"])
    assert {s["site"] for s in by_site} == {"B"} and len(by_site.index) == 20
    labelled = ShardDataset(store, CFG, require_labels=["age"])
    assert len(labelled.index) == 45
    train = ShardDataset(store, CFG, split="train")
    index, _ = read_index(store)
    assert len(train.index) == (index["split"] == "train").sum()
    assert ShardDataset(store, CFG, modality="bold").num_samples() == 0
    with pytest.raises(ValueError, match="label 'iq' is not in the index"):
        ShardDataset(store, CFG, require_labels=["iq"])


def _run(store, *, num_workers, stop_after=None, state=None, world=1, rank=0, **filters):
    ds = ShardDataset(store, CFG, rank=rank, world_size=world, **filters)
    loader = StreamLoader(ds, batch_size=3, num_workers=num_workers)
    if state is not None:
        loader.load_state_dict(state)
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if stop_after is not None and i + 1 == stop_after:
            return out, loader.state_dict()
    return out, loader.state_dict()


@pytest.mark.parametrize(("num_workers", "stop_after", "filters"), [
    (0, 5, {}), (2, 5, {}),
    # 45 samples: streams of 22 and 23, stopped when one of them is nearly done.
    (2, 14, {"require_labels": ["age"]}),
])
def test_resume_mid_epoch_is_exact(store, num_workers, stop_after, filters):
    full, _ = _run(store, num_workers=num_workers, **filters)
    head, state = _run(store, num_workers=num_workers, stop_after=stop_after, **filters)
    state = json.loads(json.dumps(state))  # must survive a checkpoint round trip
    tail, end_state = _run(store, num_workers=num_workers, state=state, **filters)
    assert _ids(head + tail) == _ids(full)
    resumed = torch.cat([b["x"] for b in head + tail])
    assert torch.equal(resumed, torch.cat([b["x"] for b in full]))
    assert end_state["epoch"] == 1 and sum(end_state["consumed"]) == 0


def test_resume_second_epoch_after_two_ranks(store):
    """Resume of rank 1 of 2 in epoch 1 reproduces that rank's uninterrupted stream."""
    ds = ShardDataset(store, CFG, rank=1, world_size=2)
    loader = StreamLoader(ds, batch_size=2, num_workers=2)
    list(loader)
    epoch1 = _ids(list(loader))
    ds2 = ShardDataset(store, CFG, rank=1, world_size=2)
    loader2 = StreamLoader(ds2, batch_size=2, num_workers=2)
    list(loader2)
    head = []
    for i, b in enumerate(loader2):
        head.append(b)
        if i == 2:
            break
    ds3 = ShardDataset(store, CFG, rank=1, world_size=2)
    loader3 = StreamLoader(ds3, batch_size=2, num_workers=2)
    loader3.load_state_dict(loader2.state_dict())
    assert _ids(head) + _ids(list(loader3)) == epoch1


def test_resume_with_other_settings_is_refused(store):
    _, state = _run(store, num_workers=2, stop_after=2)
    ds = ShardDataset(store, CFG)
    ds.load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers=2"):
        next(iter(ds))
    with pytest.raises(ValueError, match="seed"):
        ShardDataset(store, LoaderConfig(seed=9)).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        ShardDataset(store, CFG, rank=0, world_size=2).load_state_dict(state)


def test_collate_pads_whole_runs(store):
    ds = ShardDataset(store, LoaderConfig(window_length=0, normalization="none"), training=False)
    samples = [s for _, s in zip(range(4), ds)]
    batch = collate_samples(samples)
    T = max(s["x"].shape[1] for s in samples)
    assert batch["x"].shape == (4, R, T) and batch["frame_mask"].shape == (4, T)
    assert batch["frame_mask"].sum(1).tolist() == [s["length"] for s in samples]
    assert batch["age"].dtype == torch.float32 and isinstance(batch["sex"], list)
    assert batch["gradients"].shape == (4, R, 1)


def test_anat_samples(tmp_path):
    box = (8, 6, 4)

    def read(row):
        rng = np.random.default_rng(int(row["sample_id"][1:]))
        vol = rng.uniform(1, 10, (9, 7, 4)).astype(np.float32)
        return {"volume": vol, "mask": vol > 3, "affine": np.eye(4)}

    samples = pd.DataFrame({"sample_id": [f"a{i}" for i in range(5)], "subject": [f"p{i}" for i in range(5)],
                            "store": "anat", "kind": "anat", "modality": ["T1w", "T2w", "T1w", "T1w", "FLAIR"]})
    write_shards(samples, tmp_path, ShardsConfig(anat_samples_per_shard=2, crop_box=box), read_sample=read)
    ds = ShardDataset(tmp_path, LoaderConfig(normalization="none"), store="anat", modality="T1w", training=False)
    got = list(ds)
    assert [s["sample_id"] for s in got] == ["a0", "a2", "a3"]
    for s in got:
        vol = read({"sample_id": s["sample_id"]})["volume"]
        expected = center_crop_pad(vol, box)[0].astype(np.float16).astype(np.float32)
        assert s["x"].shape == (1, *box) and s["mask"].dtype == torch.uint8
        np.testing.assert_array_equal(s["x"][0].numpy(), expected)
        np.testing.assert_array_equal(s["mask"][0].numpy(), center_crop_pad(vol > 3, box)[0])
    normed = list(ShardDataset(tmp_path, LoaderConfig(), store="anat", training=False))
    inside = normed[0]["x"][normed[0]["mask"] > 0]
    assert abs(float(inside.median())) < 0.05
    assert collate_samples(normed[:2])["x"].shape == (2, 1, *box)


@pytest.mark.integration
def test_abide_series_to_shards_to_loader(shared_data, tmp_path):
    """Real ABIDE CC200 series from two sites, through the CLI (import -> qc -> shards), read back over
    2 ranks x 2 workers."""
    from pipeline.cli import main
    from pipeline.core.layout import OutputLayout

    abide = shared_data / "abide"
    files = sorted((abide / "rois_cc200").glob("*_rois_cc200.1D"))
    chosen = [f for f in files if f.name.startswith(("NYU", "UM_1"))][:6] + [f for f in files if f.name.startswith("USM")][:6]
    out = tmp_path / "out"
    assert main(["import-timeseries", *map(str, chosen), "-o", str(out), "--phenotypes",
                 str(abide / "Phenotypic_V1_0b_preprocessed1.csv")]) in (0, 3)
    assert main(["qc", str(out)]) == 0
    table = pd.read_parquet(OutputLayout(out).curation_table)
    included = table[table["include"].astype(bool)]
    assert len(included) >= len(chosen) - 3
    raw = {str(r.subject): pd.read_csv(out / r.path, sep="\t").to_numpy(dtype=np.float32)
           for r in included.itertuples()}
    assert main(["shards", str(out), "--samples-per-shard", "4"]) == 0
    index, _ = read_index(out / "shards")
    assert len(index) == len(included) and set(index["store"]) == {"fmri-CC200"}
    seen = []
    for rank in range(2):
        ds = ShardDataset(out / "shards", LoaderConfig(window_length=64, shuffle_buffer=4), rank=rank, world_size=2)
        for batch in StreamLoader(ds, batch_size=2, num_workers=2):
            assert batch["x"].shape[1:] == (200, 64) and torch.isfinite(batch["x"]).all()
            seen += batch["subject"]
    assert sorted(seen) == sorted(raw)
    raw_ds = ShardDataset(out / "shards", LoaderConfig(window_length=0, normalization="none"), training=False)
    for s in raw_ds:
        np.testing.assert_array_equal(s["x"].numpy(), raw[s["subject"]].T)
        assert s["diagnosis"] in ("autism", "control")
