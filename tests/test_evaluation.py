"""Evaluation core on arrays: metrics, intervals, permutation tests, splits, probes, baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import EvaluateConfig
from pipeline.core.errors import InputError
from pipeline.evaluation import baselines as bl
from pipeline.evaluation.metrics import (
    bootstrap_ci,
    classification_metrics,
    paired_permutation_test,
    regression_metrics,
    score_with_intervals,
)
from pipeline.evaluation.probes import fit_predict_attentive, fit_predict_linear
from pipeline.evaluation.routing import network_routing, roi_networks
from pipeline.evaluation.run import ModelSpec, encode_target, evaluate_features
from pipeline.evaluation.splits import (
    Fold,
    check_no_leak,
    few_shot_subsets,
    inner_splits,
    kfold_splits,
    site_splits,
    subject_holdout,
)

FAST = EvaluateConfig(bootstrap_resamples=200, permutations=200, inner_folds=3, kfold=4,
                      logistic_cs=(0.01, 0.1, 1.0), ridge_alphas=(0.1, 10.0, 1000.0))


def _planted(n_subjects: int = 80, runs: int = 2, F: int = 20, seed: int = 0, signal: float = 2.0):
    """Subjects with ``runs`` runs each; feature 0 carries the class (shifted by ``signal``)."""
    rng = np.random.default_rng(seed)
    y_sub = np.arange(n_subjects) % 2
    subjects = np.repeat([f"s{i:03d}" for i in range(n_subjects)], runs)
    y = np.repeat(y_sub, runs)
    X = rng.standard_normal((len(y), F))
    X[:, 0] += signal * y
    sites = np.repeat(np.array(["A", "B", "C", "D"])[np.arange(n_subjects) % 4], runs)
    return X, y, subjects, sites


def _linear(X, y, subjects, task="classification", baseline=False, name="model"):
    def predict(train, test):
        return fit_predict_linear(X, y, subjects, train, test, task, cs=FAST.logistic_cs, alphas=FAST.ridge_alphas,
                                  inner_folds=FAST.inner_folds).prediction
    return ModelSpec(name, predict, baseline)


# --------------------------------------------------------------------------- metrics


def test_classification_metrics_known_values():
    y = np.array([0, 0, 1, 1])
    m = classification_metrics(y, np.array([0.1, 0.4, 0.35, 0.8]))
    assert m["auroc"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(2 / 3)
    perfect = classification_metrics(y, np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]]))
    assert perfect["auroc"] == 1.0 and perfect["auprc"] == 1.0 and perfect["f1"] == 1.0


def test_classification_metrics_match_sklearn():
    from sklearn import metrics as skm

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    score = np.round(rng.random(200) * 0.6 + 0.3 * y, 1)  # rounding makes ties
    m = classification_metrics(y, score)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, score))
    assert m["auprc"] == pytest.approx(skm.average_precision_score(y, score))
    assert m["f1"] == pytest.approx(skm.f1_score(y, score > 0.5))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, score > 0.5))
    y3 = rng.integers(0, 3, 150)
    p3 = rng.dirichlet(np.ones(3), 150)
    p3[np.arange(150), y3] += 0.3
    m3 = classification_metrics(y3, p3)
    assert m3["auroc"] == pytest.approx(skm.roc_auc_score(y3, p3 / p3.sum(1, keepdims=True), multi_class="ovr"))
    assert m3["f1"] == pytest.approx(skm.f1_score(y3, p3.argmax(1), average="macro"))
    assert np.isnan(classification_metrics(np.zeros(5, int), rng.random(5))["auroc"])


def test_regression_metrics_known_values():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    m = regression_metrics(y, y + np.array([1.0, -1.0, 1.0, -1.0]))
    assert m["mae"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(1.0)
    assert m["r2"] == pytest.approx(1 - 4 / 5)
    assert regression_metrics(y, 2 * y)["pearson_r"] == pytest.approx(1.0)


def _coverage(draw, truth: float, task: str, metric: str, *, confidence: float, datasets: int = 200,
              resamples: int = 150, grouped: bool = True) -> float:
    """Share of ``datasets`` planted datasets whose bootstrap interval contains the known true value."""
    hits = 0
    for i in range(datasets):
        y, score, groups = draw(np.random.default_rng(1000 + i))
        lo, hi = bootstrap_ci(y, score, task, groups=groups if grouped else None, n_resamples=resamples,
                              confidence=confidence, seed=i, metrics=(metric,))[metric]
        hits += lo <= truth <= hi
    return hits / datasets


def test_interval_coverage_of_a_known_auroc_is_nominal():
    # Scores N(d*y, 1): the population AUROC is Phi(d / sqrt 2). 200 datasets of 60 subjects; the binomial
    # standard error of a coverage near 0.95 (0.8) is 0.015 (0.028). A widened, narrowed or one-sided
    # interval, or one of the wrong level, lands outside the band.
    from scipy.stats import norm

    d = 1.0
    truth = float(norm.cdf(d / np.sqrt(2)))

    def draw(rng):
        y = np.arange(60) % 2
        return y, rng.standard_normal(60) + d * y, None

    assert 0.90 <= _coverage(draw, truth, "classification", "auroc", confidence=0.95) <= 0.985
    assert 0.72 <= _coverage(draw, truth, "classification", "auroc", confidence=0.80) <= 0.88


def test_interval_resampling_subjects_covers_clustered_runs_and_rows_do_not():
    # 40 subjects x 3 runs whose errors share a subject effect (sd 1) plus run noise (sd 0.3): the true MAE is
    # sqrt(2/pi) * sqrt(1 + 0.09). Resampling subjects keeps nominal coverage; resampling runs as if they were
    # independent gives intervals far too narrow, and the test can tell the two apart.
    truth = float(np.sqrt(2 / np.pi) * np.sqrt(1.0 + 0.3**2))

    def draw(rng):
        g = np.repeat(np.arange(40), 3)
        y = rng.standard_normal(g.size)
        return y, y + rng.standard_normal(40)[g] + 0.3 * rng.standard_normal(g.size), g.astype(str)

    by_subject = _coverage(draw, truth, "regression", "mae", confidence=0.95)
    by_row = _coverage(draw, truth, "regression", "mae", confidence=0.95, grouped=False)
    assert 0.90 <= by_subject <= 0.985
    assert by_row < 0.85


def test_interval_width_shrinks_like_one_over_root_n():
    # 16 times the subjects: the interval of a known AUROC is about 4 times narrower (1/sqrt(n)).
    widths = {}
    for n in (50, 800):
        w = []
        for i in range(20):
            rng = np.random.default_rng(i)
            y = np.arange(n) % 2
            lo, hi = bootstrap_ci(y, rng.standard_normal(n) + y, "classification", n_resamples=150, seed=i,
                                  metrics=("auroc",))["auroc"]
            w.append(hi - lo)
        widths[n] = float(np.mean(w))
    assert 3.0 <= widths[50] / widths[800] <= 5.3


def test_reported_interval_is_the_bootstrap_interval_unwidened():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 30)
    score = np.clip(0.5 + 0.3 * (y - 0.5) + 0.3 * rng.standard_normal(30), 0, 1)
    scored = score_with_intervals(y, score, "classification", n_resamples=200, seed=4)
    ci = bootstrap_ci(y, score, "classification", n_resamples=200, seed=4)
    point = classification_metrics(y, score)
    for name, v in scored.items():
        assert (v["low"], v["high"]) == ci[name] and v["value"] == point[name], name
    # the one-metric path draws the same resamples
    assert bootstrap_ci(y, score, "classification", n_resamples=200, seed=4, metrics=("auroc",))["auroc"] == ci["auroc"]


def test_bootstrap_resamples_whole_subjects():
    # Two runs per subject with identical predictions: a subject-level bootstrap
    # of a metric that is constant within subjects gives the same interval as
    # bootstrapping one row per subject.
    rng = np.random.default_rng(2)
    y = rng.standard_normal(30)
    pred = y + rng.standard_normal(30)
    one = bootstrap_ci(y, pred, "regression", n_resamples=200, seed=3)
    groups = np.repeat([f"s{i:02d}" for i in range(30)], 2)  # sorts like the rows
    two = bootstrap_ci(np.repeat(y, 2), np.repeat(pred, 2), "regression", groups=groups,
                       n_resamples=200, seed=3)
    assert one["mae"] == pytest.approx(two["mae"])


def test_permutation_test_identical_and_different_models():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    good = np.clip(0.5 + 0.4 * (y - 0.5) + 0.15 * rng.standard_normal(200), 0, 1)
    noise = rng.random(200)
    same = paired_permutation_test(y, good, good, "classification", "auroc", n_permutations=100)
    assert same["difference"] == 0.0 and same["p_value"] == 1.0
    strong = paired_permutation_test(y, good, noise, "classification", "auroc", n_permutations=200)
    assert strong["difference"] > 0.3 and strong["p_value"] < 0.01
    # MAE: lower is better, the sign still says "a is better".
    yr = rng.standard_normal(100)
    res = paired_permutation_test(yr, yr + 0.1 * rng.standard_normal(100), yr + rng.standard_normal(100),
                                  "regression", "mae", n_permutations=100)
    assert res["difference"] > 0 and res["p_value"] < 0.05


# --------------------------------------------------------------------------- splits


def test_splits_never_leak_a_subject():
    X, y, subjects, sites = _planted(n_subjects=41, runs=3)
    for folds in (kfold_splits(subjects, 5, 0, y), kfold_splits(subjects, 5, 1), site_splits(sites, subjects)):
        check_no_leak(folds, subjects)
        tested = np.concatenate([f.test for f in folds])
        assert np.array_equal(np.sort(tested), np.arange(len(y)))  # each run tested exactly once
        for f in folds:
            assert not set(subjects[f.train]) & set(subjects[f.test])
    for tr, va in inner_splits(subjects[:60], y[:60], 3, 0):
        assert not set(subjects[:60][tr]) & set(subjects[:60][va])
    with pytest.raises(ValueError, match="on both sides"):
        check_no_leak([Fold("bad", np.array([0]), np.array([1]))], np.array(["a", "a"]))


def test_site_split_keeps_a_subject_seen_at_two_sites_out_of_training():
    subjects = np.array(["a", "a", "b", "c"])
    sites = np.array(["X", "Y", "X", "Y"])
    folds = site_splits(sites, subjects)
    assert [f.name for f in folds] == ["site-X", "site-Y"]
    assert "a" not in subjects[folds[0].train]
    with pytest.raises(ValueError, match="at least 2 sites"):
        site_splits(np.array(["X", "X"]), np.array(["a", "b"]))


def test_subject_holdout_and_kfold_errors():
    subjects = np.array(["a", "b", "c", "c"])
    fold = subject_holdout(np.array(["train", "val", "test", "test"]), subjects)[0]
    assert fold.test.tolist() == [2, 3] and fold.train.tolist() == [0, 1]
    with pytest.raises(ValueError, match="split 'test'"):
        subject_holdout(np.array(["train", "train"]), np.array(["a", "b"]))
    with pytest.raises(ValueError, match="at least 5 subjects"):
        kfold_splits(np.array(["a", "b", "c"]), 5, 0)


def test_few_shot_draws_k_subjects_per_class_from_training_rows():
    X, y, subjects, _ = _planted(n_subjects=40, runs=2)
    fold = kfold_splits(subjects, 4, 0, y)[0]
    draws = few_shot_subsets(fold.train, y, subjects, 3, 5, seed=0)
    assert len(draws) == 5
    for rows in draws:
        assert set(rows) <= set(fold.train)
        for c in (0, 1):
            assert np.unique(subjects[rows][y[rows] == c]).size == 3
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])
    with pytest.raises(ValueError, match="only"):
        few_shot_subsets(fold.train, y, subjects, 100, 1, seed=0)


# --------------------------------------------------------------------------- probes and the core


def test_planted_signal_is_recovered_and_shuffled_labels_are_chance():
    X, y, subjects, _ = _planted(n_subjects=100, runs=2, signal=2.0)
    folds = kfold_splits(subjects, FAST.kfold, 0, y)
    res = evaluate_features([_linear(X, y, subjects), _linear(X[:, 1:], y, subjects, baseline=True, name="no_signal")],
                            y, subjects, folds, "classification", cfg=FAST)
    model = res["models"]["model"]["metrics"]
    assert model["auroc"]["value"] > 0.9
    assert 0.5 < model["auroc"]["low"] < model["auroc"]["high"] <= 1.0
    assert abs(res["models"]["no_signal"]["metrics"]["auroc"]["value"] - 0.5) < 0.15
    assert res["best_baseline"] == "no_signal"
    assert res["comparisons"]["model"]["p_value"] < 0.01
    # Shuffled labels: the same features say nothing about them.
    aucs = []
    for seed in range(3):
        y_perm = np.random.default_rng(seed).permutation(np.arange(100) % 2)
        ys = np.repeat(y_perm, 2)
        f = kfold_splits(subjects, FAST.kfold, seed, ys)
        r = evaluate_features([_linear(X, ys, subjects, baseline=True)], ys, subjects, f, "classification", cfg=FAST)
        aucs.append(r["models"]["model"]["metrics"]["auroc"]["value"])
    assert abs(np.mean(aucs) - 0.5) < 0.1


def test_ridge_probe_recovers_a_planted_regression_target():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((120, 10))
    age = 20 + 5 * X[:, 0] + 0.5 * rng.standard_normal(120)
    subjects = np.array([f"s{i}" for i in range(120)])
    folds = kfold_splits(subjects, 4, 0)
    res = evaluate_features([_linear(X, age, subjects, task="regression")], age, subjects, folds, "regression", cfg=FAST)
    m = res["models"]["model"]["metrics"]
    assert m["r2"]["value"] > 0.9 and m["pearson_r"]["value"] > 0.95
    assert res["primary_metric"] == "mae" and res["comparisons"] == {}


def test_few_shot_results_per_resample():
    X, y, subjects, _ = _planted(n_subjects=60, runs=1, F=3, signal=3.0)
    folds = kfold_splits(subjects, 3, 0, y)
    res = evaluate_features([_linear(X, y, subjects), _linear(X[:, 1:], y, subjects, baseline=True, name="b")],
                            y, subjects, folds, "classification", cfg=FAST, few_shot=4)
    fs = res["few_shot"]["models"]["model"]["metrics"]["auroc"]
    assert len(fs["values"]) == FAST.few_shot_resamples
    assert fs["mean"] > 0.8


def test_attentive_probe_finds_the_informative_token():
    rng = np.random.default_rng(0)
    N, R, D = 160, 6, 8
    y = np.arange(N) % 2
    tok = rng.standard_normal((N, R, D)).astype(np.float32)
    tok[:, 2, 0] += 2.5 * y  # only ROI 2 carries the label
    train, test = np.arange(120), np.arange(120, N)
    proba = fit_predict_attentive(tok, y, train, test, "classification", epochs=40, lr=3e-3, seed=0)
    assert proba.shape == (40, 2)
    assert classification_metrics(y[test], proba)["auroc"] > 0.9


def test_fc_baselines_recover_planted_connectivity():
    rng = np.random.default_rng(0)
    series, y = [], []
    for i in range(60):
        label = i % 2
        x = rng.standard_normal((120, 6))
        if label:  # class 1: ROIs 0 and 1 are coupled
            x[:, 1] = 0.8 * x[:, 0] + 0.6 * x[:, 1]
        series.append(x)
        y.append(label)
    y = np.array(y)
    subjects = np.array([f"s{i}" for i in range(60)])
    fz = bl.fc_pearson_features(series)
    assert fz.shape == (60, 15)
    assert np.all(np.isfinite(fz))
    train, test = np.arange(40), np.arange(40, 60)
    pred = fit_predict_linear(fz, y, subjects, train, test, "classification", cs=(0.1, 1.0), inner_folds=3).prediction
    assert classification_metrics(y[test], pred)["auroc"] > 0.9
    Xtr, Xte = bl.fc_tangent_fold(series, train, test)
    assert Xtr.shape == (40, 15) and Xte.shape == (20, 15)
    pred = fit_predict_linear(np.concatenate([Xtr, Xte]), y[np.r_[train, test]], subjects, train, test,
                              "classification", cs=(0.1, 1.0), inner_folds=3).prediction
    assert classification_metrics(y[test], pred)["auroc"] > 0.9


def test_fc_pearson_tolerates_zero_variance_rois():
    x = np.random.default_rng(0).standard_normal((50, 4))
    x[:, 2] = 3.0
    fz = bl.fc_pearson_features([x])
    assert np.all(np.isfinite(fz))
    with pytest.raises(ValueError, match="expected 4"):
        bl.fc_pearson_features([x, x[:, :3]])


def test_structural_baselines_learn_a_planted_blob():
    rng = np.random.default_rng(0)
    N = 48
    y = np.arange(N) % 2
    vols = rng.standard_normal((N, 12, 12, 12)).astype(np.float32) * 0.5
    vols[y == 1, 3:7, 3:7, 3:7] += 1.5
    train, test = np.arange(36), np.arange(36, N)
    Xtr, Xte = bl.intensity_pca_fold(vols, train, test, n_components=5)
    assert Xtr.shape == (36, 5) and Xte.shape == (12, 5)
    subjects = np.array([f"s{i}" for i in range(N)])
    pred = fit_predict_linear(np.concatenate([Xtr, Xte]), y, subjects, train, test, "classification", cs=(1.0,)).prediction
    assert classification_metrics(y[test], pred)["auroc"] > 0.9
    proba = bl.fit_predict_cnn3d(vols, y, train, test, "classification", epochs=15, channels=4, lr=3e-3)
    assert proba.shape == (12, 2)
    assert classification_metrics(y[test], proba)["auroc"] > 0.85


# --------------------------------------------------------------------------- targets and routing


def test_encode_target_picks_task_and_positive_class():
    y, classes, task = encode_target(pd.Series(["autism", "control", "control", "autism", "control"]), "diagnosis")
    assert task == "classification" and classes == ["control", "autism"] and y.tolist() == [1, 0, 0, 1, 0]
    _, classes, _ = encode_target(pd.Series(["M"] * 5 + ["F"] * 2), "sex")
    assert classes == ["M", "F"]  # the rarer class is positive
    y, classes, task = encode_target(pd.Series(np.linspace(6, 40, 30)), "age")
    assert task == "regression" and classes == []
    with pytest.raises(InputError, match="single class"):
        encode_target(pd.Series(["M", "M"]), "sex")


def test_roi_networks_and_routing_fractions():
    names = ["7Networks_LH_Vis_1", "7Networks_RH_Default_PFC_3", "HIP-head-m-rh", "CC200_5"]
    assert roi_networks(names) == ["Vis", "Default", "Subcortex", "Unassigned"]
    counts = np.array([[4, 0], [1, 1], [0, 2], [3, 3]])
    maps = network_routing(counts, ["Vis", "Default", "Subcortex", "Vis"])
    assert maps["networks"] == ["Vis", "Default", "Subcortex"]
    assert maps["fractions"][0] == pytest.approx([0.7, 0.3])
    assert maps["assignments"] == [10.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="count rows"):
        network_routing(counts, ["Vis"])


def test_roi_networks_from_an_atlas_image(shared_data):
    nets = roi_networks([f"CC200_{i}" for i in range(1, 11)], shared_data / "abide" / "CC200_ROIs_3mm.nii.gz")
    assert len(nets) == 10
    assert set(nets) <= {"Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default", "Subcortex", "Unassigned"}
    assert sum(n != "Unassigned" for n in nets) >= 8


def test_row_space_probe_equals_the_probe_on_raw_features():
    """More features than rows: the SVD coordinates give the same predictions and the same chosen C."""
    from pipeline.evaluation.probes import _inner_loss, _model, row_space
    from pipeline.evaluation.splits import inner_splits

    rng = np.random.default_rng(3)
    X = rng.standard_normal((70, 400))
    y = (X[:, :5].sum(1) + rng.standard_normal(70) > 0).astype(int)
    subjects = np.array([f"s{i}" for i in range(70)])
    train, test = np.arange(50), np.arange(50, 70)
    Xtr, Xte = X[train], X[test]
    Ptr, Pte = row_space(Xtr, Xte)
    assert Ptr.shape == (50, 50) and Pte.shape == (20, 50)
    inner = inner_splits(subjects[train], y[train], 3, 0)
    for C in (0.01, 1.0):
        # Same optimum: equal to solver precision (exact with a tight tolerance; within lbfgs's default tol otherwise).
        exact = {"tol": 1e-10, "max_iter": 10000}
        raw = _model("classification", C, 0).set_params(**exact).fit(Xtr, y[train]).predict_proba(Xte)
        red = _model("classification", C, 0).set_params(**exact).fit(Ptr, y[train]).predict_proba(Pte)
        np.testing.assert_allclose(red, raw, atol=1e-8)
        assert _inner_loss(Ptr, y[train], inner, "classification", C, 2, 0) == pytest.approx(
            _inner_loss(Xtr, y[train], inner, "classification", C, 2, 0), abs=5e-3)
    yr = X[:, 0] * 2 + rng.standard_normal(70)
    np.testing.assert_allclose(_model("regression", 10.0, 0).fit(Ptr, yr[train]).predict(Pte),
                               _model("regression", 10.0, 0).fit(Xtr, yr[train]).predict(Xte), atol=1e-8)
    # fewer features than rows: untouched
    a, b = row_space(Xtr[:, :10], Xte[:, :10])
    assert a is not None and a.shape == (50, 10) and np.array_equal(b, Xte[:, :10])


def test_tangent_features_equal_nilearn_and_reuse_covariances():
    from nilearn.connectome import ConnectivityMeasure

    rng = np.random.default_rng(0)
    series = [rng.standard_normal((60, 12)) @ rng.standard_normal((12, 12)) for _ in range(30)]
    train, test = np.arange(20), np.arange(20, 30)
    ref = ConnectivityMeasure(kind="tangent", vectorize=True, discard_diagonal=True)
    want_tr = ref.fit_transform([series[i] for i in train])
    want_te = ref.transform([series[i] for i in test])
    tangent = bl.TangentConnectivity(series)
    got_tr, got_te = tangent.fold(train, test)
    np.testing.assert_allclose(got_tr, want_tr, atol=1e-5)
    np.testing.assert_allclose(got_te, want_te, atol=1e-5)
    covs = tangent.covariances
    tangent.fold(test, train)
    assert tangent.covariances is covs  # computed once for every fold
    # a pool of workers over the batched eigendecompositions gives the same features
    pooled_tr, pooled_te = bl.TangentConnectivity(series, workers=2).fold(train, test)
    np.testing.assert_allclose(pooled_tr, got_tr, atol=1e-6)
    np.testing.assert_allclose(pooled_te, got_te, atol=1e-6)
    mats = np.stack([np.cov(x.T) + np.eye(12) for x in series])
    np.testing.assert_allclose(bl._spd_map(np.log, mats, chunk=4, workers=3), bl._spd_map(np.log, mats), atol=1e-10)


def test_roi_readouts_shapes_and_similarity_structure():
    from pipeline.evaluation.readouts import readout_features, roi_similarity_features

    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((5, 20, 8)).astype(np.float32) + 3.0  # a large component shared by all ROIs
    tokens[:, 1] = tokens[:, 0] + 0.05 * rng.standard_normal((5, 8))  # ROI 1 ~ ROI 0
    pooled = tokens.mean(1)
    assert readout_features("mean", pooled, tokens).shape == (5, 8)
    assert readout_features("roi", pooled, tokens).shape == (5, 160)
    sim = roi_similarity_features(tokens)
    assert sim.shape == (5, 190) and np.isfinite(sim).all()
    # pair (0, 1) stands out; the shared component is removed, so other pairs are not all ~1
    assert (sim[:, 0] > 2.0).all() and np.abs(np.median(sim[:, 1:], axis=1)).max() < 0.5
    with pytest.raises(ValueError, match="unknown readout"):
        readout_features("max", pooled, tokens)


def test_fold_mean_is_free_of_the_offsets_that_pooling_leave_site_out_adds():
    """A model that predicts only its training prior reads below chance pooled over sites of different class
    balance, and at chance within each site (issue 14: fine-tuning's pooled 0.36 for sex, 0.495 per site)."""
    rng = np.random.default_rng(0)
    share = {"a": 0.05, "b": 0.25, "c": 0.45}
    sites = np.repeat(list(share), 300)
    y = np.concatenate([(rng.random(300) < p).astype(np.int64) for p in share.values()])
    subjects = np.array([f"s{i}" for i in range(y.size)])
    folds = site_splits(sites, subjects)

    def prior_only(train, test):
        p = y[train].mean() + 1e-3 * rng.standard_normal(test.size)
        return np.stack([1 - p, p], axis=1)

    res = evaluate_features([ModelSpec("prior", prior_only, baseline=True)], y, subjects, folds, "classification",
                            cfg=FAST)
    info = res["models"]["prior"]
    assert info["metrics"]["auroc"]["value"] < 0.35
    assert abs(info["fold_mean"]["auroc"] - 0.5) < 0.1
    assert set(info["per_fold"]) == {f.name for f in folds}


def test_holm_adjustment_controls_the_family_of_readouts():
    from pipeline.evaluation.metrics import holm_adjust

    assert holm_adjust([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    # session 12's diagnosis readouts vs the random encoder: 0.013 alone, 0.065 among five
    adj = holm_adjust([0.929, 0.911, 0.013, 0.836, 0.886])
    assert adj[2] == pytest.approx(0.065) and adj.max() <= 1.0 and np.all(adj >= [0.929, 0.911, 0.013, 0.836, 0.886])
    assert holm_adjust([]).shape == (0,)
    with pytest.raises(ValueError, match="p-values must be"):
        holm_adjust([0.5, 1.5])
