"""End-to-end fine-tuning of a pretrained fMRI encoder, the third evaluation mode.

Shape legend: B samples, R ROIs, T frames, L tokens, D width, O outputs.

Beside the frozen readouts (linear probes, attentive probe), the whole
encoder is trained with a linear head on the training rows of each outer
fold: a mean over the tokens, LayerNorm and a linear layer; AdamW with
``lr`` for the encoder and ``10 * lr`` for the head, a fixed number of
epochs (no test-set early stopping), a random ``fmri.num_frames`` window of
every training run per epoch (the run's own collator crops and z-scores it).
Test runs are predicted from the mean of the head's outputs over the same
evenly spread windows the frozen embeddings use.
"""

from __future__ import annotations

import copy

import numpy as np

__all__ = ["fit_predict_finetune"]


def fit_predict_finetune(enc, samples, gradients_Rk: np.ndarray | None, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                         task: str, *, n_classes: int = 2, epochs: int = 3, lr: float = 1e-4, weight_decay: float = 0.05,
                         batch_size: int = 16, max_windows: int = 8, seed: int = 0) -> np.ndarray:
    """Fine-tune a copy of ``enc.encoder`` on ``train`` and predict ``test``.

    Parameters
    ----------
    enc : LoadedEncoder
        Pretrained fMRI encoder (:func:`pipeline.evaluation.embed.load_encoder`); it is copied, never changed.
    samples : ShardSamples
        The evaluated runs (``[R, T]`` series, unnormalised).
    gradients_Rk : array, optional
        ROI coordinates the run was trained with.

    Returns
    -------
    numpy.ndarray
        ``[N_test, C]`` probabilities or ``[N_test]`` predictions.
    """
    import torch
    from torch import nn

    from pipeline.evaluation.embed import _subject_meta, _tasks, _windows
    from pipeline.pretrain.masks import FMRICollator

    if enc.cfg.model.modality != "fmri":
        raise ValueError("fine-tuning is implemented for fMRI encoders")
    torch.manual_seed(seed)
    cfg = enc.cfg
    encoder = copy.deepcopy(enc.encoder)
    for p in encoder.parameters():
        p.requires_grad_(True)
    D = cfg.model.dim
    out_dim = n_classes if task == "classification" else 1
    head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, out_dim))
    opt = torch.optim.AdamW([{"params": encoder.parameters(), "lr": lr}, {"params": head.parameters(), "lr": 10 * lr}],
                            weight_decay=weight_decay)
    collator = FMRICollator(cfg.fmri, cfg.moe, seed)
    subjects = samples.index["subject"].astype(str).tolist()
    tasks = _tasks(samples)
    grads = {"gradients": torch.from_numpy(np.asarray(gradients_Rk, dtype=np.float32))} if gradients_Rk is not None else {}
    y = np.asarray(y)
    if task == "classification":
        counts = np.bincount(y[train].astype(np.int64), minlength=n_classes).astype(np.float32)
        weight = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0).astype(np.float32)
        loss_fn: nn.Module = nn.CrossEntropyLoss(weight=torch.from_numpy(weight))
        target = torch.from_numpy(y.astype(np.int64))
        y_mean, y_std = 0.0, 1.0
    else:
        y_mean, y_std = float(y[train].mean()), float(y[train].std() + 1e-8)
        target = torch.from_numpy(((y - y_mean) / y_std).astype(np.float32))
        loss_fn = nn.MSELoss()

    def forward(rows: list[int], xs: list[np.ndarray], step: int) -> torch.Tensor:
        batch = collator([{"x": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), "subject": subjects[i],
                           "task": tasks[i], **grads} for i, x in zip(rows, xs)], step)
        meta = _subject_meta([subjects[i] for i in rows], [tasks[i] for i in rows], cfg)
        h_BLD = encoder({"x": batch["x"], "gradients": batch["gradients"]}, None, meta)
        return head(h_BLD.mean(1))

    g = np.random.default_rng(seed)
    encoder.train()
    head.train()
    step = 0
    for _ in range(epochs):
        _return_freed_memory()
        order = g.permutation(np.asarray(train))
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size].tolist()
            out = forward(rows, [samples.data[i] for i in rows], step)  # the collator crops a random window
            t = target[rows]
            loss = loss_fn(out, t) if task == "classification" else loss_fn(out[:, 0], t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    encoder.eval()
    head.eval()
    T = cfg.fmri.num_frames
    preds = []
    with torch.no_grad():
        for i in np.asarray(test).tolist():
            wins = _windows(samples.data[i], T, max_windows)
            outs = [forward([i] * len(wins[s:s + batch_size]), wins[s:s + batch_size], 0) for s in range(0, len(wins), batch_size)]
            preds.append(torch.cat(outs).mean(0))
    out = torch.stack(preds)
    del encoder, head, opt
    _return_freed_memory()
    if task == "classification":
        return out.softmax(-1).numpy().astype(np.float64)
    return out[:, 0].numpy().astype(np.float64) * y_std + y_mean


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Training steps on CPU free their activations into a fragmented heap that glibc keeps: without this,
    an evaluation with fine-tuning of 523 ABIDE runs held 12 GB after two fine-tunings (6 folds x 3 epochs
    each) and was killed for memory next to a second one; trimmed, a process returns to its size before
    each fold (benchmarks/README.md, issue 14).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim
        pass
