"""Readouts of a frozen fMRI encoder: what a linear probe sees of each subject.

Shape legend: N samples, R ROIs, D embedding width, F features.

Connectivity baselines keep the ROI-to-ROI coupling of a run; a mean over all
tokens throws it away (every ROI's token is averaged into one vector). The
readouts here keep it:

* ``mean``: the mean of all tokens, ``[N, D]``;
* ``roi``: the per-ROI embeddings (tokens averaged over time), flattened,
  ``[N, R * D]``;
* ``roi_similarity``: the similarity structure of those per-ROI embeddings,
  the upper triangle of the Fisher-z cosine similarities between ROIs after
  removing the subject's mean ROI embedding, ``[N, R (R - 1) / 2]`` (the
  encoder's analogue of a connectivity matrix);
* ``token_similarity``: the same structure computed from the ROIs'
  time-resolved token sequences (centred over time), which keeps the
  coupling that averaging over time removes
  (:attr:`pipeline.evaluation.embed.Embeddings.token_similarity_NF`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["READOUTS", "readout_features", "roi_similarity_features"]

READOUTS = ("mean", "roi", "roi_similarity", "token_similarity")


def roi_similarity_features(tokens_NRD: np.ndarray) -> np.ndarray:
    """Upper-triangle Fisher-z cosine similarities between the ROI embeddings of each sample.

    Each sample's embeddings are centred on their mean over ROIs first (the
    component shared by all ROIs would make every similarity close to 1).
    ROIs whose centred embedding is zero get similarity 0.
    """
    tokens_NRD = np.asarray(tokens_NRD, dtype=np.float64)
    N, R, _ = tokens_NRD.shape
    iu = np.triu_indices(R, k=1)
    out = np.empty((N, iu[0].size), dtype=np.float32)
    for i, t_RD in enumerate(tokens_NRD):
        z = t_RD - t_RD.mean(0)
        norm_R = np.linalg.norm(z, axis=1)
        z = np.where(norm_R[:, None] > 1e-12, z / np.maximum(norm_R, 1e-12)[:, None], 0.0)
        out[i] = np.arctanh(np.clip((z @ z.T)[iu], -0.999999, 0.999999))
    return out


def readout_features(name: str, pooled_ND: np.ndarray, tokens_NRD: np.ndarray,
                     token_similarity_NF: np.ndarray | None = None) -> np.ndarray:
    """Features of readout ``name`` (one of :data:`READOUTS`)."""
    if name == "mean":
        return np.asarray(pooled_ND)
    if name == "roi":
        return np.asarray(tokens_NRD).reshape(len(tokens_NRD), -1)
    if name == "roi_similarity":
        return roi_similarity_features(tokens_NRD)
    if name == "token_similarity":
        if token_similarity_NF is None:
            raise ValueError("token_similarity needs the embeddings' token_similarity_NF (fMRI encoders)")
        return np.asarray(token_similarity_NF)
    raise ValueError(f"unknown readout {name!r}; known: {list(READOUTS)}")
