"""``neurocurate gradients``: diffusion-map gradients of the group connectome of curated ROI series."""

from __future__ import annotations

import argparse

HELP = "embed the group functional connectome of the curated ROI series with diffusion maps (gradients/atlas-<name>_gradients.tsv)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("output_dir", help="derivatives root (OUTPUT_DIR) holding the ROI series")
    parser.add_argument("--config", help="TOML config; the [gradients] section applies")
    parser.add_argument("--atlas", help="atlas name of the series (default: [gradients].atlas, else [parcellation].atlas)")
    parser.add_argument("--n-components", type=int, help="number of gradients (default 30)")
    parser.add_argument("--sparsity", type=float, help="fraction of each row's weakest connections removed (default 0.9)")
    parser.add_argument("--alpha", type=float, help="diffusion-map anisotropy (default 0.5)")
    parser.add_argument("--reference", help="gradients TSV (roi, g1..gk) to align to")
    parser.add_argument("--alignment", choices=["procrustes", "sign"], help="how to align to --reference (default procrustes)")


def run(args: argparse.Namespace) -> int:
    """Build and write the group gradients."""
    from pipeline.roi.atlas import atlas_from_config
    from pipeline.core.config import load_config
    from pipeline.roi.gradients import build_group_gradients

    overrides = {
        k: v
        for k, v in {
            "atlas": args.atlas,
            "n_components": args.n_components,
            "sparsity": args.sparsity,
            "alpha": args.alpha,
            "reference": args.reference,
            "alignment": args.alignment,
        }.items()
        if v is not None
    }
    cfg = load_config(args.config, {"gradients": overrides})
    # Without an explicit name, the series are those of the parcellation atlas.
    atlas_name = cfg.gradients.atlas or atlas_from_config(cfg.parcellation).name
    result = build_group_gradients(args.output_dir, atlas_name, cfg.gradients)
    var = ", ".join(f"{v:.3f}" for v in result.variance_explained[:3])
    print(f"{result.tsv}: {len(result.roi_names)} ROIs x {result.gradients_RK.shape[1]} gradients from {len(result.subjects)} subject(s); variance explained g1-g3: {var}")
    return 0
