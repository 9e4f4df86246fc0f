"""The import path, end to end from the command line (issue 11).

Exactly the commands a user types: ``import-timeseries`` -> ``qc`` -> ``gradients`` -> ``shards`` ->
``pretrain`` -> ``evaluate`` on real ABIDE CC200 series of two sites. Nothing a stage writes is
written here by hand: the curation table comes from ``neurocurate qc``, the index from ``shards``.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.core.layout import OutputLayout, RunLayout, ShardsLayout


@pytest.mark.integration
def test_import_qc_gradients_shards_pretrain_evaluate(shared_data, tmp_path, capsys):
    abide = shared_data / "abide"
    pheno_csv = abide / "Phenotypic_V1_0b_preprocessed1.csv"
    pheno = pd.read_csv(pheno_csv)
    # 6 subjects of each diagnosis from each of two sites
    ids = pheno[pheno["SITE_ID"].isin(["NYU", "UM_1"])].groupby(["SITE_ID", "DX_GROUP"]).head(6)["SUB_ID"]
    labels = [f"{int(i):07d}" for i in ids]
    out = tmp_path / "out"
    layout = OutputLayout(out)

    assert main(["import-timeseries", str(abide / "rois_cc200"), "-o", str(out), "--phenotypes", str(pheno_csv),
                 "--participant-label", *labels]) == 0
    assert not layout.curation_table.exists()

    # group QC of a folder that holds only imported series: no BIDS folder, no sub-*/anat
    assert main(["qc", str(out)]) == 0
    table = pd.read_parquet(layout.curation_table)
    assert len(table) == len(labels) and set(table["modality"]) == {"timeseries"}
    assert layout.group_report.is_file()
    included = int(table["include"].sum())
    assert included >= len(labels) - 4  # a few ABIDE runs have zero-variance ROIs

    # gradients: the only atlas present (CC200) is picked without --atlas; too few components for the model's
    # gradient positions is a one-line error at pretraining, naming the store's gradients
    assert main(["gradients", str(out), "--n-components", "10"]) == 0
    assert main(["shards", str(out)]) == 0
    capsys.readouterr()
    assert main(["pretrain", str(layout.default_shards_dir), "--config", "tiny", "--out", str(tmp_path / "r0"),
                 "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gradients: holds 10 gradient coordinates" in err and "--n-components 30" in err
    assert main(["gradients", str(out)]) == 0
    assert layout.gradients_tsv("CC200").is_file()
    sidecar = json.loads(layout.gradients_json("CC200").read_text())
    assert sidecar["NumberOfRuns"] == included

    assert main(["shards", str(out)]) == 0
    shards = ShardsLayout(layout.default_shards_dir)
    index = pd.read_parquet(shards.index)
    assert len(index) == included and set(index["store"]) == {"fmri-CC200"}
    assert "outlier_metrics" not in index.attrs.get("qc_columns", [])

    run = tmp_path / "run"
    assert main(["pretrain", str(shards.root), "--config", "tiny", "--out", str(run), "--max-steps", "2",
                 "--no-progress"]) == 0
    assert RunLayout(run).checkpoints()

    cfg = tmp_path / "eval.toml"
    cfg.write_text('[evaluate]\nbaselines = ["fc_pearson", "random_encoder"]\ninner_folds = 3\n'
                   "attentive_epochs = 3\n")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--shards", str(shards.root), "--target", "diagnosis", "--split", "site",
                 "--config", str(cfg), "--bootstrap", "50", "--permutations", "20"]) == 0
    printed = capsys.readouterr().out
    report = RunLayout(run).evaluation_dir("diagnosis", "site")
    assert (report / "report.html").is_file() and str(report) in printed
    result = json.loads((report / "results.json").read_text())
    assert [f["name"] for f in result["folds"]] == ["site-NYU", "site-UM_1"]
    assert result["n_samples"] == included


def test_qc_command_errors_name_the_folder(tmp_path, capsys):
    assert main(["qc", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["qc", "import-ratings", str(tmp_path)]) == 2
    assert "expected OUTPUT_DIR FILE" in capsys.readouterr().err
    assert main(["qc", str(tmp_path), "extra"]) == 2
    assert "unexpected argument" in capsys.readouterr().err
