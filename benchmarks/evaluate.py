"""Evaluation figures on the ABIDE dev sites: pretrained MoE-JEPA vs FC baselines vs a random encoder.

Steps (work folder reused between runs):

1. import the ABIDE PCP CC200 series of NYU + UM_1 (``import_timeseries``),
   an all-included curation table, group gradients and shards;
2. a short CPU pretraining run (the ``tiny`` config with batch 8 and
   ``--steps`` steps) on the train split;
3. ``evaluate_run`` with leave-site-out splits for ``diagnosis`` and ``sex``
   (default :class:`~pipeline.core.config.EvaluateConfig`: 1000 bootstrap
   resamples, 1000 permutations);

and prints, per target, every model's AUROC with its 95 % interval, its ratio
to the FC (Fisher-z Pearson) baseline in the same run, the paired permutation
p-value against the best baseline, and the spread of the embeddings (a
collapsed encoder gives nearly identical embeddings for every subject).

Usage: ``python benchmarks/evaluate.py [--workdir /tmp/nc_eval_bench] [--steps 300] [--targets diagnosis sex]``
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEUROCURATE_SHARED_DATA", REPO.parent / "shared" / "data"))
SITES = ["NYU", "UM_1"]


def prepare_shards(work: Path) -> Path:
    """ABIDE dev sites -> OUTPUT_DIR with curation table, gradients and shards (skipped when present)."""
    from pipeline.core.config import GradientsConfig, ImportConfig, ShardsConfig
    from pipeline.stages.gradients import build_group_gradients
    from pipeline.stages.shards import build_shards
    from pipeline.stages.import_series import import_timeseries

    out = work / "abide_out"
    if (out / "shards" / "index.parquet").is_file():
        return out / "shards"
    abide = SHARED / "abide"
    import_timeseries([abide / "rois_cc200"], out, ImportConfig(), phenotypes=abide / "Phenotypic_V1_0b_preprocessed1.csv", sites=SITES)
    from pipeline.cli import main

    if main(["qc", str(out)]) != 0:  # the curation table comes from the QC stage, as for a user
        raise SystemExit(f"neurocurate qc {out} failed")
    build_group_gradients(out, "CC200", GradientsConfig())
    build_shards(out, cfg=ShardsConfig())
    return out / "shards"


def pretrain(shards: Path, run_dir: Path, steps: int) -> float:
    """Tiny MoE-JEPA run on the train split; returns seconds (0 when the run already exists)."""
    from pipeline.core.config import LoaderConfig
    from pipeline.store.loader import ShardDataset
    from pipeline.pretrain.checkpoint import latest_checkpoint
    from pipeline.pretrain.config import load_pretrain_config
    from pipeline.pretrain.train import Trainer

    if (ckpt := latest_checkpoint(run_dir)) is not None and ckpt.name == f"step-{steps:08d}.pt":
        return 0.0
    cfg = load_pretrain_config("tiny")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=8, max_steps=steps, warmup_steps=20,
                                                             checkpoint_every=100, log_every=20))
    ds = ShardDataset(shards, LoaderConfig(window_length=cfg.fmri.num_frames, seed=cfg.train.seed), split="train", training=True)
    t0 = time.perf_counter()
    Trainer(cfg, ds, run_dir, progress=False).fit()
    return time.perf_counter() - t0


def spread(pooled_ND: np.ndarray) -> float:
    """Mean over dimensions of the across-sample std, relative to the mean embedding norm (0 = collapsed)."""
    return float(pooled_ND.std(0).mean() / (np.linalg.norm(pooled_ND.mean(0)) / np.sqrt(pooled_ND.shape[1]) + 1e-12))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/nc_eval_bench")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--targets", nargs="+", default=["diagnosis", "sex"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from pipeline.core.config import EvaluateConfig
    from pipeline.evaluation.embed import embed_samples, load_encoder, read_shard_samples
    from pipeline.evaluation.run import evaluate_run

    work = Path(args.workdir)
    t0 = time.perf_counter()
    shards = prepare_shards(work)
    print(f"data: ABIDE CC200 {'+'.join(SITES)} shards in {time.perf_counter() - t0:.0f} s -> {shards}")
    run_dir = work / f"run_tiny_{args.steps}"
    secs = pretrain(shards, run_dir, args.steps)
    last = pd.read_json(run_dir / "metrics.jsonl", lines=True).iloc[[0, -1]]
    print(f"pretraining: tiny MoE-JEPA, batch 8, {args.steps} steps, {secs:.0f} s; loss {last['loss'].iloc[0]:.4f} -> {last['loss'].iloc[1]:.4f}")
    cfg = EvaluateConfig()
    atlas = SHARED / "abide" / "CC200_ROIs_3mm.nii.gz"
    for target in args.targets:
        t1 = time.perf_counter()
        res = evaluate_run(run_dir, shards, target, split="site", cfg=cfg, out_dir=work / f"eval_{target}_site", atlas_image=atlas)
        fc = res["models"]["fc_pearson"]["metrics"]["auroc"]["value"]
        print(f"\n== {target}: leave-site-out ({', '.join(f['name'] for f in res['folds'])}), {res['n_tested']} subjects, "
              f"classes {res['classes']} (positive {res['classes'][-1]}), {time.perf_counter() - t1:.0f} s")
        print(f"{'model':24s} {'AUROC [95% CI]':24s} {'vs FC':>6s} {'bal.acc':>8s} {'p vs best baseline':>19s}")
        for name, info in res["models"].items():
            m = info["metrics"]
            auc = m["auroc"]
            p = res["comparisons"].get(name, {}).get("p_value")
            print(f"{name:24s} {auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]   {auc['value'] / fc:6.2f} "
                  f"{m['balanced_accuracy']['value']:8.3f} {'' if p is None else f'{p:.4f}':>19s}")
        print(f"best baseline: {res['best_baseline']}")
    samples = read_shard_samples(shards, None)
    pre = embed_samples(load_encoder(run_dir), samples, gradients_Rk=samples.gradients_Rk, cache_dir=run_dir / "embeddings")
    rnd = embed_samples(load_encoder(run_dir, random_init=True), samples, gradients_Rk=samples.gradients_Rk,
                        cache_dir=run_dir / "embeddings")
    print(f"\nembedding spread (across-subject std / mean level): pretrained {spread(pre.pooled_ND):.4f}, random {spread(rnd.pooled_ND):.4f}")
    for i, c in enumerate(pre.routing):
        share = c.sum(0) / c.sum()
        print(f"MoE layer {i}: expert shares {np.round(share, 3).tolist()}")


if __name__ == "__main__":
    main()
