"""Group gradients of the ABIDE dev data: runtime and the sensory-vs-association check.

Imports the ABIDE PCP CC200 series of the chosen sites into a temporary
derivatives folder with ``neurocurate import-timeseries`` logic, builds the
group gradients with the default settings (normalized angle, top 10 %,
alpha 0.5, 30 components) and prints, for g1..g3, the AUC separating
sensory ROIs (Vis + SomMot) from Default ROIs and the AUC separating Vis from
SomMot. CC200 ROIs get the majority Schaefer-400 7-network label of their
voxels (CC200 resampled onto the bundled 2 mm atlas, nearest neighbour).
An AUC far from 0.5 on either side means separation (the sign of a gradient
is a convention).

Usage: ``python benchmarks/gradients.py [--sites NYU UM_1]`` (``--sites all`` for all six).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from pipeline.roi.atlas import majority_networks
from pipeline.core.config import GradientsConfig, ImportConfig
from pipeline.stages.gradients import build_group_gradients
from pipeline.stages.import_series import import_timeseries

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEUROCURATE_SHARED_DATA", REPO.parent / "shared" / "data"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", nargs="+", default=["NYU", "UM_1"], help="ABIDE SITE_IDs, or 'all' (default NYU UM_1)")
    args = parser.parse_args(argv)
    abide = SHARED / "abide"
    sites = None if args.sites == ["all"] else args.sites
    nets = np.array(majority_networks(abide / "CC200_ROIs_3mm.nii.gz", list(range(1, 201))), dtype=object)
    sensory, default = np.isin(nets, ["Vis", "SomMot"]), nets == "Default"
    vis, som = nets == "Vis", nets == "SomMot"
    print(f"CC200 ROIs: {int(sensory.sum())} sensory (Vis {int(vis.sum())}, SomMot {int(som.sum())}), {int(default.sum())} Default")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = import_timeseries([abide / "rois_cc200"], tmp, ImportConfig(),
                                   phenotypes=abide / "Phenotypic_V1_0b_preprocessed1.csv", sites=sites)
        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = build_group_gradients(tmp, "CC200", GradientsConfig())
        t_grad = time.perf_counter() - t0
    print(f"sites={args.sites} runs={len(report.runs)} subjects={len(res.subjects)} import={t_import:.1f}s gradients={t_grad:.1f}s")
    g = res.gradients_RK
    both, vs = sensory | default, vis | som
    for k in range(3):
        auc_sd = roc_auc_score(sensory[both], g[both, k])
        auc_vs = roc_auc_score(vis[vs], g[vs, k])
        print(
            f"g{k + 1}: variance explained {res.variance_explained[k]:.3f}; AUC sensory-vs-Default {auc_sd:.3f} "
            f"(means {g[sensory, k].mean():+.3f} / {g[default, k].mean():+.3f}); AUC Vis-vs-SomMot {auc_vs:.3f}"
        )


if __name__ == "__main__":
    main()
