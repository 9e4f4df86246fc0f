"""``neurocurate evaluate``: frozen-embedding probes of a pretraining run against baselines."""

from __future__ import annotations

import argparse

HELP = "evaluate a pretraining run: frozen-embedding probes vs FC / random-encoder / structural baselines, with CIs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="pretraining run folder (neurocurate pretrain --out)")
    parser.add_argument("--shards", metavar="SHARDS_DIR",
                        help="shards to evaluate on (folder with index.parquet; default: the shards the run was trained "
                             "on, RUN_DIR/training_data.json); a store with another ROI set is refused")
    parser.add_argument("--target", required=True, help="label column: diagnosis, sex, age or any participants.tsv column")
    parser.add_argument("--split", choices=("site", "subject", "kfold"), default="kfold",
                        help="leave-site-out, the index's held-out test subjects, or subject-grouped k-fold (default)")
    parser.add_argument("--few-shot", type=int, metavar="K", help="train on K subjects per class (5 resamples per fold)")
    parser.add_argument("--store", help="store to evaluate (default: the only fMRI store)")
    parser.add_argument("--reference-shards", metavar="DIR",
                        help="shards the run was trained on: their gradient coordinates position the ROIs "
                             "(default: the gradients the run recorded, RUN_DIR/training_gradients.npy)")
    parser.add_argument("--atlas-image", metavar="NIFTI", help="labels image of the atlas, to name networks of ROIs without Yeo names (e.g. CC200)")
    parser.add_argument("--checkpoint", help="checkpoint file (default: the newest in RUN_DIR/checkpoints)")
    parser.add_argument("--out", metavar="DIR", help="report folder (default RUN_DIR/evaluation/<target>_<split>[_k<K>])")
    parser.add_argument("--config", help="TOML config; the [evaluate] section applies")
    parser.add_argument("--bootstrap", type=int, help="bootstrap resamples (default 1000)")
    parser.add_argument("--permutations", type=int, help="permutations of the paired test (default 1000)")
    parser.add_argument("--seed", type=int, help="seed of folds, probes and resampling (default 0)")


def run(args: argparse.Namespace) -> int:
    """Evaluate (:func:`pipeline.stages.evaluate.run_evaluate`) and print the headline table; exit 0."""
    from pipeline.commands import given
    from pipeline.core.config import load_config
    from pipeline.stages.evaluate import run_evaluate

    overrides = given(bootstrap_resamples=args.bootstrap, permutations=args.permutations, seed=args.seed)
    run_evaluate(args.run_dir, args.shards, args.target, load_config(args.config, {"evaluate": overrides}),
                 split=args.split, few_shot=args.few_shot, out_dir=args.out, store=args.store,
                 reference_shards=args.reference_shards, atlas_image=args.atlas_image, checkpoint=args.checkpoint)
    return 0
