"""``neurocurate prep``: the BIDS-App (participant and group levels)."""

from __future__ import annotations

import argparse

HELP = "preprocess a BIDS dataset (participant level) or build the curation table and QC reports (group level)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bids_dir", help="root of the BIDS dataset")
    parser.add_argument("output_dir", help="BIDS-Derivatives output folder")
    parser.add_argument("analysis_level", choices=["participant", "group"])
    parser.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                        help="subjects to process (with or without 'sub-'); default all")
    parser.add_argument("--work-dir", "-w", help="nipype work folder and BIDS index cache (default OUTPUT_DIR/.work)")
    parser.add_argument("--nprocs", "--nthreads", type=int, help="parallel processes for nipype (default 1)")
    parser.add_argument("--omp-nthreads", type=int, help="threads per process for ANTs and torch")
    parser.add_argument("--plugin", help="nipype plugin: MultiProc, Linear, SLURM, SGE, PBS, ... (default MultiProc)")
    parser.add_argument("--plugin-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra nipype plugin argument (repeatable), e.g. sbatch_args='-p short'")
    parser.add_argument("--config", help="TOML config file; flags override it")
    parser.add_argument("--skull-strip", choices=["deepbet", "template"], help="skull-strip method for T1w")
    parser.add_argument("--output-resolution", type=int, nargs="+", choices=[1, 2], metavar="MM",
                        help="MNI output resolutions in mm (default 2)")
    parser.add_argument("--template-dir", help="folder with MNI152NLin6Asym templates (needed for 1 mm)")
    parser.add_argument("--stop-on-first-crash", action="store_true", default=None)


def _overrides(args: argparse.Namespace) -> dict[str, dict]:
    execution = {
        "nprocs": args.nprocs,
        "omp_nthreads": args.omp_nthreads,
        "plugin": args.plugin,
        "stop_on_first_crash": args.stop_on_first_crash,
    }
    if args.plugin_arg:
        from pipeline.core.errors import NeurocurateError

        pairs = {}
        for item in args.plugin_arg:
            key, sep, value = item.partition("=")
            if not sep:
                raise NeurocurateError(f"--plugin-arg {item!r}: expected KEY=VALUE")
            pairs[key] = value
        execution["plugin_args"] = pairs
    anat = {
        "skull_strip": args.skull_strip,
        "output_resolutions": args.output_resolution,
    }
    templates = {"template_dir": args.template_dir}
    out = {}
    for section, values in (("execution", execution), ("anat", anat), ("templates", templates)):
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            out[section] = values
    return out


def run(args: argparse.Namespace) -> int:
    """Participant level: :func:`pipeline.stages.prep.run_prep`; group level: :func:`pipeline.stages.qc.run_qc`."""
    from pipeline.core.config import load_config

    cfg = load_config(args.config, _overrides(args))
    if args.analysis_level == "participant":
        from pipeline.stages.prep import run_prep

        return run_prep(args.bids_dir, args.output_dir, cfg, work_dir=args.work_dir,
                        participant_labels=args.participant_label)
    from pipeline.stages.qc import run_qc

    return run_qc(args.output_dir, cfg, bids_dir=args.bids_dir)
