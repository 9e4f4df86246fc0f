"""Label-free diagnostics of a pretrained fMRI encoder: what its readouts keep of each subject's own connectivity.

No label is read. For each run folder given, the run's target encoder and a randomly initialised encoder of the same
architecture (the evaluation's control) embed the same samples of the shards, and the script prints:

* ``attn`` / ``ffn``: the mean per-token norm of each block's attention and feed-forward outputs, beside the norm of
  the token embedding they are added to. Attention is the only path by which one ROI's tokens see another's.
* For the two readouts with an ROI x ROI structure (``roi_similarity``: time-pooled per-ROI embeddings;
  ``token_similarity``: time-resolved token sequences), against the Fisher-z connectivity of the same series:
  ``r_abs``, the mean per-subject correlation with the subject's connectivity; ``r_ind``, the same for the
  subject's deviations from the group mean (what a probe across subjects can use); ``ident``, the share of subjects
  whose readout deviation is closest to their own connectivity deviation.

Usage::

    python benchmarks/readout_diagnostics.py SHARDS RUN_DIR [RUN_DIR ...] [--samples 160] [--windows 4]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _unit_deviations(a_NF: np.ndarray) -> np.ndarray:
    a_NF = np.asarray(a_NF, dtype=np.float64)
    a_NF = a_NF - a_NF.mean(0)
    return a_NF / np.linalg.norm(a_NF, axis=1, keepdims=True).clip(1e-12)


def connectivity_retention(feat_NF: np.ndarray, fc_NF: np.ndarray) -> dict[str, float]:
    """``r_abs``, ``r_ind`` and ``ident`` of readout features ``feat_NF`` against connectivity ``fc_NF``."""
    feat_NF = np.asarray(feat_NF, dtype=np.float64)
    r_abs = float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(feat_NF, fc_NF)]))
    c_NN = _unit_deviations(feat_NF) @ _unit_deviations(fc_NF).T
    return {"r_abs": r_abs, "r_ind": float(np.mean(np.diag(c_NN))),
            "ident": float(np.mean(c_NN.argmax(1) == np.arange(len(c_NN))))}


def block_outputs(enc, samples, gradients_Rk: np.ndarray, n: int = 8) -> tuple[float, list[tuple[float, float]]]:
    """Mean token-embedding norm and per-block (attention, feed-forward) output norms on ``n`` windows.

    Read with forward hooks on the encoder's own forward pass (the ViT's input, each block's ``attn`` and ``ffn``).
    """
    import torch

    from pipeline.pretrain.masks import FMRICollator

    cfg, e = enc.cfg, enc.encoder
    T = cfg.fmri.num_frames
    collator = FMRICollator(cfg.fmri, cfg.moe, 0)
    batch = collator([{"x": torch.from_numpy(np.ascontiguousarray(x[:, :T], dtype=np.float32)), "subject": "s",
                       "task": "rest", "gradients": torch.from_numpy(gradients_Rk)} for x in samples.data[:n]], 0)
    norm: dict[object, float] = {}

    def keep(module, out):
        norm[module] = float(out.norm(dim=-1).mean())

    handles = [e.vit.register_forward_pre_hook(lambda m, args: keep(m, args[0]))]
    for blk in e.vit.blocks:
        handles += [mod.register_forward_hook(lambda m, args, out: keep(m, out)) for mod in (blk.attn, blk.ffn)]
    try:
        with torch.no_grad():
            e({"x": batch["x"], "gradients": batch["gradients"]}, None,
              {"subject": batch["subject"], "state": batch["state"]})
    finally:
        for h in handles:
            h.remove()
    return norm[e.vit], [(norm[blk.attn], norm[blk.ffn]) for blk in e.vit.blocks]


def main(argv: list[str] | None = None) -> None:
    import torch

    from pipeline.evaluation.baselines import fc_pearson_features
    from pipeline.evaluation.embed import ShardSamples, embed_samples, load_encoder, read_shard_samples
    from pipeline.evaluation.readouts import roi_similarity_features

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--samples", type=int, default=160, help="random samples of the store (seed 0)")
    ap.add_argument("--windows", type=int, default=4, help="windows per sample (evaluate's max_windows)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    t0 = time.perf_counter()
    full = read_shard_samples(args.shards, None)
    pick = np.random.default_rng(0).permutation(len(full.data))[: args.samples]
    samples = ShardSamples(full.kind, full.store, full.roi_names, full.gradients_Rk, [full.data[i] for i in pick],
                           full.index.iloc[pick].reset_index(drop=True), f"{full.fingerprint}-{args.samples}",
                           full.atlas)
    fc_NF = fc_pearson_features([x.T for x in samples.data])
    print(f"{len(samples.data)} samples of store {samples.store}, {args.windows} windows each")
    print("| run | encoder | embed norm | attention / feed-forward output norm per block | ROI similarity r_abs / "
          "r_ind / ident | token similarity r_abs / r_ind / ident |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        for kind in ("random", "pretrained"):
            enc = load_encoder(run, random_init=kind == "random", seed=0)
            emb = embed_samples(enc, samples, gradients_Rk=samples.gradients_Rk, max_windows=args.windows, seed=0)
            embed_norm, blocks = block_outputs(enc, samples, samples.gradients_Rk)
            roi = connectivity_retention(roi_similarity_features(emb.tokens_NRD), fc_NF)
            tok = connectivity_retention(emb.token_similarity_NF, fc_NF)
            print(f"| {run} | {kind} | {embed_norm:.2f} | " + " ".join(f"{a:.2f}/{f:.2f}" for a, f in blocks)
                  + f" | {roi['r_abs']:.3f} / {roi['r_ind']:.3f} / {roi['ident']:.3f}"
                  + f" | {tok['r_abs']:.3f} / {tok['r_ind']:.3f} / {tok['ident']:.3f} |", flush=True)
    print(f"time: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
