"""The evaluation stage: probes on the frozen encoder against baselines on the same folds.

:func:`evaluate_features` is the array-level core (tested on synthetic data):
given named feature sets and the outer folds, it produces out-of-fold
predictions of every model, metrics with bootstrap intervals, and a paired
permutation test of each embedding-based model against the best baseline.
:func:`evaluate_run` feeds it from a pretraining ``RUN_DIR`` and a shards
folder and writes ``results.json``, ``predictions.tsv`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.config import EvaluateConfig, config_to_dict
from pipeline.core.layout import RunLayout, ShardsLayout
from pipeline.core.faults import crash_point
from pipeline.core.errors import InputError
from pipeline.evaluation.metrics import (
    higher_is_better,
    paired_permutation_test,
    primary_metric,
    score_with_intervals,
)
from pipeline.evaluation.splits import Fold, check_no_leak, few_shot_subsets, make_splits

__all__ = ["KNOWN_BASELINES", "ModelSpec", "encode_target", "evaluate_features", "evaluate_run", "fold_mean",
           "positioning_gradients"]

log = logging.getLogger(__name__)

KNOWN_BASELINES = ("fc_pearson", "fc_tangent", "random_encoder", "intensity_pca", "cnn3d")

# Names that mark the reference (negative) class of a binary diagnosis-like label.
_NEGATIVE_NAMES = {"control", "controls", "hc", "healthy", "td", "typical", "0", "no", "false", "negative", "cn"}


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate.

    ``predict(train_rows, test_rows)`` returns test predictions (``[n, C]``
    probabilities or ``[n]`` values). ``baseline`` marks the references the
    model is compared with; ``few_shot`` says whether it runs in few-shot mode.
    """

    name: str
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray]
    baseline: bool
    few_shot: bool = True
    description: str = ""


def encode_target(values: pd.Series, name: str) -> tuple[np.ndarray, list[str], str]:
    """Target values -> (y, class names, task).

    Numeric columns with more than 10 distinct values are regression targets;
    everything else is classification. For binary labels class 1 (the
    positive class of AUPRC and F1) is the non-control class when one class
    is named like a control group, otherwise the rarer class.
    """
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and numeric.nunique() > 10:
        return numeric.to_numpy(dtype=np.float64), [], "regression"
    labels = values.astype(str).to_numpy()
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size < 2:
        raise InputError(name, f"target has a single class ({classes.tolist()}); nothing to predict")
    order = list(classes)
    if classes.size == 2:
        negative = [c for c in classes if c.lower() in _NEGATIVE_NAMES]
        if len(negative) == 1:
            positive = next(c for c in classes if c != negative[0])
        else:
            positive = classes[int(np.argmin(counts))] if counts[0] != counts[1] else classes[1]
        order = [c for c in classes if c != positive] + [positive]
    y = np.array([order.index(v) for v in labels], dtype=np.int64)
    return y, [str(c) for c in order], "classification"


def _oof(spec: ModelSpec, folds: list[Fold], n: int, n_classes: int, task: str) -> np.ndarray:
    """Out-of-fold predictions of ``spec`` for every row tested by some fold (NaN elsewhere)."""
    shape = (n, n_classes) if task == "classification" else (n,)
    out = np.full(shape, np.nan)
    for f in folds:
        out[f.test] = spec.predict(f.train, f.test)
    return out


