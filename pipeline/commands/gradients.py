"""``neurocurate gradients``: diffusion-map gradients of the group connectome of curated ROI series."""

from __future__ import annotations

import argparse

HELP = "embed the group functional connectome of the curated ROI series with diffusion maps (gradients/atlas-<name>_gradients.tsv)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("output_dir", help="derivatives root (OUTPUT_DIR) holding the ROI series")
    parser.add_argument("--config", help="TOML config; the [gradients] section applies")
    parser.add_argument("--atlas", help="atlas name of the series (default: [gradients].atlas, else the only atlas with curated series, else [parcellation].atlas)")
    parser.add_argument("--n-components", type=int, help="number of gradients (default 30)")
    parser.add_argument("--sparsity", type=float, help="fraction of each row's weakest connections removed (default 0.9)")
    parser.add_argument("--alpha", type=float, help="diffusion-map anisotropy (default 0.5)")
    parser.add_argument("--reference", help="gradients TSV (roi, g1..gk) to align to")
    parser.add_argument("--alignment", choices=["procrustes", "sign"], help="how to align to --reference (default procrustes)")


def run(args: argparse.Namespace) -> int:
    """Build and write the group gradients (:func:`pipeline.stages.gradients.run_gradients`)."""
    from pipeline.commands import given
    from pipeline.core.config import load_config
    from pipeline.stages.gradients import run_gradients

    overrides = given(atlas=args.atlas, n_components=args.n_components, sparsity=args.sparsity, alpha=args.alpha,
                      reference=args.reference, alignment=args.alignment)
    run_gradients(args.output_dir, load_config(args.config, {"gradients": overrides}))
    return 0
