"""Honest baselines, run on the same folds as the model.

fMRI: functional connectivity features (Fisher-z Pearson correlations, or
tangent-space covariances whose reference mean is estimated on the training
fold only) fed to the same nested linear probe as the embeddings.

Structural: intensity PCA (fitted on the training fold) + the linear probe,
and a small 3D CNN trained from scratch on each training fold.

Shape legend: N samples, T frames, R ROIs, F features, X/Y/Z voxels.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "TangentConnectivity",
    "fc_pearson_features",
    "fc_tangent_fold",
    "fit_predict_cnn3d",
    "geometric_mean",
    "intensity_pca_fold",
]


def fc_pearson_features(series: list[np.ndarray]) -> np.ndarray:
    """Upper-triangle Fisher-z Pearson correlations of each run (``[T, R]`` each) -> ``[N, R(R-1)/2]``.

    Zero-variance ROIs have no correlation; their entries are 0 (z of r = 0)
    rather than NaN, so they carry no signal instead of breaking the probe.
    """
    if not series:
        raise ValueError("no series given")
    R = series[0].shape[1]
    iu = np.triu_indices(R, k=1)
    out = np.empty((len(series), iu[0].size), dtype=np.float32)
    for i, x_TR in enumerate(series):
        if x_TR.shape[1] != R:
            raise ValueError(f"run {i} has {x_TR.shape[1]} ROIs, expected {R}")
        x = x_TR - x_TR.mean(0)
        norm_R = np.sqrt((x**2).sum(0))
        ok_R = norm_R > 1e-8
        x = np.where(ok_R, x / np.where(ok_R, norm_R, 1.0), 0.0)
        r_RR = np.clip(x.T @ x, -0.999999, 0.999999)
        out[i] = np.arctanh(r_RR[iu])
    return out


def _spd_map(fn, mats_NRR: np.ndarray, chunk: int = 64, workers: int = 1) -> np.ndarray:
    """``fn`` applied to the eigenvalues of every symmetric matrix (batched ``eigh``, in chunks).

    ``workers`` > 1 runs the chunks in a thread pool (numpy's LAPACK calls
    release the GIL); callers keep BLAS itself at one thread, so the pool is
    the only parallelism and a busy machine is never oversubscribed.
    """
    out = np.empty_like(mats_NRR)

    def one(s: int) -> None:
        vals, vecs = np.linalg.eigh(mats_NRR[s:s + chunk])
        out[s:s + chunk] = (vecs * fn(vals)[:, None, :]) @ np.swapaxes(vecs, 1, 2)

    starts = range(0, len(mats_NRR), chunk)
    if workers > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, starts))
    else:
        for s in starts:
            one(s)
    return out


def _sym(mats: np.ndarray) -> np.ndarray:
    return 0.5 * (mats + np.swapaxes(mats, -1, -2))


def geometric_mean(covs_NRR: np.ndarray, *, max_iter: int = 30, tol: float = 1e-7, workers: int = 1) -> np.ndarray:
    """Riemannian (log-Euclidean gradient descent) mean of SPD matrices, as nilearn's tangent reference.

    Same algorithm, initialisation (arithmetic mean), step halving and stopping
    rule (``norm / R**2 < tol``) as ``nilearn.connectome.ConnectivityMeasure(kind="tangent")``,
    with the eigendecompositions batched. (Starting from the log-Euclidean mean
    instead was measured on 160 ABIDE runs: 12 iterations instead of 10, so no.)
    ``workers``: threads for the batched eigendecompositions (see :func:`_spd_map`).
    """
    gmean = covs_NRR.mean(0)
    norm_old, step = np.inf, 1.0
    for _ in range(max_iter):
        vals, vecs = np.linalg.eigh(gmean)
        inv_sqrt = (vecs / np.sqrt(vals)) @ vecs.T
        logs_mean = _spd_map(np.log, _sym(inv_sqrt @ covs_NRR @ inv_sqrt), workers=workers).mean(0)
        norm = np.linalg.norm(logs_mean)
        lv, lvec = np.linalg.eigh(logs_mean)
        sqrt_g = (vecs * np.sqrt(vals)) @ vecs.T
        gmean = _sym(sqrt_g @ ((lvec * np.exp(lv * step)) @ lvec.T) @ sqrt_g)
        if norm < norm_old:
            norm_old = norm
        elif norm > norm_old:
            step /= 2.0
            norm = norm_old
        if norm / gmean.size < tol:
            break
    return gmean


class TangentConnectivity:
    """Tangent-space connectivity (Varoquaux et al. 2010) with the reference fitted per training fold.

    Covariances are Ledoit-Wolf shrunk (nilearn's default) so short runs and
    zero-variance ROIs still give positive-definite matrices; they depend on
    one run only, so they are computed once and reused by every fold; only
    the reference (geometric mean of the training covariances) is refitted.
    Features equal ``ConnectivityMeasure(kind="tangent", vectorize=True,
    discard_diagonal=True)`` fitted on the training runs (tested).
    """

    def __init__(self, series: list[np.ndarray], workers: int = 1):
        self.series = series
        self.workers = max(1, int(workers))
        self._covs: np.ndarray | None = None

    @property
    def covariances(self) -> np.ndarray:
        if self._covs is None:
            from sklearn.covariance import LedoitWolf

            self._covs = np.stack([LedoitWolf(store_precision=False).fit(np.asarray(x, dtype=np.float64)).covariance_
                                   for x in self.series])
        return self._covs

    def fold(self, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(train features, test features) with the reference fitted on ``train``."""
        from nilearn.connectome import sym_matrix_to_vec

        covs = self.covariances
        mean = geometric_mean(covs[train], workers=self.workers)
        vals, vecs = np.linalg.eigh(mean)
        whiten = (vecs / np.sqrt(vals)) @ vecs.T

        def features(rows: np.ndarray) -> np.ndarray:
            logs = _spd_map(np.log, _sym(whiten @ covs[rows] @ whiten), workers=self.workers)
            return sym_matrix_to_vec(logs, discard_diagonal=True).astype(np.float32)

        return features(np.asarray(train)), features(np.asarray(test))


def fc_tangent_fold(series: list[np.ndarray], train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tangent-space connectivity of one fold (see :class:`TangentConnectivity`, which caches the covariances).

    Returns
    -------
    (train features, test features)
    """
    return TangentConnectivity(series).fold(train, test)


def intensity_pca_fold(volumes_NV: np.ndarray, train: np.ndarray, test: np.ndarray, n_components: int,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the flattened voxel intensities, fitted on ``train``; returns (train, test) component scores."""
    from sklearn.decomposition import PCA

    X = np.asarray(volumes_NV, dtype=np.float32).reshape(len(volumes_NV), -1)
    k = max(1, min(n_components, len(train) - 1, X.shape[1]))
    pca = PCA(n_components=k, random_state=seed, svd_solver="randomized" if k < min(len(train), X.shape[1]) // 2 else "full")
    return pca.fit_transform(X[train]), pca.transform(X[test])


def fit_predict_cnn3d(volumes_NXYZ: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, task: str, *,
                      n_classes: int = 2, epochs: int = 20, channels: int = 8, lr: float = 1e-3, batch_size: int = 8,
                      seed: int = 0) -> np.ndarray:
    """Train :class:`~pipeline.evaluation.torch_models.SmallCNN3D` from scratch on ``train``; predict ``test``.

    Returns
    -------
    numpy.ndarray
        ``[N_test, C]`` probabilities or ``[N_test]`` predictions.
    """
    import torch

    from pipeline.evaluation.torch_models import SmallCNN3D

    torch.manual_seed(seed)
    vol = torch.from_numpy(np.asarray(volumes_NXYZ, dtype=np.float32))[:, None]
    y = np.asarray(y)
    if task == "classification":
        target = torch.from_numpy(y.astype(np.int64))
        y_mean, y_std = 0.0, 1.0
        counts = np.bincount(y[train].astype(np.int64), minlength=n_classes).astype(np.float32)
        weight = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0).astype(np.float32)
        loss_fn: torch.nn.Module = torch.nn.CrossEntropyLoss(weight=torch.from_numpy(weight))
    else:
        y_mean, y_std = float(y[train].mean()), float(y[train].std() + 1e-8)
        target = torch.from_numpy(((y - y_mean) / y_std).astype(np.float32))
        loss_fn = torch.nn.MSELoss()
    model = SmallCNN3D(n_classes if task == "classification" else 1, channels)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    tr = torch.from_numpy(np.asarray(train))
    model.train()
    for _ in range(epochs):
        perm = tr[torch.randperm(len(tr), generator=g)]
        for s in range(0, len(perm), batch_size):
            idx = perm[s:s + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            out = model(vol[idx])
            loss = loss_fn(out, target[idx]) if task == "classification" else loss_fn(out[:, 0], target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    preds = []
    with torch.no_grad():
        for s in range(0, len(test), batch_size):
            preds.append(model(vol[torch.from_numpy(np.asarray(test[s:s + batch_size]))]))
    out = torch.cat(preds)
    if task == "classification":
        return out.softmax(-1).numpy().astype(np.float64)
    return out[:, 0].numpy().astype(np.float64) * y_std + y_mean
