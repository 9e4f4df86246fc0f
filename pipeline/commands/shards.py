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
    """Build or extend the shards (:func:`pipeline.stages.shards.run_shards`); exit 0 on success."""
    from pipeline.commands import given
    from pipeline.core.config import load_config
    from pipeline.stages.shards import run_shards

    overrides = given(atlas=args.atlas, samples_per_shard=args.samples_per_shard, workers=args.workers,
                      shards_dir=args.shards_dir)
    run_shards(args.output_dir, load_config(args.config, {"shards": overrides}))
    return 0
