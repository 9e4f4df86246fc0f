"""The evaluation stage end to end: a tiny pretraining run evaluated on shards of another import."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.store.write import write_shards
from pipeline.cli import main
from pipeline.core.config import EvaluateConfig, ShardsConfig, dump_config
from pipeline.core.errors import InputError
from pipeline.evaluation.embed import embed_samples, load_encoder, read_shard_samples
from pipeline.evaluation.run import evaluate_run, positioning_gradients
from pipeline.store.loader import ShardDataset
from pipeline.pretrain.config import load_pretrain_config

R = 8
ROIS = [f"7Networks_LH_{net}_{i}" for i, net in enumerate(["Vis", "Vis", "SomMot", "Default", "Default", "Cont", "Limbic", "DorsAttn"])]
CFG = EvaluateConfig(bootstrap_resamples=100, permutations=50, inner_folds=3, kfold=3, logistic_cs=(0.1, 1.0, 10.0),
                     ridge_alphas=(1.0, 100.0), attentive_epochs=5, max_windows=2, baselines=("fc_pearson", "fc_tangent", "random_encoder"))


def _series(seed: int, label: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((100, R))
    if label:  # planted connectivity: ROIs 0 and 1 coupled
        x[:, 1] = 0.95 * x[:, 0] + 0.3 * x[:, 1]
    return x.astype(np.float32)


def _import(root: Path, prefix: str, sites: list[str], n: int = 48, seed: int = 0) -> Path:
    labels = {f"{prefix}-{i}": i % 2 for i in range(n)}
    table = pd.DataFrame({
        "sample_id": list(labels), "subject": [f"{prefix}{i}" for i in range(n)],
        "store": "fmri-Toy", "kind": "fmri", "atlas": "Toy", "modality": "timeseries",
        "site": [sites[(i // 2) % len(sites)] for i in range(n)],
        "diagnosis": ["autism" if v else "control" for v in labels.values()],
        "age": np.linspace(7, 40, n),
    })
    # each import has its own gradients (another dataset's group connectome), over the same ROIs
    grads = {"fmri-Toy": pd.DataFrame({"roi": ROIS, **{f"g{k}": np.cos(np.arange(R) * (k + 1) + seed / 1000)
                                                      for k in range(3)}})}

    def read(row):
        return {"x_TR": _series(seed + int(row["sample_id"].split("-")[-1]), labels[row["sample_id"]]), "roi_names": ROIS}

    write_shards(table, root, ShardsConfig(samples_per_shard=16), read_sample=read, gradients=grads,
                    label_columns=["diagnosis", "age"])
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("eval")
    train_shards = _import(base / "shards_a", "a", ["A", "B"])
    other_shards = _import(base / "shards_b", "b", ["S<1>", "S&2"], seed=1000)
    cfg = load_pretrain_config("tiny")
    # The toy store has 8 ROIs and 3 gradient coordinates (not Brain-JEPA's 30).
    cfg = dataclasses.replace(cfg, fmri=dataclasses.replace(cfg.fmri, gradient_dim=3),
                              train=dataclasses.replace(cfg.train, max_steps=3, checkpoint_every=3, log_every=1, warmup_steps=1))
    config = base / "toy.toml"
    config.write_text(dump_config(cfg))
    run_dir = base / "run"
    assert main(["pretrain", str(train_shards), "--config", str(config), "--out", str(run_dir), "--no-progress"]) == 0
    return {"run": run_dir, "a": train_shards, "b": other_shards, "base": base}


def test_evaluation_of_a_run_on_shards_from_another_import(setup):
    out = setup["base"] / "report_b"
    res = evaluate_run(setup["run"], setup["b"], "diagnosis", split="site", cfg=CFG, out_dir=out)
    assert res["store"] == "fmri-Toy" and res["n_samples"] == 48
    # the ROIs are positioned by the gradients the run was trained with, not by the evaluated store's own
    assert res["gradients"].startswith("the run's training gradients")
    assert res["training_data"]["n_rois"] == R and res["training_data"]["atlas"] == "Toy"
    readouts = {"linear", "roi", "roi_similarity", "token_similarity"}
    assert set(res["models"]) == ({f"moe_jepa_{r}" for r in readouts} | {f"random_encoder_{r}" for r in readouts}
                                  | {"moe_jepa_attentive", "fc_pearson", "fc_tangent"})
    # The planted coupling is found by the connectivity baselines.
    assert res["models"]["fc_pearson"]["metrics"]["auroc"]["value"] > 0.9
    for info in res["models"].values():
        for v in info["metrics"].values():
            if v["value"] is not None and np.isfinite(v["value"]):
                assert v["low"] <= v["high"]  # a percentile interval, not widened to contain the value
    assert res["best_baseline"] in ("fc_pearson", "fc_tangent")
    assert set(res["comparisons"]) == {f"moe_jepa_{r}" for r in readouts} | {"moe_jepa_attentive"}
    assert [f["name"] for f in res["folds"]] == ["site-S&2", "site-S<1>"]
    # One MoE layer in the tiny encoder; networks come from the Schaefer names.
    assert len(res["routing"]) == 1
    assert res["routing"][0]["networks"][:2] == ["Vis", "SomMot"]
    assert np.allclose(np.sum(res["routing"][0]["fractions"], axis=1), 1.0)
    saved = json.loads((out / "results.json").read_text())
    assert saved["target"] == "diagnosis"
    page = (out / "report.html").read_text()
    assert "S&lt;1&gt;" in page and "S<1>" not in page
    assert "data:image/png;base64" in page
    preds = pd.read_csv(out / "predictions.tsv", sep="\t")
    assert len(preds) == 48 and "fc_pearson__p_autism" in preds


def test_embeddings_are_cached_and_random_encoder_differs(setup):
    samples = read_shard_samples(setup["a"], "diagnosis")
    enc = load_encoder(setup["run"])
    cache = setup["base"] / "cache"
    first = embed_samples(enc, samples, gradients_Rk=samples.gradients_Rk, max_windows=2, cache_dir=cache)
    files = sorted(cache.iterdir())
    assert len(files) == 1
    again = embed_samples(enc, samples, gradients_Rk=samples.gradients_Rk, max_windows=2, cache_dir=cache)
    assert np.array_equal(first.pooled_ND, again.pooled_ND)
    assert sorted(cache.iterdir()) == files
    assert first.pooled_ND.shape == (48, enc.cfg.model.dim) and first.tokens_NRD.shape == (48, R, enc.cfg.model.dim)
    rnd = embed_samples(load_encoder(setup["run"], random_init=True), samples, gradients_Rk=samples.gradients_Rk,
                        max_windows=2, cache_dir=cache)
    assert not np.allclose(rnd.pooled_ND, first.pooled_ND)
    assert len(list(cache.iterdir())) == 2
    # Routing counts: every token of every window assigned top_k times.
    T, patch, k = enc.cfg.fmri.num_frames, enc.cfg.fmri.patch, enc.cfg.moe.top_k
    assert first.routing[0].sum() == 48 * 2 * R * (T // patch) * k  # 100 frames -> two 64-frame windows, overlapping


def test_cli_kfold_regression_and_errors(setup, capsys):
    out = setup["base"] / "cli_age"
    code = main(["evaluate", str(setup["run"]), "--shards", str(setup["a"]), "--target", "age", "--split", "kfold",
                 "--bootstrap", "50", "--permutations", "20", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "mae" in text and "fc_pearson" in text
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "regression" and res["models"]["fc_pearson"]["metrics"]["r2"]["value"] is not None
    assert (out / "neurocurate_config.toml").is_file()
    assert main(["evaluate", str(setup["run"]), "--shards", str(setup["a"]), "--target", "handedness"]) == 2
    assert "no label column 'handedness'" in capsys.readouterr().err
    with pytest.raises(InputError, match="needs a classification target"):
        evaluate_run(setup["run"], setup["a"], "age", few_shot=2, cfg=CFG)
    with pytest.raises(InputError, match="unknown baseline"):
        evaluate_run(setup["run"], setup["a"], "diagnosis", cfg=dataclasses.replace(CFG, baselines=("fc_magic",)))
    with pytest.raises(InputError, match="not in the index"):
        evaluate_run(setup["run"], setup["a"], "diagnosis", cfg=CFG, store="fmri-Nope")
    with pytest.raises(InputError, match="no checkpoint"):
        evaluate_run(setup["base"] / "nothing", setup["a"], "diagnosis", cfg=CFG)


def test_reference_shards_with_other_rois_are_refused(setup, tmp_path):
    other = tmp_path / "other"
    table = pd.DataFrame({"sample_id": ["x-0", "x-1"], "subject": ["x0", "x1"], "store": "fmri-Toy", "kind": "fmri",
                          "atlas": "Toy", "modality": "timeseries", "site": "A", "diagnosis": ["autism", "control"]})
    write_shards(table, other, ShardsConfig(), label_columns=["diagnosis"],
                    read_sample=lambda row: {"x_TR": np.random.default_rng(0).standard_normal((80, 3)).astype(np.float32),
                                             "roi_names": ["a", "b", "c"]})
    with pytest.raises(InputError, match="ROI names differ"):
        evaluate_run(setup["run"], setup["b"], "diagnosis", cfg=CFG, reference_shards=other)


def test_few_shot_through_the_stage(setup):
    res = evaluate_run(setup["run"], setup["a"], "diagnosis", split="kfold", few_shot=3,
                       cfg=dataclasses.replace(CFG, attentive_probe=False), out_dir=setup["base"] / "fs")
    fs = res["few_shot"]
    readouts = {"linear", "roi", "roi_similarity", "token_similarity"}
    assert fs["k"] == 3 and set(fs["models"]) == ({f"moe_jepa_{r}" for r in readouts} | {f"random_encoder_{r}" for r in readouts}
                                                  | {"fc_pearson", "fc_tangent"})
    assert len(fs["models"]["fc_pearson"]["metrics"]["auroc"]["values"]) == CFG.few_shot_resamples


# --------------------------------------------------------------------------- the run's recorded training data


def test_run_records_its_training_shards_and_gradients(setup):
    from pipeline.core.layout import RunLayout
    from pipeline.core.provenance import file_digest
    from pipeline.pretrain.record import read_training_data

    run = RunLayout(setup["run"])
    record = read_training_data(run.root)
    assert record.shards_dir == str(setup["a"].resolve()) and record.store == "fmri-Toy" and record.split == "train"
    assert (record.kind, record.atlas, record.n_rois, record.tasks) == ("fmri", "Toy", R, [])
    assert record.gradients_shape == [R, 3] and record.gradients_sha256 == file_digest(run.training_gradients)
    stored = ShardDataset(setup["a"], store="fmri-Toy", training=False).gradients_Rk.numpy()
    assert np.array_equal(np.load(run.training_gradients), stored)


def test_positions_come_from_the_run_not_from_the_evaluated_store(setup):
    from pipeline.pretrain.record import read_training_data

    record = read_training_data(setup["run"])
    train_grads = ShardDataset(setup["a"], store="fmri-Toy", training=False).gradients_Rk.numpy()
    samples_b = read_shard_samples(setup["b"], "diagnosis")
    assert not np.allclose(samples_b.gradients_Rk, train_grads)  # another dataset's gradients
    grads, source = positioning_gradients(setup["run"], record, samples_b, setup["b"], None)
    assert np.array_equal(grads, train_grads) and "training gradients" in source
    grads, source = positioning_gradients(setup["run"], record, samples_b, setup["b"], setup["a"])
    assert np.array_equal(grads, train_grads) and source.startswith("reference store")
    # shards whose gradients are not the run's are not its training shards
    with pytest.raises(InputError, match="not the shards it was trained on"):
        positioning_gradients(setup["run"], record, samples_b, setup["b"], setup["b"])


def test_cli_evaluates_on_the_recorded_training_shards_by_default(setup, capsys):
    out = setup["base"] / "cli_default"
    code = main(["evaluate", str(setup["run"]), "--target", "diagnosis", "--split", "kfold", "--config", str(_fast(setup)),
                 "--bootstrap", "20", "--permutations", "10", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["shards_dir"] == str(setup["a"].resolve()) and res["store"] == "fmri-Toy"
    assert res["gradients"].startswith("the run's training gradients")


def _fast(setup) -> Path:
    path = setup["base"] / "fast_eval.toml"
    path.write_text('[evaluate]\nbaselines = ["fc_pearson"]\nattentive_probe = false\ninner_folds = 2\nmax_windows = 1\n'
                    'readouts = ["mean"]\n')
    return path


def _toy_store(root: Path, names: list[str], atlas: str = "Toy") -> Path:
    table = pd.DataFrame({"sample_id": [f"x-{i}" for i in range(4)], "subject": [f"x{i}" for i in range(4)],
                          "store": f"fmri-{atlas}", "kind": "fmri", "atlas": atlas, "modality": "timeseries",
                          "site": "A", "diagnosis": ["autism", "control"] * 2})
    write_shards(table, root, ShardsConfig(), label_columns=["diagnosis"],
                 read_sample=lambda row: {"x_TR": np.random.default_rng(0).standard_normal((80, len(names))).astype(np.float32),
                                          "roi_names": names})
    return root


@pytest.mark.parametrize("names,atlas,reason", [
    (["a", "b", "c"], "Toy", "has 3 ROIs of atlas Toy but the run was trained on 8 ROIs of atlas Toy"),
    (ROIS, "CC200", "has 8 ROIs of atlas CC200 but the run was trained on 8 ROIs of atlas Toy"),
    (ROIS[::-1], "Toy", "under other names or in another order"),
])
def test_a_store_with_another_roi_set_is_refused_in_one_line(setup, tmp_path, capsys, names, atlas, reason):
    shards = _toy_store(tmp_path / "other", names, atlas)
    code = main(["evaluate", str(setup["run"]), "--shards", str(shards), "--target", "diagnosis",
                 "--config", str(_fast(setup)), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and reason in err and str(shards / f"fmri-{atlas}") in err and "\n" not in err
    assert not (tmp_path / "report").exists()


def test_a_changed_run_gradients_copy_or_an_old_run_without_gradients_is_refused(setup, tmp_path):
    import shutil

    from pipeline.core.layout import RunLayout

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run, ignore=shutil.ignore_patterns("embeddings", "evaluation"))
    grads = np.load(RunLayout(run).training_gradients)
    np.save(RunLayout(run).training_gradients, grads + 1)
    with pytest.raises(InputError, match="does not match the digest"):
        evaluate_run(run, None, "diagnosis", cfg=CFG)
    # a run from before runs recorded their data: no silent ROI-index positions for a store without gradients
    RunLayout(run).training_data.unlink()
    no_grads = _toy_store(tmp_path / "nograds", ROIS)
    with pytest.raises(InputError, match="has no gradients; pass --reference-shards"):
        evaluate_run(run, no_grads, "diagnosis", cfg=CFG)
    with pytest.raises(InputError, match="pass --shards"):
        evaluate_run(run, None, "diagnosis", cfg=CFG)


def test_cli_finetuning_is_compared_with_a_randomly_initialised_encoder_fine_tuned_alike(setup, capsys):
    cfg = setup["base"] / "finetune_eval.toml"
    cfg.write_text('[evaluate]\nbaselines = ["random_encoder"]\nattentive_probe = false\ninner_folds = 2\nmax_windows = 1\n'
                   'readouts = ["mean"]\nfinetune_epochs = 1\n')
    out = setup["base"] / "cli_finetune"
    code = main(["evaluate", str(setup["run"]), "--target", "diagnosis", "--split", "kfold", "--config", str(cfg),
                 "--bootstrap", "20", "--permutations", "10", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert {"moe_jepa_finetune", "random_encoder_finetune"} <= set(res["models"])
    table = pd.read_csv(out / "predictions.tsv", sep="\t")
    pre, rnd = (table.filter(like=f"{m}__p_").to_numpy() for m in ("moe_jepa_finetune", "random_encoder_finetune"))
    assert pre.shape == rnd.shape and not np.allclose(pre, rnd)  # two different starting points


def test_windows_cover_every_frame_of_the_run():
    """The readouts see the whole run, as connectivity does: ABIDE's 176-frame NYU runs in 96-frame windows were
    read from their first 96 frames only."""
    from pipeline.evaluation.embed import _windows

    for n, T, expected in ((176, 96, 2), (146, 96, 2), (96, 96, 1), (296, 96, 4), (60, 96, 1)):
        x_RT = np.arange(n, dtype=float)[None].repeat(3, 0)
        wins = _windows(x_RT, T, 8)
        assert len(wins) == expected
        assert all(w.shape == (3, min(n, T)) for w in wins)
        assert set(np.concatenate([w[0] for w in wins]).astype(int)) == set(range(n))
    wins = _windows(np.arange(1000, dtype=float)[None], 96, 2)  # more windows needed than allowed: evenly spread
    assert [int(w[0, 0]) for w in wins] == [0, 904]
