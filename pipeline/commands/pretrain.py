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


def _init_distributed():
    """Join the torchrun process group when WORLD_SIZE > 1; returns the device to use."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl")
        return torch.device("cuda", local)
    torch.distributed.init_process_group("gloo")
    return torch.device("cpu")


def run(args: argparse.Namespace) -> int:
    """Train; exit 0 when ``max_steps`` is reached."""
    from pathlib import Path

    import torch

    from pipeline.core.config import LoaderConfig
    from pipeline.core.errors import InputError
    from pipeline.store.loader import ShardDataset
    from pipeline.pretrain.config import load_pretrain_config
    from pipeline.pretrain.train import Trainer

    cfg = load_pretrain_config(args.config)
    shards_dir = Path(args.shards_dir)
    if not (shards_dir / "index.parquet").is_file():
        raise InputError(shards_dir, "no index.parquet here; build shards with `neurocurate shards` first")
    device = _init_distributed()
    try:
        fmri = cfg.model.modality == "fmri"
        loader_cfg = LoaderConfig(window_length=cfg.fmri.num_frames if fmri else 0, seed=cfg.train.seed)
        store = args.store or (None if fmri else "anat")
        split = None if args.split == "all" else args.split
        try:
            dataset = ShardDataset(shards_dir, loader_cfg, store=store, split=split, training=True)
        except ValueError as exc:
            raise InputError(shards_dir, str(exc)) from None
        if dataset.kind != cfg.model.modality:
            raise InputError(shards_dir, f"store {dataset.store!r} holds {dataset.kind} data but the config trains model.modality={cfg.model.modality!r}")
        if len(dataset.index) == 0:
            raise InputError(shards_dir, f"store {dataset.store!r} has no samples in split {args.split!r}")
        trainer = Trainer(
            cfg,
            dataset,
            args.out,
            device=device or args.device,
            resume=not args.no_resume,
            progress=not args.no_progress,
        )
        history = trainer.fit(args.max_steps)
        if trainer.rank == 0 and history:
            print(f"step {trainer.step}: loss {history[-1]['loss']:.4f}; metrics in {Path(args.out) / 'metrics.jsonl'}")
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
