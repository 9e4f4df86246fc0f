"""``neurocurate evaluate``: frozen-embedding probes of a pretraining run against baselines."""

from __future__ import annotations

import argparse

HELP = "evaluate a pretraining run: frozen-embedding probes vs FC / random-encoder / structural baselines, with CIs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="pretraining run folder (neurocurate pretrain --out)")
    parser.add_argument("--shards", required=True, metavar="SHARDS_DIR", help="shards to evaluate on (folder with index.parquet)")
    parser.add_argument("--target", required=True, help="label column: diagnosis, sex, age or any participants.tsv column")
    parser.add_argument("--split", choices=("site", "subject", "kfold"), default="kfold",
                        help="leave-site-out, the index's held-out test subjects, or subject-grouped k-fold (default)")
    parser.add_argument("--few-shot", type=int, metavar="K", help="train on K subjects per class (5 resamples per fold)")
    parser.add_argument("--store", help="store to evaluate (default: the only fMRI store)")
    parser.add_argument("--reference-shards", metavar="DIR",
                        help="shards the run was trained on: their gradient coordinates position the ROIs (default: the evaluated store's)")
    parser.add_argument("--atlas-image", metavar="NIFTI", help="labels image of the atlas, to name networks of ROIs without Yeo names (e.g. CC200)")
    parser.add_argument("--checkpoint", help="checkpoint file (default: the newest in RUN_DIR/checkpoints)")
    parser.add_argument("--out", metavar="DIR", help="report folder (default RUN_DIR/eval/<target>_<split>[_k<K>])")
    parser.add_argument("--config", help="TOML config; the [evaluate] section applies")
    parser.add_argument("--bootstrap", type=int, help="bootstrap resamples (default 1000)")
    parser.add_argument("--permutations", type=int, help="permutations of the paired test (default 1000)")
    parser.add_argument("--seed", type=int, help="seed of folds, probes and resampling (default 0)")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the headline table; exit 0."""
    from pathlib import Path

    from pipeline.core.config import load_config, write_resolved_config
    from pipeline.evaluation.run import evaluate_run

    overrides = {k: v for k, v in {"bootstrap_resamples": args.bootstrap, "permutations": args.permutations,
                                   "seed": args.seed}.items() if v is not None}
    cfg = load_config(args.config, {"evaluate": overrides})
    if args.few_shot is not None and args.few_shot < 1:
        from pipeline.core.errors import InputError

        raise InputError("--few-shot", "K must be at least 1")
    result = evaluate_run(args.run_dir, args.shards, args.target, split=args.split, few_shot=args.few_shot,
                          cfg=cfg.evaluate, out_dir=args.out, store=args.store, reference_shards=args.reference_shards,
                          atlas_image=args.atlas_image, checkpoint=args.checkpoint)
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval" / f"{args.target}_{args.split}{f'_k{args.few_shot}' if args.few_shot else ''}"
    write_resolved_config(cfg, out)
    metric = result["primary_metric"]
    print(f"{args.target} ({args.split} split, {result['n_tested']} tested samples): {metric} [{round(100 * cfg.evaluate.confidence)}% CI]")
    for name, info in result["models"].items():
        m = info["metrics"][metric]
        print(f"  {name:24s} {'baseline' if info['baseline'] else 'model   '} {m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]")
    for name, c in result["comparisons"].items():
        print(f"  {name} vs {c['against']}: difference {c['difference']:+.3f}, permutation p = {c['p_value']:.4f}")
    if "few_shot" in result:
        fs = result["few_shot"]
        print(f"few-shot K={fs['k']} ({fs['resamples']} resamples): {metric} mean ± sd")
        for name, info in fs["models"].items():
            m = info["metrics"][metric]
            print(f"  {name:24s} {m['mean']:.3f} ± {m['std']:.3f}")
    print(f"report: {out / 'report.html'}")
    return 0
