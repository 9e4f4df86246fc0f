"""``neurocurate run``: prep -> QC/curation -> gradients -> shards -> pretrain -> evaluate, incrementally.

Each stage keeps a manifest in ``OUTPUT_DIR/.manifests``; a stage runs only
when its inputs, config or software changed, and prep processes only the
subjects whose files changed. ``--dry-run`` prints that plan and runs nothing.
Exit codes: 0 complete, 3 partial (some subjects failed, the others
finished), 2 a stage failed.
"""

from __future__ import annotations

import argparse

HELP = "run every stage end to end (prep, qc, gradients, shards, pretrain, evaluate), redoing only what changed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    from pipeline.runner import STAGES

    parser.add_argument("bids_dir", metavar="BIDS_DIR", help="root of the BIDS dataset")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="derivatives, shards, model and reports")
    parser.add_argument("--config", help="TOML config file (every section; [run] picks the pretraining config and the evaluation target)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--until", choices=STAGES, metavar="STAGE", help=f"stop after this stage ({', '.join(STAGES)})")
    which.add_argument("--only", choices=STAGES, metavar="STAGE", help="run only this stage (if it is out of date)")
    parser.add_argument("--dry-run", action="store_true", help="print what will be recomputed and why; run nothing")
    parser.add_argument("--force", action="store_true", help="run the selected stages even when up to date")
    parser.add_argument("--retry-failed", action="store_true",
                        help="preprocess subjects that failed last time again even if their files did not change")
    parser.add_argument("--stop-on-first-crash", action="store_true",
                        help="stop at the first failing node (nipype) and run no later stage after a partial one")
    parser.add_argument("--work-dir", "-w", help="nipype work folder (default OUTPUT_DIR/.work)")
    from pipeline.commands.prep import add_execution_arguments, add_registration_argument

    add_execution_arguments(parser)
    add_registration_argument(parser)
    parser.add_argument("--target", help="evaluation target column (default [run].evaluate_target)")


def run(args: argparse.Namespace) -> int:
    """Plan or run the stages; return 0, 3 (partial) or 2."""
    from pipeline.commands.prep import execution_overrides
    from pipeline.core.config import load_config
    from pipeline.runner import StageRunner, format_summary, select_stages

    overrides = execution_overrides(args)
    if args.stop_on_first_crash:
        overrides.setdefault("execution", {})["stop_on_first_crash"] = True
    if args.target is not None:
        overrides["run"] = {"evaluate_target": args.target}
    if args.registration is not None:
        overrides["anat"] = {"registration": args.registration}
    cfg = load_config(args.config, overrides)
    runner = StageRunner(args.bids_dir, args.output_dir, cfg, work_dir=args.work_dir, force=args.force,
                         retry_failed=args.retry_failed)
    selected = select_stages(args.until, args.only)
    if args.dry_run:
        print(runner.format_plan(runner.plan(selected)))
        return 0
    from pipeline.core.parallel import dask_session

    with dask_session(cfg.dask):  # one dask cluster (if any) for every stage of the run
        result = runner.run(selected, stop_on_first_crash=args.stop_on_first_crash)
    print(format_summary(result))
    return result.exit_code
