"""Metrics, subject-level bootstrap confidence intervals and paired permutation tests.

Everything works on plain numpy arrays of out-of-fold predictions:

* classification: ``y`` holds class indices ``0..C-1`` and ``score_NC`` the
  predicted class probabilities (``[N, C]``; ``[N]`` for the positive class of
  a binary task is accepted);
* regression: ``y`` and ``pred`` are real numbers.

Resampling is by *group* (subject) when groups are given, so a subject with
several runs is drawn or swapped as a whole and the intervals are not too
narrow.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "CLASSIFICATION_METRICS",
    "REGRESSION_METRICS",
    "bootstrap_ci",
    "classification_metrics",
    "higher_is_better",
    "holm_adjust",
    "paired_permutation_test",
    "primary_metric",
    "regression_metrics",
    "score_with_intervals",
]

CLASSIFICATION_METRICS = ("auroc", "auprc", "f1", "balanced_accuracy")
REGRESSION_METRICS = ("mae", "rmse", "pearson_r", "r2")
_LOWER_IS_BETTER = {"mae", "rmse"}


def higher_is_better(metric: str) -> bool:
    """Whether larger values of ``metric`` are better."""
    return metric not in _LOWER_IS_BETTER


def primary_metric(task: str) -> str:
    """Metric that ranks models (AUROC for classification, MAE for regression)."""
    return "auroc" if task == "classification" else "mae"


def _as_proba(score: np.ndarray) -> np.ndarray:
    score = np.asarray(score, dtype=np.float64)
    return np.stack([1.0 - score, score], axis=1) if score.ndim == 1 else score


def _binary_auroc(pos: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUROC with average ranks for ties (same value as sklearn, without its validation cost)."""
    from scipy.stats import rankdata

    n1 = int(pos.sum())
    n0 = pos.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _binary_auprc(pos: np.ndarray, s: np.ndarray) -> float:
    """Average precision as sklearn defines it (step-wise, one point per distinct score)."""
    if not pos.any() or pos.all():
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _auroc(y: np.ndarray, proba_NC: np.ndarray) -> float:
    present = np.unique(y)
    if present.size < 2:
        return float("nan")
    if proba_NC.shape[1] == 2:
        return _binary_auroc(y == 1, proba_NC[:, 1])
    # One-vs-rest macro AUROC over the classes present in this sample.
    return float(np.mean([_binary_auroc(y == c, proba_NC[:, c]) for c in present]))


def _auprc(y: np.ndarray, proba_NC: np.ndarray) -> float:
    present = np.unique(y)
    if present.size < 2:
        return float("nan")
    if proba_NC.shape[1] == 2:
        return _binary_auprc(y == 1, proba_NC[:, 1])
    return float(np.mean([_binary_auprc(y == c, proba_NC[:, c]) for c in present]))


def _f1_balanced(y: np.ndarray, pred: np.ndarray, C: int) -> tuple[float, float]:
    """F1 (class 1 for binary, macro otherwise) and balanced accuracy from the confusion counts."""
    conf = np.bincount(y * C + pred, minlength=C * C).reshape(C, C)
    tp = np.diag(conf).astype(np.float64)
    support, predicted = conf.sum(1), conf.sum(0)
    denom = support + predicted
    f1_C = np.divide(2 * tp, denom, out=np.zeros(C), where=denom > 0)
    present = support > 0
    f1 = float(f1_C[1]) if C == 2 else float(f1_C[present | (predicted > 0)].mean())
    balanced = float((tp[present] / support[present]).mean()) if present.sum() > 1 else float("nan")
    return f1, balanced


def classification_metrics(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC, F1 and balanced accuracy of class probabilities.

    Binary tasks use class 1 as positive (F1 of class 1); multi-class tasks
    use one-vs-rest macro averages. Metrics undefined for a single-class
    sample are NaN. Values equal scikit-learn's (tested); the code avoids its
    input validation because the bootstrap calls this thousands of times.

    Parameters
    ----------
    y : array [N]
        Class indices.
    score : array [N, C] or [N]
        Class probabilities (or positive-class probability).
    """
    y = np.asarray(y).astype(np.int64)
    proba_NC = _as_proba(score)
    f1, balanced = _f1_balanced(y, proba_NC.argmax(1), proba_NC.shape[1])
    return {"auroc": _auroc(y, proba_NC), "auprc": _auprc(y, proba_NC), "f1": f1, "balanced_accuracy": balanced}


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, Pearson r and R² of predictions."""
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    err = pred - y
    r = float("nan")
    if y.size > 1 and np.std(y) > 0 and np.std(pred) > 0:
        r = float(np.corrcoef(y, pred)[0, 1])
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "pearson_r": r,
        "r2": 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else float("nan"),
    }


def _metric_fn(task: str) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    return classification_metrics if task == "classification" else regression_metrics


def _single_metric(task: str, metric: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """One metric alone (the permutation test evaluates it thousands of times)."""
    if task == "classification":
        if metric not in CLASSIFICATION_METRICS:
            raise ValueError(f"unknown classification metric {metric!r}; known: {CLASSIFICATION_METRICS}")
        if metric == "auroc":
            return lambda y, s: _auroc(np.asarray(y).astype(np.int64), _as_proba(s))
        if metric == "auprc":
            return lambda y, s: _auprc(np.asarray(y).astype(np.int64), _as_proba(s))
        return lambda y, s: classification_metrics(y, s)[metric]
    if metric not in REGRESSION_METRICS:
        raise ValueError(f"unknown regression metric {metric!r}; known: {REGRESSION_METRICS}")
    if metric == "mae":
        return lambda y, p: float(np.mean(np.abs(np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64))))
    return lambda y, p: regression_metrics(y, p)[metric]


