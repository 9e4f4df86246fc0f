"""Probes on frozen features: linear (nested cross-validated) and attentive.

Shape legend: N samples, F features, R tokens (ROIs) per sample, D token width,
C classes.

Every probe is fitted on the training rows of one outer fold only: feature
scaling, the choice of the regulariser (inner folds grouped by subject) and
the final fit never see the test rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.evaluation.splits import inner_splits

__all__ = ["LinearProbeResult", "fit_predict_attentive", "fit_predict_linear", "row_space"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearProbeResult:
    """Test predictions of a linear probe and the regulariser it chose.

    ``prediction`` is ``[N_test, C]`` class probabilities (classification) or
    ``[N_test]`` values (regression).
    """

    prediction: np.ndarray
    regularisation: float


def _standardise(train_NF: np.ndarray, test_NF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean_F = train_NF.mean(0)
    std_F = train_NF.std(0)
    std_F = np.where(std_F > 1e-12, std_F, 1.0)
    return (train_NF - mean_F) / std_F, (test_NF - mean_F) / std_F


def row_space(train_NF: np.ndarray, test_NF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in the row space of the training features when there are more features than rows.

    An L2-penalised linear model (logistic or ridge, intercept unpenalised)
    has its weights in the span of its training rows, and an inner fold's
    training rows lie in that span too; so fitting on ``U S`` and predicting
    from ``X_test V`` (thin SVD ``X_train = U S V^T``) gives the same
    predictions and the same choice of regulariser as the raw features, at
    the cost of ``n_train`` instead of ``F`` columns (19,900 FC features ->
    a few hundred).
    """
    n, F = train_NF.shape
    if F <= n:
        return train_NF, test_NF
    U, S, Vt = np.linalg.svd(train_NF, full_matrices=False)
    keep = S > S[0] * 1e-10 if S.size else S > 0
    return U[:, keep] * S[keep], test_NF @ Vt[keep].T


