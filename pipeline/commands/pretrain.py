"""``neurocurate pretrain``: streaming MoE-JEPA pretraining on Zarr shards."""

from __future__ import annotations

import argparse

HELP = "pretrain a Mixture-of-Experts JEPA (Brain-JEPA on fMRI stores, Neuro-JEPA on the anat store) from shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("shards_dir", metavar="SHARDS_DIR", help="folder with index.parquet (neurocurate shards)")
    parser.add_argument("--config", default="tiny", help="named config (tiny, small, base) or a TOML file (default tiny)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder: metrics.jsonl, checkpoints/, resolved config")
    parser.add_argument("--store", help="store to train on (default: the only fMRI store, or 'anat' for model.modality=anat)")
    parser.add_argument("--split", default="train", help="index split to train on (default train; 'all' for every split)")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (default train.max_steps)")
    parser.add_argument("--device", help="torch device (default: this rank's GPU, else cpu)")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if RUN_DIR holds checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Train (:func:`pipeline.stages.pretrain.run_pretrain`); exit 0 when ``max_steps`` is reached."""
    from pipeline.stages.pretrain import run_pretrain

    run_pretrain(args.shards_dir, args.out, config=args.config, store=args.store, split=args.split,
                 max_steps=args.max_steps, device=args.device, resume=not args.no_resume,
                 progress=not args.no_progress)
    return 0
