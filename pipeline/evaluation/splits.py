"""Evaluation splits that never put one subject on both sides.

A split is a list of :class:`Fold` (train / test row indices). Rows are
samples (runs); every function groups them by subject, so all runs of a
subject fall on the same side. :func:`check_no_leak` verifies that property
and is called on every split the evaluation uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

__all__ = [
    "Fold",
    "check_no_leak",
    "few_shot_subsets",
    "inner_splits",
    "kfold_splits",
    "make_splits",
    "site_splits",
    "subject_holdout",
]


@dataclass(frozen=True)
class Fold:
    """One outer fold: row indices of the training and test samples, and its name."""

    name: str
    train: np.ndarray
    test: np.ndarray


def check_no_leak(folds: list[Fold], subjects: np.ndarray) -> None:
    """Raise ``ValueError`` when a fold shares a subject between train and test, or overlaps rows."""
    subjects = np.asarray(subjects).astype(str)
    for f in folds:
        if np.intersect1d(f.train, f.test).size:
            raise ValueError(f"fold {f.name}: a sample is in both train and test")
        shared = np.intersect1d(subjects[f.train], subjects[f.test])
        if shared.size:
            raise ValueError(f"fold {f.name}: subject(s) {sorted(shared)[:5]} on both sides")


def kfold_splits(subjects: np.ndarray, k: int, seed: int, y: np.ndarray | None = None) -> list[Fold]:
    """``k`` folds grouped by subject, stratified by ``y`` (classes) when given, shuffled with ``seed``."""
    subjects = np.asarray(subjects).astype(str)
    n_subjects = np.unique(subjects).size
    if n_subjects < k:
        raise ValueError(f"{k}-fold split needs at least {k} subjects, got {n_subjects}")
    X = np.zeros((len(subjects), 1))
    if y is not None:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(X, np.asarray(y), subjects)
    else:
        # GroupKFold has no shuffling in every sklearn version: shuffle the group codes instead.
        uniq = np.unique(subjects)
        perm = np.random.default_rng(seed).permutation(uniq.size)
        codes = perm[np.searchsorted(uniq, subjects)]
        parts = GroupKFold(n_splits=k).split(X, groups=codes)
    folds = [Fold(f"fold{i}", np.sort(tr), np.sort(te)) for i, (tr, te) in enumerate(parts)]
    check_no_leak(folds, subjects)
    return folds


def site_splits(sites: np.ndarray, subjects: np.ndarray) -> list[Fold]:
    """Leave-one-site-out folds (a subject scanned at two sites is kept out of training entirely)."""
    sites = np.asarray(sites).astype(str)
    subjects = np.asarray(subjects).astype(str)
    uniq = [s for s in np.unique(sites) if s not in ("", "nan", "None")]
    if len(uniq) < 2:
        raise ValueError(f"leave-site-out needs at least 2 sites, found {uniq}")
    folds = []
    for site in uniq:
        test = np.flatnonzero(sites == site)
        train = np.flatnonzero((sites != site) & ~np.isin(subjects, subjects[test]))
        folds.append(Fold(f"site-{site}", train, test))
    check_no_leak(folds, subjects)
    return folds


def subject_holdout(split_column: np.ndarray, subjects: np.ndarray) -> list[Fold]:
    """One fold: the index's ``test`` split against everything else (splits are per subject in the shards)."""
    split_column = np.asarray(split_column).astype(str)
    test = np.flatnonzero(split_column == "test")
    if test.size == 0:
        raise ValueError("the index has no labelled samples in split 'test'")
    train = np.flatnonzero(split_column != "test")
    folds = [Fold("test", train, test)]
    check_no_leak(folds, subjects)
    return folds


def make_splits(kind: str, *, subjects: np.ndarray, sites: np.ndarray | None = None, split_column: np.ndarray | None = None,
                y: np.ndarray | None = None, k: int = 5, seed: int = 0) -> list[Fold]:
    """Outer folds of kind ``kfold``, ``site`` or ``subject`` (see the functions above)."""
    if kind == "kfold":
        return kfold_splits(subjects, k, seed, y)
    if kind == "site":
        if sites is None:
            raise ValueError("leave-site-out needs site labels")
        return site_splits(sites, subjects)
    if kind == "subject":
        if split_column is None:
            raise ValueError("the subject split needs the index's split column")
        return subject_holdout(split_column, subjects)
    raise ValueError(f"unknown split kind {kind!r}; use site, subject or kfold")


def inner_splits(subjects: np.ndarray, y: np.ndarray | None, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped (and, for classes, stratified) inner folds for choosing a regulariser.

    ``k`` is reduced to what the data allows (subjects, and members of the
    rarest class when stratifying); fewer than 2 gives an empty list, which
    callers treat as "no inner selection possible".
    """
    subjects = np.asarray(subjects).astype(str)
    k = min(k, np.unique(subjects).size)
    if y is not None:
        _, counts = np.unique(np.asarray(y), return_counts=True)
        k = min(k, int(counts.min())) if counts.size > 1 else 0
    if k < 2:
        return []
    return [(f.train, f.test) for f in kfold_splits(subjects, k, seed, y)]


def few_shot_subsets(train: np.ndarray, y: np.ndarray, subjects: np.ndarray, shots: int, resamples: int,
                     seed: int) -> list[np.ndarray]:
    """``resamples`` draws of ``shots`` subjects per class from the training rows.

    Whole subjects are drawn (all their runs come along). Raises
    ``ValueError`` when a class has fewer than ``shots`` subjects.
    """
    y = np.asarray(y)
    subjects = np.asarray(subjects).astype(str)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(resamples):
        picked = []
        for c in np.unique(y[train]):
            subs = np.unique(subjects[train][y[train] == c])
            if subs.size < shots:
                raise ValueError(f"few-shot K={shots}: class {c} has only {subs.size} training subject(s)")
            chosen = rng.choice(subs, shots, replace=False)
            picked.append(train[(y[train] == c) & np.isin(subjects[train], chosen)])
        out.append(np.sort(np.concatenate(picked)))
    return out