def evaluate_features(specs: list[ModelSpec], y: np.ndarray, subjects: np.ndarray, folds: list[Fold], task: str, *,
                      n_classes: int = 2, cfg: EvaluateConfig = EvaluateConfig(), few_shot: int | None = None) -> dict[str, Any]:
    """Out-of-fold predictions, metrics with intervals and permutation tests for every model.

    Parameters
    ----------
    specs : list of ModelSpec
        Models; at least one baseline for the permutation test.
    y : array [N]
        Targets (class indices or values).
    subjects : array [N]
        Subject of each row: bootstrap and permutations resample subjects.
    folds : list of Fold
        Outer folds (checked for subject leaks).
    task : "classification" or "regression"
    few_shot : int, optional
        K training subjects per class, ``cfg.few_shot_resamples`` draws per fold.

    Returns
    -------
    dict
        ``models`` (per model: metrics with intervals, per-fold metrics,
        baseline flag), ``best_baseline``, ``comparisons``, ``predictions``
        (model -> array over ``tested`` rows), ``tested`` (row indices) and,
        with ``few_shot``, ``few_shot`` results.
    """
    subjects = np.asarray(subjects).astype(str)
    check_no_leak(folds, subjects)
    tested = np.unique(np.concatenate([f.test for f in folds]))
    primary = primary_metric(task)
    models: dict[str, Any] = {}
    predictions: dict[str, np.ndarray] = {}
    for spec in specs:
        t0 = time.perf_counter()
        oof = _oof(spec, folds, len(y), n_classes, task)
        crash_point("evaluate.model_done")
        predictions[spec.name] = oof[tested]
        scored = score_with_intervals(y[tested], oof[tested], task, groups=subjects[tested],
                                      n_resamples=cfg.bootstrap_resamples, confidence=cfg.confidence, seed=cfg.seed)
        per_fold = {f.name: _point(y[f.test], oof[f.test], task) for f in folds}
        models[spec.name] = {"baseline": spec.baseline, "description": spec.description, "metrics": scored,
                             "per_fold": per_fold, "fold_mean": fold_mean(per_fold),
                             "seconds": round(time.perf_counter() - t0, 2)}
        log.info("%s: %s %.3f [%.3f, %.3f]", spec.name, primary, scored[primary]["value"], scored[primary]["low"], scored[primary]["high"])
    best = _best(models, [s.name for s in specs if s.baseline], primary)
    comparisons = {}
    if best is not None:
        for spec in specs:
            if spec.baseline:
                continue
            comparisons[spec.name] = {
                "against": best, "metric": primary,
                **paired_permutation_test(y[tested], predictions[spec.name], predictions[best], task, primary,
                                          groups=subjects[tested], n_permutations=cfg.permutations, seed=cfg.seed),
            }
    result: dict[str, Any] = {"task": task, "primary_metric": primary, "models": models, "best_baseline": best,
                              "comparisons": comparisons, "predictions": predictions, "tested": tested,
                              "n_tested": int(tested.size), "n_subjects_tested": int(np.unique(subjects[tested]).size),
                              "folds": [{"name": f.name, "n_train": int(f.train.size), "n_test": int(f.test.size)} for f in folds]}
    if few_shot:
        result["few_shot"] = _few_shot(specs, y, subjects, folds, task, n_classes, cfg, few_shot)
    return result


