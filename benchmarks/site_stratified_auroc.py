"""Pooled vs within-site AUROC of a leave-site-out evaluation (issue 14).

``neurocurate evaluate --split site`` scores every held-out subject with the
model of its fold and computes AUROC over all of them pooled. Each fold's
model is trained on different sites, whose class balance differs (ABIDE sex:
0 % female at TRINITY and USM, 24 % at UM_1), so the folds' scores sit on
different offsets; pooled, those offsets alone can push a model without signal
below 0.5. This script reads an evaluation's ``predictions.tsv`` and prints,
per model, the pooled AUROC beside two figures free of that effect: the mean
of the per-site AUROCs (sites with both classes) and the AUROC of scores
ranked within their site.

Usage::

    python benchmarks/site_stratified_auroc.py EVAL_DIR/predictions.tsv [--positive F]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.evaluation.metrics import _binary_auroc  # noqa: E402


def site_figures(pred: pd.DataFrame, positive: str) -> pd.DataFrame:
    """Per model (``<model>__p_<positive>`` columns): pooled, per-site mean and within-site-ranked AUROC."""
    pos = pred["y_true"].astype(str).to_numpy() == positive
    rows = []
    for col in [c for c in pred.columns if c.endswith(f"__p_{positive}")]:
        score = pred[col].to_numpy(dtype=float)
        ok = np.isfinite(score)
        per_site = {}
        for site in sorted(pred.loc[ok, "site"].unique()):
            m = ok & (pred["site"].to_numpy() == site)
            if 0 < pos[m].sum() < m.sum():
                per_site[site] = _binary_auroc(pos[m], score[m])
        ranked = pred.loc[ok, col].groupby(pred.loc[ok, "site"]).rank(pct=True).to_numpy()
        rows.append({"model": col.removesuffix(f"__p_{positive}"),
                     "pooled": _binary_auroc(pos[ok], score[ok]),
                     "per_site_mean": float(np.mean(list(per_site.values()))) if per_site else float("nan"),
                     "site_ranked": _binary_auroc(pos[ok], ranked),
                     "sites": len(per_site)})
    return pd.DataFrame(rows).set_index("model")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions", type=Path)
    ap.add_argument("--positive", default="", help="class label counted as positive (default: the rarer)")
    args = ap.parse_args(argv)
    pred = pd.read_csv(args.predictions, sep="\t", dtype={"y_true": str})
    positive = args.positive or str(pred["y_true"].value_counts().idxmin())
    balance = pred.groupby("site")["y_true"].apply(lambda s: float((s == positive).mean()))
    print(f"{args.predictions}: {len(pred)} subjects, positive class {positive!r}; share per site: "
          + ", ".join(f"{k} {v:.2f}" for k, v in balance.items()))
    table = site_figures(pred, positive)
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