def _group_members(groups: np.ndarray | None, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unique groups and, for each, the row indices belonging to it."""
    if groups is None:
        return np.arange(n), [np.array([i]) for i in range(n)]
    codes, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(codes)))[:-1]
    return codes, np.split(order, bounds)


def bootstrap_ci(y: np.ndarray, score: np.ndarray, task: str, *, groups: np.ndarray | None = None,
                 n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                 metrics: tuple[str, ...] | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every metric, resampling groups (subjects).

    Resamples where a metric is undefined (one class only) are skipped for
    that metric.

    Parameters
    ----------
    metrics : tuple of str, optional
        Only these metrics (default: all of the task's); the resamples drawn are the same.

    Returns
    -------
    dict
        ``{metric: (low, high)}``; ``(nan, nan)`` when no resample defined it.
    """
    fn = _metric_fn(task)
    if metrics is not None:
        ones = {m: _single_metric(task, m) for m in metrics}

        def fn(yy: np.ndarray, ss: np.ndarray) -> dict[str, float]:
            return {m: one(yy, ss) for m, one in ones.items()}
    y = np.asarray(y)
    score = np.asarray(score)
    _, members = _group_members(groups, len(y))
    # rows of group g: flat[start[g] : start[g] + size[g]]; a resample's rows are its groups' rows in draw order
    size_G = np.array([m.size for m in members], dtype=np.int64)
    start_G = np.cumsum(size_G) - size_G
    flat = np.concatenate(members) if members else np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        pick = rng.integers(0, len(members), len(members))
        lens = size_G[pick]
        rows = flat[np.repeat(start_G[pick] - (np.cumsum(lens) - lens), lens) + np.arange(lens.sum())]
        for k, v in fn(y[rows], score[rows]).items():
            draws.setdefault(k, []).append(v)
    alpha = (1.0 - confidence) / 2.0
    out = {}
    for k, values in draws.items():
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        out[k] = (float(np.quantile(arr, alpha)), float(np.quantile(arr, 1 - alpha))) if arr.size else (float("nan"), float("nan"))
    return out


def score_with_intervals(y: np.ndarray, score: np.ndarray, task: str, *, groups: np.ndarray | None = None,
                         n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, dict[str, float]]:
    """Point estimate and bootstrap interval of every metric: ``{metric: {value, low, high}}``.

    The interval is the percentile interval of :func:`bootstrap_ci`, reported as it is: for a skewed
    statistic on a small sample it need not contain the point estimate, and it is not widened to do so
    (that would only make its coverage wrong). Its coverage of the true value is tested on planted data.
    """
    point = _metric_fn(task)(y, score)
    ci = bootstrap_ci(y, score, task, groups=groups, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {k: {"value": v, "low": ci[k][0], "high": ci[k][1]} for k, v in point.items()}


def paired_permutation_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, task: str, metric: str, *,
                            groups: np.ndarray | None = None, n_permutations: int = 1000, seed: int = 0) -> dict[str, float]:
    """Two-sided paired permutation test of ``metric(a) - metric(b)`` on the same samples.

    Under the null hypothesis the two models are exchangeable, so each group's
    (subject's) predictions are swapped between them with probability 1/2.
    The p-value counts the observed permutation too, ``(1 + #{|d*| >= |d|}) / (1 + n)``,
    so it is never 0.

    Returns
    -------
    dict
        ``difference`` (a - b, signed so that positive means *a is better*),
        ``p_value`` and ``n_permutations``.
    """
    _metric_fn(task)
    y = np.asarray(y)
    a = np.asarray(score_a, dtype=np.float64)
    b = np.asarray(score_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired predictions must have the same shape, got {a.shape} and {b.shape}")
    sign = 1.0 if higher_is_better(metric) else -1.0

    one = _single_metric(task, metric)

    def diff(sa: np.ndarray, sb: np.ndarray) -> float:
        return sign * (one(y, sa) - one(y, sb))

    observed = diff(a, b)
    _, members = _group_members(groups, len(y))
    group_of = np.empty(len(y), dtype=np.int64)
    for g, rows in enumerate(members):
        group_of[rows] = g
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_permutations):
        swap_G = rng.random(len(members)) < 0.5
        swap = swap_G[group_of]
        mask = swap.reshape((-1,) + (1,) * (a.ndim - 1))
        pa, pb = np.where(mask, b, a), np.where(mask, a, b)
        if abs(diff(pa, pb)) >= abs(observed) - 1e-12:
            hits += 1
    return {"difference": float(observed), "p_value": (1 + hits) / (1 + n_permutations), "n_permutations": int(n_permutations)}


def holm_adjust(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of ``m`` p-values for testing them together (family-wise error).

    The ``i``-th smallest p-value is multiplied by ``m - i`` (``i`` from 0) and the results made
    non-decreasing in that order and capped at 1; a hypothesis is rejected at level ``alpha``
    when its adjusted p-value is below ``alpha``. Returned in the input order.

    Examples
    --------
    >>> holm_adjust([0.01, 0.04, 0.03]).round(3).tolist()
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must be a 1-d sequence in [0, 1], got {p_values!r}")
    order = np.argsort(p, kind="stable")
    m = len(p)
    scaled = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = scaled
    return out