def fold_mean(per_fold: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the folds where it is defined (NaN where it is defined in none).

    Each fold's model is scored on its own test rows only. The pooled metrics
    (``metrics``) rank the test rows of all folds together, and folds whose
    training data differ in class balance (leave-site-out) score on different
    offsets: pooled, a model that learned only its training prior can read
    below chance. The fold mean is free of that (issue 14,
    ``benchmarks/site_stratified_auroc.py``).
    """
    names = {k for m in per_fold.values() for k in m}
    out = {}
    for k in sorted(names):
        vals = np.array([m.get(k, np.nan) for m in per_fold.values()], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[k] = float(vals.mean()) if vals.size else float("nan")
    return out


def _point(y: np.ndarray, pred: np.ndarray, task: str) -> dict[str, float]:
    from pipeline.evaluation.metrics import classification_metrics, regression_metrics

    return classification_metrics(y, pred) if task == "classification" else regression_metrics(y, pred)


def _best(models: dict[str, Any], baselines: list[str], metric: str) -> str | None:
    scored = [(models[b]["metrics"][metric]["value"], b) for b in baselines if np.isfinite(models[b]["metrics"][metric]["value"])]
    if not scored:
        return None
    pick = max if higher_is_better(metric) else min
    return pick(scored)[1]


def _few_shot(specs: list[ModelSpec], y: np.ndarray, subjects: np.ndarray, folds: list[Fold], task: str, n_classes: int,
              cfg: EvaluateConfig, shots: int) -> dict[str, Any]:
    if task != "classification":
        raise InputError("--few-shot", "few-shot evaluation needs a classification target (K subjects per class)")
    draws = {f.name: few_shot_subsets(f.train, y, subjects, shots, cfg.few_shot_resamples, cfg.seed + i)
             for i, f in enumerate(folds)}
    tested = np.unique(np.concatenate([f.test for f in folds]))
    out: dict[str, Any] = {"k": shots, "resamples": cfg.few_shot_resamples, "models": {}}
    for spec in specs:
        if not spec.few_shot:
            continue
        per_resample = []
        for r in range(cfg.few_shot_resamples):
            sub_folds = [Fold(f.name, draws[f.name][r], f.test) for f in folds]
            oof = _oof(spec, sub_folds, len(y), n_classes, task)
            per_resample.append(_point(y[tested], oof[tested], task))
        summary = {}
        for metric in per_resample[0]:
            values = np.array([p[metric] for p in per_resample], dtype=np.float64)
            summary[metric] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values)),
                               "min": float(np.nanmin(values)), "max": float(np.nanmax(values)), "values": values.tolist()}
        out["models"][spec.name] = {"baseline": spec.baseline, "metrics": summary}
    return out


# --------------------------------------------------------------------------- from a run and shards


def positioning_gradients(run_dir: str | Path, record, samples, shards_dir: str | Path,
                          reference_shards: str | Path | None) -> tuple[np.ndarray | None, str]:
    """Gradient coordinates to position the ROIs, and where they came from.

    The ROIs are positioned as in pretraining: by the gradients the run recorded
    (``RUN_DIR/training_gradients.npy``, :mod:`pipeline.pretrain.record`), whatever the evaluated
    store holds, or by those of ``reference_shards`` when given (which must then be the run's own,
    if it recorded them). A store whose ROI set is not the one the run was trained on (kind, atlas,
    number, names and order of the ROIs) is refused. A run from before runs recorded their data
    falls back to the evaluated store's coordinates (with a warning), and is refused when that store
    has none rather than silently positioning the ROIs by their index.

    Parameters
    ----------
    run_dir : path-like
        The pretraining run.
    record : pipeline.pretrain.record.TrainingData or None
        The run's training record (``None``: an old run without one).
    samples : ShardSamples
        The evaluated store's samples.
    shards_dir : path-like
        The evaluated shards folder (named in errors).
    reference_shards : path-like, optional
        Shards the run was trained on, whose gradients position the ROIs instead.
    """
    from pipeline.core.config import LoaderConfig
    from pipeline.pretrain.record import gradients_digest, load_training_gradients
    from pipeline.store.loader import ShardDataset

    run = RunLayout(run_dir)
    store_dir = ShardsLayout(shards_dir).store_dir(samples.store)
    if record is not None:
        reason = record.roi_set_mismatch(samples.kind, samples.atlas, samples.roi_names)
        if reason:
            raise InputError(store_dir, f"{reason} ({run.training_data}); evaluate on shards of that ROI set")
    if samples.kind != "fmri":
        return None, "none (structural store)"
    if reference_shards is not None:
        try:
            ref = ShardDataset(reference_shards, LoaderConfig(window_length=0, normalization="none"),
                               store=samples.store, training=False)
        except ValueError as exc:  # the loader refuses an unknown store with a ValueError
            raise InputError(ShardsLayout(reference_shards).index, str(exc)) from None
        if ref.roi_names != samples.roi_names:
            raise InputError(Path(reference_shards) / ref.store,
                             f"ROI names differ from the evaluated store {samples.store}: the run's atlas must match")
        grads = ref.gradients_Rk.numpy() if ref.gradients_Rk is not None else None
        if record is not None:
            digest = gradients_digest(grads) if grads is not None else None
            if digest != record.gradients_sha256:
                what = f"gradients (sha256 {digest[:12]})" if digest else "no gradients"
                raise InputError(Path(reference_shards) / ref.store,
                                 f"has {what} but the run was trained with "
                                 f"{'sha256 ' + record.gradients_sha256[:12] if record.gradients_sha256 else 'none'} "
                                 f"({run.training_data}); these are not the shards it was trained on")
        if grads is None:
            return None, f"none: reference store {Path(reference_shards) / ref.store} has no gradients (ROI-index positions, as in training)"
        return grads, f"reference store {Path(reference_shards) / ref.store}"
    if record is not None:
        grads = load_training_gradients(run.root, record)
        if grads is None:
            return None, f"none: the run was trained without gradients (ROI-index positions, {run.training_data.name})"
        return grads, f"the run's training gradients ({run.training_gradients.name}, store {record.store})"
    if samples.gradients_Rk is None:
        raise InputError(run.training_data, f"missing (a run from before runs recorded their data) and store "
                                            f"{store_dir} has no gradients; pass --reference-shards (the shards "
                                            "the run was trained on)")
    log.warning("%s: the run does not record its training gradients; positioning the ROIs by the evaluated store's",
                run.root)
    return samples.gradients_Rk, f"evaluated store {samples.store} (the run does not record its training gradients)"


def _linear_spec(name: str, X_NF: np.ndarray, y: np.ndarray, subjects: np.ndarray, task: str, n_classes: int,
                 cfg: EvaluateConfig, baseline: bool, description: str) -> ModelSpec:
    from pipeline.evaluation.probes import fit_predict_linear

    def predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        return fit_predict_linear(X_NF, y, subjects, train, test, task, n_classes=n_classes, cs=cfg.logistic_cs,
                                  alphas=cfg.ridge_alphas, inner_folds=cfg.inner_folds, seed=cfg.seed).prediction

    return ModelSpec(name, predict, baseline, True, description)


def _fold_features_spec(name: str, features: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
                        y: np.ndarray, subjects: np.ndarray, task: str, n_classes: int, cfg: EvaluateConfig,
                        description: str) -> ModelSpec:
    """A baseline whose features are fitted per fold (tangent space, PCA) followed by the linear probe."""
    from pipeline.evaluation.probes import fit_predict_linear

    def predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        Xtr, Xte = features(train, test)
        X = np.concatenate([Xtr, Xte])
        rows_tr, rows_te = np.arange(len(train)), np.arange(len(train), len(train) + len(test))
        sub = np.concatenate([subjects[train], subjects[test]])
        yy = np.concatenate([y[train], y[test]])
        return fit_predict_linear(X, yy, sub, rows_tr, rows_te, task, n_classes=n_classes, cs=cfg.logistic_cs,
                                  alphas=cfg.ridge_alphas, inner_folds=cfg.inner_folds, seed=cfg.seed).prediction

    return ModelSpec(name, predict, True, True, description)


_READOUT_WHAT = {
    "mean": "mean of all tokens",
    "roi": "per-ROI embeddings (tokens averaged over time, R x D)",
    "roi_similarity": "Fisher-z cosine similarities between the per-ROI embeddings",
    "token_similarity": "Fisher-z similarities between the ROIs' time-resolved token sequences",
}


def _readout_name(prefix: str, readout: str) -> str:
    # "linear" keeps the name the mean-pooled probe always had.
    return f"{prefix}_{'linear' if readout == 'mean' else readout}"


def build_specs(samples, pretrained, random_emb, y: np.ndarray, task: str, n_classes: int,
                cfg: EvaluateConfig, finetune: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                finetune_random: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> list[ModelSpec]:
    """The model's probes (one per readout, attentive, fine-tuning) and the configured baselines for one store.

    ``finetune(train_rows, test_rows)``, when given, is the end-to-end
    fine-tuning mode (see :func:`pipeline.evaluation.finetune.fit_predict_finetune`);
    ``finetune_random`` the same recipe from a randomly initialised encoder (the
    ``random_encoder`` baseline of that mode: what pretraining adds to fine-tuning).
    """
    from pipeline.evaluation import baselines as bl
    from pipeline.evaluation.probes import fit_predict_attentive
    from pipeline.evaluation.readouts import READOUTS, readout_features

    unknown = sorted(set(cfg.readouts) - set(READOUTS))
    if unknown:
        raise InputError("evaluate.readouts", f"unknown readout(s) {unknown}; known: {list(READOUTS)}")
    subjects = samples.index["subject"].astype(str).to_numpy()
    # Per-ROI readouts are defined on ROI tokens (fMRI); a volume's grid tokens only get the mean.
    readouts = [r for r in READOUTS if r in cfg.readouts and (r == "mean" or samples.kind == "fmri")] or ["mean"]

    def features(emb, r: str) -> np.ndarray:
        return readout_features(r, emb.pooled_ND, emb.tokens_NRD, emb.token_similarity_NF)

    specs = [_linear_spec(_readout_name("moe_jepa", r), features(pretrained, r), y, subjects, task, n_classes, cfg, False,
                          f"pretrained target encoder, {_READOUT_WHAT[r]}, nested-CV logistic/ridge") for r in readouts]
    if cfg.attentive_probe:
        def attentive(train: np.ndarray, test: np.ndarray, tokens=pretrained.tokens_NRD) -> np.ndarray:
            return fit_predict_attentive(tokens, y, train, test, task, n_classes=n_classes, epochs=cfg.attentive_epochs,
                                         lr=cfg.attentive_lr, weight_decay=cfg.attentive_weight_decay,
                                         heads=cfg.attentive_heads, seed=cfg.seed)
        specs.append(ModelSpec("moe_jepa_attentive", attentive, False, False,
                               "pretrained target encoder, cross-attention pooler on ROI/patch tokens"))
    if finetune is not None:
        specs.append(ModelSpec("moe_jepa_finetune", finetune, False, False,
                               f"pretrained encoder fine-tuned end to end with a linear head ({cfg.finetune_epochs} epochs per fold)"))
    wanted = set(cfg.baselines)
    if "random_encoder" in wanted and random_emb is not None:
        specs += [_linear_spec(_readout_name("random_encoder", r), features(random_emb, r), y, subjects, task, n_classes, cfg, True,
                               f"randomly initialised encoder of the same architecture, {_READOUT_WHAT[r]}, same linear probe")
                  for r in readouts]
        if finetune_random is not None:
            specs.append(ModelSpec("random_encoder_finetune", finetune_random, True, False,
                                   f"randomly initialised encoder fine-tuned end to end, same recipe ({cfg.finetune_epochs} "
                                   "epochs per fold)"))
    if samples.kind == "fmri":
        series_TR = [x.T for x in samples.data]
        if "fc_pearson" in wanted:
            specs.append(_linear_spec("fc_pearson", bl.fc_pearson_features(series_TR), y, subjects, task, n_classes, cfg,
                                      True, "Fisher-z Pearson connectivity, same linear probe"))
        if "fc_tangent" in wanted:
            tangent = bl.TangentConnectivity(series_TR, workers=cfg.threads)  # covariances once, reference per fold
            specs.append(_fold_features_spec("fc_tangent", tangent.fold, y, subjects,
                                             task, n_classes, cfg, "tangent-space connectivity (reference fitted per fold), same linear probe"))
    else:
        vols = _downsampled(samples.data)
        if "intensity_pca" in wanted:
            specs.append(_fold_features_spec("intensity_pca",
                                             lambda tr, te: bl.intensity_pca_fold(vols, tr, te, cfg.pca_components, cfg.seed),
                                             y, subjects, task, n_classes, cfg, "PCA of voxel intensities (fitted per fold), same linear probe"))
        if "cnn3d" in wanted:
            def cnn(train: np.ndarray, test: np.ndarray) -> np.ndarray:
                return bl.fit_predict_cnn3d(vols, y, train, test, task, n_classes=n_classes, epochs=cfg.cnn_epochs,
                                            channels=cfg.cnn_channels, lr=cfg.cnn_lr, seed=cfg.seed)
            specs.append(ModelSpec("cnn3d", cnn, True, False, "small 3D CNN trained from scratch (volumes at 4 mm)"))
    return specs


def _downsampled(volumes: list[np.ndarray]) -> np.ndarray:
    """Volumes average-pooled by 2 (2 mm -> 4 mm): the structural baselines' input."""
    import torch

    stack = torch.from_numpy(np.stack(volumes).astype(np.float32))[:, None]
    return torch.nn.functional.avg_pool3d(stack, 2, ceil_mode=True)[:, 0].numpy()


def evaluate_run(run_dir: str | Path, shards_dir: str | Path | None, target: str, *, split: str = "kfold",
                 few_shot: int | None = None, cfg: EvaluateConfig = EvaluateConfig(), out_dir: str | Path | None = None,
                 store: str | None = None, reference_shards: str | Path | None = None,
                 atlas_image: str | Path | None = None, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a pretraining run on ``target`` and write the report.

    Parameters
    ----------
    run_dir : path-like
        Pretraining ``RUN_DIR``; embeddings are cached in ``RUN_DIR/embeddings``.
    shards_dir : path-like or None
        Shards to evaluate on (any import with the run's ROI set); ``None``: the shards the run was
        trained on (``RUN_DIR/training_data.json``).
    target : str
        A label column of the index (``diagnosis``, ``sex``, ``age``, ...).
    split : {"kfold", "site", "subject"}
    few_shot : int, optional
        K subjects per class.
    out_dir : path-like, optional
        Default ``RUN_DIR/eval/<target>_<split>[_k<K>]``.
    store : str, optional
        Store to evaluate (default: the run's training store when the shards have it, else the only fMRI store).
    reference_shards : path-like, optional
        The shards the run was trained on, for its gradient coordinates (default: the gradients the run
        recorded, see :func:`positioning_gradients`).
    atlas_image : path-like, optional
        Labels NIfTI of the atlas, to name the networks of ROIs without network names.

    Returns
    -------
    dict
        The JSON-ready results (also written to ``OUT_DIR/results.json``).
    """
    import torch
    from threadpoolctl import threadpool_limits

    from pipeline.core.parallel import available_cpus

    threads = cfg.threads or available_cpus()
    cfg = dataclasses.replace(cfg, threads=threads)
    torch.set_num_threads(threads)
    # numpy/scipy BLAS stays at one thread: OpenBLAS threads spinning on a busy machine made the tangent
    # baseline's eigendecompositions ~90x slower (measured, issue 14); the tangent baseline gets its
    # parallelism from a pool of ``threads`` workers over batches of matrices instead.
    with threadpool_limits(limits=1):
        return _evaluate_run(run_dir, shards_dir, target, split=split, few_shot=few_shot, cfg=cfg, out_dir=out_dir,
                             store=store, reference_shards=reference_shards, atlas_image=atlas_image, checkpoint=checkpoint)


def _evaluate_run(run_dir, shards_dir, target: str, *, split: str, few_shot: int | None, cfg: EvaluateConfig, out_dir,
                  store, reference_shards, atlas_image, checkpoint) -> dict[str, Any]:
    from pipeline.evaluation.embed import embed_samples, load_encoder, read_shard_samples
    from pipeline.evaluation.report import write_report
    from pipeline.evaluation.routing import network_routing, roi_networks

    from pipeline.pretrain.record import read_training_data
    from pipeline.store.read import read_index

    run_dir = Path(run_dir)
    record = read_training_data(run_dir)
    if shards_dir is None:
        if record is None:
            raise InputError(RunLayout(run_dir).training_data, "missing (a run from before runs recorded their data); "
                                                               "pass --shards SHARDS_DIR")
        shards_dir = record.shards_dir
    shards_dir = Path(shards_dir)
    if store is None and record is not None and record.store in set(read_index(shards_dir)[0]["store"].astype(str)):
        store = record.store
    out_dir = Path(out_dir) if out_dir else RunLayout(run_dir).evaluation_dir(target, split, few_shot)
    t0 = time.perf_counter()
    samples = read_shard_samples(shards_dir, target, store=store)
    if len(samples.data) == 0:
        raise InputError(ShardsLayout(shards_dir).index, f"no samples with a {target!r} label in store {samples.store}")
    # the ROI set is checked (and the ROIs' positions chosen) before anything else is computed
    gradients, grad_source = positioning_gradients(run_dir, record, samples, shards_dir, reference_shards)
    y, classes, task = encode_target(samples.index[target], target)
    if few_shot and task != "classification":
        raise InputError("--few-shot", f"few-shot evaluation needs a classification target; {target!r} is continuous")
    unknown = sorted(set(cfg.baselines) - set(KNOWN_BASELINES))
    if unknown:
        raise InputError("evaluate.baselines", f"unknown baseline(s) {unknown}; known: {list(KNOWN_BASELINES)}")
    subjects = samples.index["subject"].astype(str).to_numpy()
    try:
        folds = make_splits(split, subjects=subjects, sites=samples.index["site"].astype(str).to_numpy(),
                            split_column=samples.index["split"].astype(str).to_numpy(),
                            y=y if task == "classification" else None, k=cfg.kfold, seed=cfg.seed)
    except ValueError as exc:
        raise InputError(ShardsLayout(shards_dir).index, str(exc)) from None
    cache = run_dir / "embeddings"
    enc = load_encoder(run_dir, checkpoint=checkpoint)
    pretrained = embed_samples(enc, samples, gradients_Rk=gradients, max_windows=cfg.max_windows,
                               batch_size=cfg.batch_size, cache_dir=cache, seed=cfg.seed)
    random_emb = None
    if "random_encoder" in cfg.baselines:
        rnd = load_encoder(run_dir, checkpoint=checkpoint, random_init=True, seed=cfg.seed)
        random_emb = embed_samples(rnd, samples, gradients_Rk=gradients, max_windows=cfg.max_windows,
                                   batch_size=cfg.batch_size, cache_dir=cache, seed=cfg.seed)
    t_embed = time.perf_counter() - t0
    finetune = finetune_random = None
    if cfg.finetune_epochs > 0 and samples.kind == "fmri":
        from functools import partial

        from pipeline.evaluation.finetune import fit_predict_finetune

        def _finetune(encoder, train: np.ndarray, test: np.ndarray) -> np.ndarray:
            return fit_predict_finetune(encoder, samples, gradients, y, train, test, task, n_classes=max(len(classes), 2),
                                        epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, batch_size=cfg.batch_size,
                                        max_windows=cfg.max_windows, seed=cfg.seed)

        finetune = partial(_finetune, enc)
        if random_emb is not None:
            finetune_random = partial(_finetune, rnd)
    specs = build_specs(samples, pretrained, random_emb, y, task, max(len(classes), 2), cfg, finetune=finetune,
                        finetune_random=finetune_random)
    result = evaluate_features(specs, y, subjects, folds, task, n_classes=max(len(classes), 2), cfg=cfg, few_shot=few_shot)
    networks = roi_networks(samples.roi_names, atlas_image) if samples.kind == "fmri" else ["whole volume"]
    routing = [network_routing(c, networks if c.shape[0] == len(networks) else ["whole volume"] * c.shape[0])
               for c in pretrained.routing]
    tested = result.pop("tested")
    preds = result.pop("predictions")
    result.update({
        "run_dir": str(run_dir), "checkpoint": str(enc.checkpoint), "step": enc.step, "shards_dir": str(shards_dir),
        "store": samples.store, "target": target, "classes": classes, "split": split, "n_samples": len(y),
        "n_subjects": int(np.unique(subjects).size), "gradients": grad_source, "routing": routing,
        "training_data": record.identity() if record is not None else None,
        "roi_networks": {str(n): int(c) for n, c in zip(*np.unique(networks, return_counts=True))},
        "seconds": {"read_and_embed": round(t_embed, 1), "total": round(time.perf_counter() - t0, 1)},
        "config": config_to_dict(cfg),
    })
    table = _prediction_table(samples.index.iloc[tested], y[tested], preds, classes, task)
    crash_point("evaluate.before_report")
    write_report(out_dir, result, table)
    return result


def _prediction_table(index: pd.DataFrame, y: np.ndarray, preds: dict[str, np.ndarray], classes: list[str], task: str) -> pd.DataFrame:
    table = index[["sample_id", "subject", "site", "split"]].reset_index(drop=True).copy()
    table["y_true"] = [classes[int(v)] for v in y] if task == "classification" else y
    for name, p in preds.items():
        if task == "classification":
            for c, cls in enumerate(classes):
                table[f"{name}__p_{cls}"] = p[:, c]
        else:
            table[f"{name}__pred"] = p
    return table
