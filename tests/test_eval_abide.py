"""The evaluation stage on real ABIDE CC200 series (slow: import, shards, a tiny pretraining)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.config import Config, EvaluateConfig, ImportConfig, ShardsConfig, dump_config
from pipeline.evaluation.run import evaluate_run
from pipeline.pretrain.config import load_pretrain_config
from pipeline.stages.pretrain import run_pretrain
from pipeline.stages.qc import run_qc
from pipeline.stages.shards import build_shards
from pipeline.stages.import_series import import_timeseries


@pytest.mark.integration
def test_abide_diagnosis_leave_site_out(shared_data, tmp_path):
    torch.set_num_threads(1)
    abide = shared_data / "abide"
    pheno = pd.read_csv(abide / "Phenotypic_V1_0b_preprocessed1.csv")
    # 20 subjects from each of two sites, both diagnoses present in each.
    ids = pheno[pheno["SITE_ID"].isin(["NYU", "UM_1"])].groupby(["SITE_ID", "DX_GROUP"]).head(10)["SUB_ID"]
    out = tmp_path / "out"
    import_timeseries([abide / "rois_cc200"], out, ImportConfig(), phenotypes=abide / "Phenotypic_V1_0b_preprocessed1.csv",
                      participant_labels=[f"{int(i):07d}" for i in ids])
    run_qc(out, Config())  # the curation table comes from the QC stage, as for a user
    build_shards(out, cfg=ShardsConfig())
    cfg = load_pretrain_config("tiny")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=2, checkpoint_every=2, warmup_steps=1))
    (tmp_path / "tiny.toml").write_text(dump_config(cfg))
    # through the stage, so the run records its training data (this store has no gradients: ROI-index positions)
    run_pretrain(out / "shards", tmp_path / "run", config=str(tmp_path / "tiny.toml"), progress=False)
    ecfg = EvaluateConfig(bootstrap_resamples=100, permutations=50, inner_folds=3, attentive_epochs=5,
                          baselines=("fc_pearson", "random_encoder"))
    res = evaluate_run(tmp_path / "run", out / "shards", "diagnosis", split="site", cfg=ecfg, out_dir=tmp_path / "report",
                       atlas_image=abide / "CC200_ROIs_3mm.nii.gz")
    assert res["n_samples"] == 40 and [f["name"] for f in res["folds"]] == ["site-NYU", "site-UM_1"]
    assert res["classes"] == ["control", "autism"]
    assert res["gradients"].startswith("none: the run was trained without gradients")
    for info in res["models"].values():
        auc = info["metrics"]["auroc"]
        assert 0.0 <= auc["low"] <= auc["high"] <= 1.0 and 0.0 <= auc["value"] <= 1.0
    nets = res["roi_networks"]
    assert sum(nets.values()) == 200 and nets.get("Default", 0) > 20
    assert np.allclose(np.sum(res["routing"][0]["fractions"], axis=1), 1.0)
    assert json.loads((tmp_path / "report" / "results.json").read_text())["store"] == "fmri-CC200"
