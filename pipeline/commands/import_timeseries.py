"""``neurocurate import-timeseries``: precomputed ROI series (ABIDE PCP .1D, TSV, CSV, NPY) -> derivatives."""

from __future__ import annotations

import argparse

HELP = "import precomputed ROI time series (ABIDE PCP .1D + phenotypic CSV, or TSV/CSV/NPY) as derivatives"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("inputs", nargs="+", help="series files or folders (e.g. abide/rois_cc200)")
    parser.add_argument("-o", "--output-dir", required=True, help="derivatives root (OUTPUT_DIR)")
    parser.add_argument("--phenotypes", help="ABIDE PCP phenotypic CSV (FILE_ID, SUB_ID, SITE_ID, DX_GROUP, SEX, AGE_AT_SCAN)")
    parser.add_argument("--config", help="TOML config; the [timeseries_import] section applies")
    parser.add_argument("--atlas-name", help="atlas entity of the outputs (default CC200)")
    parser.add_argument("--task", help="task entity of the outputs (default rest)")
    parser.add_argument("--tr", type=float, help="RepetitionTime (s) for every file, overriding the per-site table")
    parser.add_argument("--min-volumes", type=int, help="report runs shorter than this (default 100)")
    parser.add_argument("--sites", nargs="+", metavar="SITE", help="only these SITE_IDs (e.g. NYU UM_1)")
    parser.add_argument("--participant-label", nargs="+", metavar="LABEL", help="only these subjects (with or without sub-)")
    parser.add_argument("--limit", type=int, help="import at most N files (after the other filters, sorted by file name)")


def run(args: argparse.Namespace) -> int:
    """Import the files (:func:`pipeline.stages.import_series.run_import`); exit 0, 3 when some failed, 2 when all did."""
    from pipeline.commands import given
    from pipeline.core.config import load_config
    from pipeline.core.errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL
    from pipeline.stages.import_series import run_import

    overrides = given(atlas_name=args.atlas_name, task=args.task, repetition_time=args.tr, min_volumes=args.min_volumes)
    report = run_import(args.inputs, args.output_dir, load_config(args.config, {"timeseries_import": overrides}),
                        phenotypes=args.phenotypes, sites=args.sites, participant_labels=args.participant_label,
                        limit=args.limit)
    if not report.runs and report.errors:
        return EXIT_ERROR
    return EXIT_OK if report.ok else EXIT_PARTIAL
