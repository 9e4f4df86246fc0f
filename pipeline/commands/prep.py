"""``neurocurate prep``: the BIDS-App (participant and group levels)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "preprocess a BIDS dataset (participant level) or build the curation table and QC reports (group level)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bids_dir", help="root of the BIDS dataset")
    parser.add_argument("output_dir", help="BIDS-Derivatives output folder")
    parser.add_argument("analysis_level", choices=["participant", "group"])
    parser.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                        help="subjects to process (with or without 'sub-'); default all")
    parser.add_argument("--participant-index", type=int, metavar="I",
                        help="process only the I-th subject (0-based, sorted sub-* folders of BIDS_DIR): one SLURM "
                             "array task per subject with --participant-index $SLURM_ARRAY_TASK_ID")
    parser.add_argument("--work-dir", "-w", help="nipype work folder and BIDS index cache (default OUTPUT_DIR/.work)")
    add_execution_arguments(parser)
    parser.add_argument("--config", help="TOML config file; flags override it")
    parser.add_argument("--skull-strip", choices=["deepbet", "template"], help="skull-strip method for T1w")
    add_registration_argument(parser)
    parser.add_argument("--output-resolution", type=int, nargs="+", choices=[1, 2], metavar="MM",
                        help="MNI output resolutions in mm (default 2)")
    parser.add_argument("--template-dir", help="folder with MNI152NLin6Asym templates (needed for 1 mm)")
    parser.add_argument("--stop-on-first-crash", action="store_true", default=None)


def add_registration_argument(parser: argparse.ArgumentParser) -> None:
    """``--registration affine|syn`` of ``prep`` and ``run`` (``[anat] registration``)."""
    parser.add_argument("--registration", choices=["affine", "syn"],
                        help="normalisation to MNI: 12-dof affine (default) or affine + ANTs SyN (nonlinear; "
                             "the warp is written as ..._xfm.h5 and used for BOLD too)")


def add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``prep`` and ``run``: where and how widely the work runs, and the progress bar."""
    parser.add_argument("--nprocs", "--nthreads", type=int, metavar="N",
                        help="parallel nipype processes (default: every available core, respecting CPU affinity, "
                             "cgroup quota and SLURM_CPUS_ON_NODE)")
    parser.add_argument("--omp-nthreads", type=int, metavar="N",
                        help="threads per process for ANTs and torch (default min(nprocs - 1, 8), as fMRIPrep)")
    parser.add_argument("--mem-gb", type=float, metavar="GB",
                        help="memory budget of MultiProc: nodes wait until their estimate fits "
                             "(default 90%% of the available memory)")
    parser.add_argument("--plugin", help="nipype plugin: MultiProc, Linear, SLURM, SGE, PBS, ... (default MultiProc)")
    parser.add_argument("--plugin-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="nipype plugin argument (repeatable), parsed to int/float/bool when it reads as one: "
                             "max_jobs=10, sbatch_args='-p short -t 60'")
    parser.add_argument("--dask-scheduler", metavar="ADDRESS",
                        help="dask.distributed scheduler (tcp://host:8786) for shards, group QC metrics and the "
                             "group connectome (default [dask] of the config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only on a terminal)")


def execution_overrides(args: argparse.Namespace) -> dict[str, dict]:
    """``[execution]`` and ``[dask]`` overrides from :func:`add_execution_arguments`'s options; applies --no-progress."""
    from pipeline.core.errors import NeurocurateError
    from pipeline.core.parallel import parse_plugin_value

    if args.no_progress:
        from pipeline.core.progress import set_progress

        set_progress(False)
    execution = {
        "nprocs": args.nprocs,
        "omp_nthreads": args.omp_nthreads,
        "mem_gb": args.mem_gb,
        "plugin": args.plugin,
    }
    for name in ("nprocs", "omp_nthreads", "mem_gb"):
        if execution[name] is not None and execution[name] < 1:
            raise NeurocurateError(f"--{name.replace('_', '-')} must be at least 1, got {execution[name]}")
    if args.plugin_arg:
        pairs = {}
        for item in args.plugin_arg:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise NeurocurateError(f"--plugin-arg {item!r}: expected KEY=VALUE")
            pairs[key.strip()] = parse_plugin_value(value)
        execution["plugin_args"] = pairs
    out: dict[str, dict] = {}
    execution = {k: v for k, v in execution.items() if v is not None}
    if execution:
        out["execution"] = execution
    if args.dask_scheduler:
        out["dask"] = {"scheduler": args.dask_scheduler}
    return out


def _overrides(args: argparse.Namespace) -> dict[str, dict]:
    out = execution_overrides(args)
    if args.stop_on_first_crash is not None:
        out.setdefault("execution", {})["stop_on_first_crash"] = args.stop_on_first_crash
    anat = {
        "skull_strip": args.skull_strip,
        "output_resolutions": args.output_resolution,
        "registration": args.registration,
    }
    # Absolute: nipype runs nodes in their own working folders, where a relative path means nothing.
    templates = {"template_dir": str(Path(args.template_dir).resolve()) if args.template_dir else None}
    for section, values in (("anat", anat), ("templates", templates)):
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

        labels = args.participant_label
        if args.participant_index is not None:
            labels = [participant_at(args.bids_dir, args.participant_index, args.participant_label)]
        return run_prep(args.bids_dir, args.output_dir, cfg, work_dir=args.work_dir, participant_labels=labels)
    from pipeline.stages.qc import run_qc

    return run_qc(args.output_dir, cfg, bids_dir=args.bids_dir)


def participant_at(bids_dir: str, index: int, labels: list[str] | None = None) -> str:
    """The ``index``-th (0-based) subject label of ``labels`` or of the sorted ``sub-*`` folders of ``bids_dir``."""
    from pathlib import Path

    from pipeline.core.errors import InputError

    if labels:
        subjects = [label.removeprefix("sub-") for label in labels]
    else:
        subjects = sorted(p.name.removeprefix("sub-") for p in Path(bids_dir).glob("sub-*") if p.is_dir())
    if not 0 <= index < len(subjects):
        raise InputError(bids_dir, f"--participant-index {index} is out of range: {len(subjects)} subject(s), "
                                   f"valid indices 0..{len(subjects) - 1}")
    return subjects[index]
