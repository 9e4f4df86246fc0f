"""Structural evaluation: a tiny Neuro-JEPA run, intensity PCA and the 3D CNN on an anat store."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import torch

from pipeline.store.write import write_shards
from pipeline.core.config import EvaluateConfig, LoaderConfig, ShardsConfig
from pipeline.evaluation.run import evaluate_run
from pipeline.store.loader import ShardDataset
from pipeline.pretrain.config import load_pretrain_config
from pipeline.pretrain.train import Trainer

BOX = (16, 16, 24)


def _volume(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    v = np.zeros(BOX, dtype=np.float32)
    v[2:14, 2:14, 3:21] = 1.0 + 0.1 * rng.standard_normal((12, 12, 18))
    if i % 2:  # planted lesion-like bright blob
        v[4:9, 4:9, 6:12] += 1.5
    return v


def test_structural_run_with_pca_and_cnn_baselines(tmp_path):
    torch.set_num_threads(1)
    n = 32
    table = pd.DataFrame({"sample_id": [f"t1-{i}" for i in range(n)], "subject": [f"s{i}" for i in range(n)],
                          "store": "anat", "kind": "anat", "modality": "T1w", "site": "A",
                          "diagnosis": ["patient" if i % 2 else "control" for i in range(n)]})
    write_shards(table, tmp_path / "shards", ShardsConfig(anat_samples_per_shard=8, crop_box=BOX), label_columns=["diagnosis"],
                    read_sample=lambda row: {"volume": _volume(int(row["sample_id"].split("-")[1])),
                                             "mask": _volume(0) > 0.5, "affine": np.eye(4)})
    cfg = load_pretrain_config("tiny")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, modality="anat"),
                              anat=dataclasses.replace(cfg.anat, volume_shape=BOX, patch=8, target_ratio=0.5),
                              train=dataclasses.replace(cfg.train, max_steps=2, checkpoint_every=2, warmup_steps=1, log_every=1))
    ds = ShardDataset(tmp_path / "shards", LoaderConfig(window_length=0), store="anat", training=True)
    Trainer(cfg, ds, tmp_path / "run", progress=False).fit()
    ecfg = EvaluateConfig(bootstrap_resamples=50, permutations=20, kfold=4, inner_folds=3, logistic_cs=(0.1, 1.0),
                          attentive_epochs=3, pca_components=5, cnn_epochs=8, cnn_channels=4, cnn_lr=3e-3)
    res = evaluate_run(tmp_path / "run", tmp_path / "shards", "diagnosis", split="kfold", cfg=ecfg,
                       out_dir=tmp_path / "report", store="anat")
    assert set(res["models"]) == {"moe_jepa_linear", "moe_jepa_attentive", "random_encoder_linear", "intensity_pca", "cnn3d"}
    assert res["models"]["intensity_pca"]["metrics"]["auroc"]["value"] > 0.9
    assert res["classes"] == ["control", "patient"]
    # Volumes have one routing row per MoE layer ("whole volume").
    assert res["routing"][0]["networks"] == ["whole volume"]
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["store"] == "anat" and "MoE layer 0" in (tmp_path / "report" / "report.html").read_text()
