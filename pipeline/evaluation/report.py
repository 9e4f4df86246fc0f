"""Evaluation report: ``results.json``, ``predictions.tsv`` and a self-contained ``report.html``.

The HTML holds a table of the model against the baselines with confidence
intervals, the permutation tests, ROC curves (binary targets) or
predicted-vs-true plots (regression), per-fold and few-shot results, and the
routing maps (share of each brain network's tokens per expert, per MoE
layer). Figures are inline PNGs; every string that comes from the data
(target, class, site, store and path names) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.layout import EVALUATION_REPORT
from pipeline.core.atomic import atomic_dir

__all__ = ["to_json", "write_report"]


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars and arrays -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def to_json(result: dict[str, Any]) -> str:
    """Strict JSON text of a result dict (no NaN tokens)."""
    return json.dumps(_clean(result), indent=2, allow_nan=False)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _curves(result: dict[str, Any], table: pd.DataFrame) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    models = list(result["models"])
    if result["task"] == "classification":
        classes = result["classes"]
        if len(classes) != 2:
            return "<p>ROC curves are drawn for binary targets only.</p>"
        positive = classes[1]
        y = (table["y_true"].astype(str) == positive).to_numpy()
        fig, ax = plt.subplots(figsize=(5, 5))
        for name in models:
            p = table[f"{name}__p_{positive}"].to_numpy()
            fpr, tpr, _ = roc_curve(y, p)
            auc = result["models"][name]["metrics"]["auroc"]["value"]
            ax.plot(fpr, tpr, label=f"{name} (AUROC {_fmt(auc)})", linestyle="--" if result["models"][name]["baseline"] else "-")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC, positive class {positive}")
        ax.legend(fontsize=7, loc="lower right")
        return _png(fig)
    fig, ax = plt.subplots(figsize=(5, 5))
    y = table["y_true"].to_numpy(dtype=float)
    for name in models:
        ax.scatter(y, table[f"{name}__pred"].to_numpy(), s=6, alpha=0.6, label=name)
    lo, hi = float(np.min(y)), float(np.max(y))
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.5)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.legend(fontsize=7)
    return _png(fig)


def _metrics_table(result: dict[str, Any]) -> str:
    names = list(next(iter(result["models"].values()))["metrics"])
    head = "".join(f"<th>{_e(m)}</th>" for m in names)
    rows = []
    for model, info in result["models"].items():
        cells = "".join(
            f"<td>{_fmt(v['value'])} <small>[{_fmt(v['low'])}, {_fmt(v['high'])}]</small></td>" for v in info["metrics"].values()
        )
        kind = "baseline" if info["baseline"] else "<b>model</b>"
        best = " (best baseline)" if model == result.get("best_baseline") else ""
        rows.append(f"<tr><td>{_e(model)}{best}</td><td>{kind}</td>{cells}<td>{_e(info['description'])}</td></tr>")
    level = int(round(100 * result["config"]["confidence"]))
    return (f"<table><tr><th>model</th><th>role</th>{head}<th>what</th></tr>{''.join(rows)}</table>"
            f"<p>Values: pooled out-of-fold estimate [{level}% subject-level bootstrap interval, "
            f"{result['config']['bootstrap_resamples']} resamples].</p>")


def _comparisons(result: dict[str, Any]) -> str:
    if not result["comparisons"]:
        return "<p>No baseline to compare with.</p>"
    rows = "".join(
        f"<tr><td>{_e(m)}</td><td>{_e(c['against'])}</td><td>{_e(c['metric'])}</td><td>{_fmt(c['difference'])}</td>"
        f"<td>{_fmt(c['p_value'], 4)}</td><td>{c['n_permutations']}</td></tr>"
        for m, c in result["comparisons"].items()
    )
    return ("<table><tr><th>model</th><th>vs best baseline</th><th>metric</th><th>difference (+ = model better)</th>"
            f"<th>p (two-sided, paired permutation)</th><th>permutations</th></tr>{rows}</table>")


def _per_fold(result: dict[str, Any]) -> str:
    metric = result["primary_metric"]
    folds = [f["name"] for f in result["folds"]]
    head = "".join(f"<th>{_e(f)}</th>" for f in folds)
    sizes = "".join(f"<td>{f['n_train']} / {f['n_test']}</td>" for f in result["folds"])
    rows = "".join(
        f"<tr><td>{_e(m)}</td>" + "".join(f"<td>{_fmt(info['per_fold'][f][metric])}</td>" for f in folds)
        + f"<td>{_fmt(info.get('fold_mean', {}).get(metric, float('nan')))}</td></tr>"
        for m, info in result["models"].items()
    )
    note = ("<p>Mean of folds: each fold's model scored on its own test set. Pooled figures (above) rank all folds' "
            "test rows together; when folds train on data of different class balance (leave-site-out), the pooled "
            "figure mixes their offsets and can read below chance for a model that learned only its prior.</p>")
    return (f"<table><tr><th>{_e(metric)} per fold</th>{head}<th>mean of folds</th></tr><tr><td>train / test</td>"
            f"{sizes}<td></td></tr>{rows}</table>{note}")


def _few_shot(result: dict[str, Any]) -> str:
    fs = result.get("few_shot")
    if not fs:
        return ""
    metric = result["primary_metric"]
    rows = "".join(
        f"<tr><td>{_e(m)}</td><td>{'baseline' if info['baseline'] else 'model'}</td>"
        f"<td>{_fmt(info['metrics'][metric]['mean'])} ± {_fmt(info['metrics'][metric]['std'])}</td>"
        f"<td>{_fmt(info['metrics'][metric]['min'])} – {_fmt(info['metrics'][metric]['max'])}</td></tr>"
        for m, info in fs["models"].items()
    )
    return (f"<h2>Few-shot: K = {fs['k']} subjects per class, {fs['resamples']} resamples</h2>"
            f"<table><tr><th>model</th><th>role</th><th>{_e(metric)} mean ± sd</th><th>range</th></tr>{rows}</table>")


def _routing(result: dict[str, Any]) -> str:
    layers = result.get("routing") or []
    if not layers:
        return "<p>The encoder has no MoE layers.</p>"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = []
    for i, layer in enumerate(layers):
        frac = np.asarray(layer["fractions"], dtype=float)
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * frac.shape[1], 0.8 + 0.35 * frac.shape[0]))
        im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(frac.max()), 1e-9))
        ax.set_xticks(range(frac.shape[1]))
        ax.set_xticklabels([f"e{e}" for e in range(frac.shape[1])])
        ax.set_yticks(range(frac.shape[0]))
        ax.set_yticklabels(layer["networks"])
        ax.set_title(f"MoE layer {i}: share of each network's assignments per expert", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
        rows = "".join(
            f"<tr><td>{_e(net)}</td><td>{int(n)}</td>" + "".join(f"<td>{_fmt(v, 3)}</td>" for v in row) + "</tr>"
            for net, n, row in zip(layer["networks"], layer["assignments"], layer["fractions"])
        )
        head = "".join(f"<th>e{e}</th>" for e in range(frac.shape[1]))
        parts.append(f"<h3>MoE layer {i}</h3>{_png(fig)}<table><tr><th>network</th><th>assignments</th>{head}</tr>{rows}</table>")
    return "".join(parts)


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}small{color:#555}"""


