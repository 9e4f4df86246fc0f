"""``neurocurate demo``: every stage on the small real dataset bundled in the package (:mod:`pipeline.stages.demo`)."""

from __future__ import annotations

import argparse

HELP = "run every stage on the small real sample dataset bundled in the package (about 5 minutes on 2 cores)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder for the derivatives, shards, run and reports")
    parser.add_argument("--nprocs", type=int, default=2, help="parallel processes for preprocessing (default 2)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be recomputed and why, run nothing")


def run(args: argparse.Namespace) -> int:
    """Run all stages on the bundled data; print the report paths."""
    from pathlib import Path

    from pipeline.runner import StageRunner, format_summary
    from pipeline.stages.demo import DEMO_NOTE, demo_inputs

    bids_dir, cfg = demo_inputs(nprocs=args.nprocs)
    runner = StageRunner(bids_dir, Path(args.output_dir).resolve(), cfg)
    if args.dry_run:
        print(runner.format_plan(runner.plan()))
        return 0
    result = runner.run()
    print(format_summary(result))
    print(DEMO_NOTE)
    return result.exit_code