def _logistic(C: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    # Balanced class weights: with a rare class (female, patients at some sites) an
    # unweighted probe predicts the majority for everyone and F1 / balanced accuracy say nothing.
    return LogisticRegression(C=C, max_iter=2000, random_state=seed, class_weight="balanced")


def fit_predict_linear(X_NF: np.ndarray, y: np.ndarray, subjects: np.ndarray, train: np.ndarray, test: np.ndarray,
                       task: str, *, n_classes: int = 2, cs: tuple[float, ...] = (1.0,),
                       alphas: tuple[float, ...] = (1.0,), inner_folds: int = 5, seed: int = 0) -> LinearProbeResult:
    """Logistic (classification, balanced class weights) or ridge (regression) probe with a nested choice of regularisation.

    The inverse strength ``C`` (logistic) or ``alpha`` (ridge) is chosen by
    grouped inner cross-validation on the training rows (log-loss / squared
    error, pooled over inner folds); with too few subjects for inner folds the
    middle value of the grid is used.

    Returns
    -------
    LinearProbeResult
    """
    Xtr, Xte = _standardise(np.asarray(X_NF[train], dtype=np.float64), np.asarray(X_NF[test], dtype=np.float64))
    Xtr, Xte = row_space(Xtr, Xte)
    ytr = np.asarray(y)[train]
    if task == "classification" and np.unique(ytr).size < 2:
        # A fold whose training side holds one class (a single-diagnosis site) can only predict that class.
        log.warning("training fold holds only class %s; predicting it for every test sample", ytr[0])
        proba = np.zeros((len(test), n_classes))
        proba[:, int(ytr[0])] = 1.0
        return LinearProbeResult(proba, float("nan"))
    grid = cs if task == "classification" else alphas
    inner = inner_splits(np.asarray(subjects)[train], ytr if task == "classification" else None, inner_folds, seed)
    best = grid[len(grid) // 2]
    if inner and len(grid) > 1:
        losses = [_inner_loss(Xtr, ytr, inner, task, value, n_classes, seed) for value in grid]
        best = grid[int(np.argmin(losses))]
    model = _model(task, best, seed).fit(Xtr, ytr)
    return LinearProbeResult(_predict(model, Xte, task, n_classes), float(best))


def _model(task: str, value: float, seed: int):
    from sklearn.linear_model import Ridge

    return _logistic(value, seed) if task == "classification" else Ridge(alpha=value)


def _predict(model, X_NF: np.ndarray, task: str, n_classes: int) -> np.ndarray:
    if task == "regression":
        return model.predict(X_NF)
    # A training fold may lack a class: place its probability at 0.
    proba = np.zeros((len(X_NF), n_classes))
    proba[:, model.classes_.astype(int)] = model.predict_proba(X_NF)
    return proba


def _inner_loss(X_NF: np.ndarray, y: np.ndarray, inner: list, task: str, value: float, n_classes: int, seed: int) -> float:
    total, count = 0.0, 0
    for tr, va in inner:
        model = _model(task, value, seed).fit(X_NF[tr], y[tr])
        pred = _predict(model, X_NF[va], task, n_classes)
        if task == "classification":
            p = np.clip(pred[np.arange(len(va)), y[va].astype(int)], 1e-12, 1.0)
            total += float(-np.log(p).sum())
        else:
            total += float(((pred - y[va]) ** 2).sum())
        count += len(va)
    return total / max(count, 1)


def fit_predict_attentive(tokens_NRD: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, task: str, *,
                          n_classes: int = 2, epochs: int = 60, lr: float = 3e-3, weight_decay: float = 0.05,
                          heads: int = 1, batch_size: int = 32, seed: int = 0) -> np.ndarray:
    """Attentive probe: a learned query cross-attends over the frozen tokens, then a linear head.

    Keys carry a learned embedding of the token position (ROI), so the
    probe can weight ROIs by identity.

    Token features are standardised with the training rows' statistics;
    regression targets are standardised too and mapped back. Training is a
    fixed number of AdamW epochs (no test-set early stopping).

    Returns
    -------
    numpy.ndarray
        ``[N_test, C]`` probabilities or ``[N_test]`` predictions.
    """
    import torch

    from pipeline.evaluation.torch_models import AttentivePooler

    torch.manual_seed(seed)
    tokens_NRD = np.asarray(tokens_NRD, dtype=np.float32)
    mean_D = tokens_NRD[train].mean((0, 1))
    std_D = tokens_NRD[train].std((0, 1)) + 1e-6
    Xtr = torch.from_numpy((tokens_NRD[train] - mean_D) / std_D)
    Xte = torch.from_numpy((tokens_NRD[test] - mean_D) / std_D)
    y = np.asarray(y)
    out_dim = n_classes if task == "classification" else 1
    if task == "classification":
        ytr = torch.from_numpy(y[train].astype(np.int64))
        y_mean, y_std = 0.0, 1.0
    else:
        y_mean, y_std = float(y[train].mean()), float(y[train].std() + 1e-8)
        ytr = torch.from_numpy(((y[train] - y_mean) / y_std).astype(np.float32))
    D = tokens_NRD.shape[-1]
    if D % heads:
        heads = 1
    model = AttentivePooler(D, out_dim, heads, n_tokens=tokens_NRD.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    if task == "classification":
        counts = np.bincount(y[train].astype(np.int64), minlength=n_classes).astype(np.float32)
        weight = torch.from_numpy(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0).astype(np.float32))
        loss_fn: torch.nn.Module = torch.nn.CrossEntropyLoss(weight=weight)
    else:
        loss_fn = torch.nn.MSELoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(Xtr), generator=g)
        for s in range(0, len(Xtr), batch_size):
            idx = perm[s:s + batch_size]
            out = model(Xtr[idx])
            loss = loss_fn(out, ytr[idx]) if task == "classification" else loss_fn(out[:, 0], ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        out = model(Xte)
    if task == "classification":
        return out.softmax(-1).numpy().astype(np.float64)
    return out[:, 0].numpy().astype(np.float64) * y_std + y_mean
