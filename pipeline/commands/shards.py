"""``neurocurate shards``: curated derivatives -> Zarr v3 shards + index.parquet."""

from __future__ import annotations

import argparse

HELP = "write the curated data (curation.parquet include==True) into Zarr v3 shards with a parquet index"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="derivatives root with curation/curation.parquet")
    parser.add_argument("--shards-dir", help="where the stores go (default OUTPUT_DIR/shards)")
    parser.add_argument("--config", help="TOML config; the [shards] section applies")
    parser.add_argument("--atlas", help="only this atlas's ROI series (default: every atlas)")
    parser.add_argument("--samples-per-shard", type=int, help="fMRI runs per shard file (default 256)")
    parser.add_argument("--workers", type=int, help="shards written in parallel with dask (default 1)")


def run(args: argparse.Namespace) -> int:
    """Build or extend the shards; exit 0 on success."""
    from pathlib import Path

    from pipeline.core.config import load_config, write_resolved_config
    from pipeline.store.shards import build_shards

    overrides = {
        k: v
        for k, v in {
            "atlas": args.atlas,
            "samples_per_shard": args.samples_per_shard,
            "workers": args.workers,
            "shards_dir": args.shards_dir,
        }.items()
        if v is not None
    }
    cfg = load_config(args.config, {"shards": overrides})
    shards_dir = Path(cfg.shards.shards_dir or Path(args.output_dir) / "shards")
    index = build_shards(args.output_dir, shards_dir, cfg.shards)
    write_resolved_config(cfg, shards_dir)
    counts = index.groupby(["store", "split"]).size().unstack(fill_value=0)
    print(f"{len(index)} samples in {index['store'].nunique()} store(s) -> {shards_dir / 'index.parquet'}")
    print(counts.to_string())
    return 0