def render_html(result: dict[str, Any], table: pd.DataFrame) -> str:
    """The report page for a result dict and its prediction table."""
    classes = result.get("classes") or []
    cls = f"classes {_e(', '.join(classes))} (positive: {_e(classes[-1])})" if len(classes) == 2 else \
        (f"classes {_e(', '.join(classes))}" if classes else "regression")
    info = (f"<p>Run <code>{_e(result['run_dir'])}</code> (checkpoint step {result['step']}); shards "
            f"<code>{_e(result['shards_dir'])}</code>, store <code>{_e(result['store'])}</code>; target "
            f"<b>{_e(result['target'])}</b> ({cls}); split <b>{_e(result['split'])}</b>; "
            f"{result['n_tested']} tested samples of {result['n_subjects_tested']} subjects; gradients from "
            f"{_e(result['gradients'])}.</p>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>neurocurate evaluation: {_e(result['target'])}</title>"
            f"<style>{_STYLE}</style></head><body><h1>Evaluation: {_e(result['target'])} ({_e(result['split'])} split)</h1>"
            f"{info}<h2>Model vs baselines</h2>{_metrics_table(result)}<h2>Paired permutation test against the best baseline</h2>"
            f"{_comparisons(result)}<h2>Curves</h2>{_curves(result, table)}<h2>Folds</h2>{_per_fold(result)}{_few_shot(result)}"
            f"<h2>Routing maps (target encoder, all evaluated samples)</h2>{_routing(result)}</body></html>")


def write_report(out_dir: str | Path, result: dict[str, Any], table: pd.DataFrame) -> Path:
    """Write ``results.json``, ``predictions.tsv`` and ``report.html`` into ``out_dir`` as a whole (atomic)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "results.json").write_text(to_json(result))
        table.to_csv(tmp / "predictions.tsv", sep="\t", index=False, na_rep="n/a")
        (tmp / EVALUATION_REPORT).write_text(render_html(result, table))
    return out_dir
