"""HTML QC reports: one per subject (fMRIPrep-style mosaics) and one for the group.

Templates are jinja2 files in ``qc/templates`` rendered with autoescaping on,
so every string that comes from the dataset (labels, paths, crash logs,
reviewer comments) is escaped. Data handed to JavaScript goes through
:func:`_script_json`, which escapes ``<``, ``>`` and ``&`` so it cannot close
the ``<script>`` element. Images are embedded as base64 PNG and plots as
inline SVG, so a report is a single file that works offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.atomic import atomic_write_text
from pipeline.core.config import QCConfig
from pipeline.core.layout import CURATION_NON_METRIC_COLUMNS

__all__ = [
    "bias_mosaic",
    "carpet_plot",
    "environment",
    "map_mosaic",
    "metric_strip_svg",
    "outline_mosaic",
    "read_report_key",
    "registration_mosaic",
    "render_group_report",
    "render_subject_report",
    "template_source",
    "write_html",
]

_NON_METRIC = CURATION_NON_METRIC_COLUMNS


def environment() -> Any:
    """The jinja2 environment over ``qc/templates`` with HTML autoescaping."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=jinja2.select_autoescape(["html"], default=True),
        undefined=jinja2.StrictUndefined,
    )


def template_source(name: str) -> str:
    """The text of the report template ``name`` (e.g. ``"subject.html"``)."""
    return (Path(__file__).parent / "templates" / name).read_text(encoding="utf-8")


#: The element a subject report carries its content key in (first lines of ``<head>``).
_KEY_META = '<meta name="neurocurate-report-key" content="'


def read_report_key(path: str | Path, head_bytes: int = 4096) -> str | None:
    """The content key written into a subject report by :func:`render_subject_report`, or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(head_bytes).decode("utf-8", errors="replace")
    except OSError:
        return None
    start = head.find(_KEY_META)
    if start < 0:
        return None
    start += len(_KEY_META)
    end = head.find('"', start)
    return head[start:end] if end > start else None


def _script_json(obj: Any) -> Any:
    """JSON safe to place inside ``<script type="application/json">``."""
    from markupsafe import Markup

    text = json.dumps(obj, allow_nan=False, default=str)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


# ----------------------------------------------------------------------------- figures


def _png(rgb_HW3: np.ndarray) -> str:
    """Encode an RGB uint8 image as a PNG data URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb_HW3, mode="RGB").save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _slices(shape: Sequence[int], axis: int, n: int) -> list[int]:
    size = shape[axis]
    return [int(round(x)) for x in np.linspace(0.2 * size, 0.8 * size, n)]


def _take(vol: np.ndarray, axis: int, i: int) -> np.ndarray:
    # Rotate so that anterior/superior point up in the LAS/RAS 2 mm grid.
    index: tuple[Any, ...] = (slice(None),) * axis + (i,)
    return np.rot90(vol[index])


def _window(vol: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    vals = vol[mask.astype(bool)] if mask is not None and mask.any() else vol[vol != 0]
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _colour(values: np.ndarray, window: tuple[float, float], cmap: str) -> np.ndarray:
    """Map values to RGB float 0..1 through a matplotlib colour map (no figure needed)."""
    from matplotlib import colormaps

    lo, hi = window
    norm = np.clip((np.nan_to_num(values) - lo) / (hi - lo), 0, 1)
    return colormaps[cmap](norm)[..., :3]


def _edges(mask2d: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    m = mask2d > 0.5
    return m & ~ndimage.binary_erosion(m)


def _tile(panels: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Panels (H x W x 3) side by side on a black background, bottom-aligned."""
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.zeros((h, w, 3), dtype=np.float64)
    x = 0
    for p in panels:
        out[h - p.shape[0] :, x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def _mosaic(
    base: np.ndarray,
    contours: Sequence[tuple[np.ndarray, tuple[float, float, float]]] = (),
    overlay: np.ndarray | None = None,
    cmap: str = "gray",
    n: int = 7,
    window: tuple[float, float] | None = None,
    zoom: int = 2,
) -> str:
    """Axial and coronal rows of ``n`` slices, with mask outlines and an optional colour overlay.

    Drawn with numpy and encoded with Pillow: matplotlib figures cost seconds
    each, which a 500-subject group report cannot afford.
    """
    window = window or _window(base)
    base_window = _window(base) if overlay is not None else window
    rows = []
    for axis in (2, 1):
        panels = []
        for idx in _slices(base.shape, axis, n):
            sl = _take(base, axis, idx)
            if overlay is None:
                rgb = _colour(sl, window, cmap)
            else:
                rgb = _colour(sl, base_window, "gray")
                ov = _take(overlay, axis, idx)
                col = _colour(ov, window, cmap)
                on = (ov != 0)[..., None]
                rgb = np.where(on, 0.4 * rgb + 0.6 * col, rgb)
            for vol, colour in contours:
                rgb[_edges(_take(vol.astype(np.float32), axis, idx))] = colour
            panels.append(rgb)
        rows.append(_tile(panels))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]
    img = np.concatenate(rows, axis=0)
    img = np.repeat(np.repeat(img, zoom, axis=0), zoom, axis=1)
    return _png((np.clip(img, 0, 1) * 255).astype(np.uint8))


RED, YELLOW, CYAN = (1.0, 0.1, 0.1), (1.0, 0.9, 0.0), (0.0, 0.9, 0.9)


def registration_mosaic(image: np.ndarray, template: np.ndarray, brain: np.ndarray) -> str:
    """Subject in MNI space with the template's brain outline (red) and WM edge (yellow)."""
    inside = template[brain.astype(bool)]
    wm_level = np.percentile(inside, 75) if inside.size else 0
    wm = (template > wm_level) & brain.astype(bool)  # the scalp is as bright as WM in the T1 template
    return _mosaic(image, contours=[(brain, RED), (wm, YELLOW)], window=_window(image, brain))


def outline_mosaic(image: np.ndarray, mask: np.ndarray) -> str:
    """Skull-strip outline: the brain mask's edge (cyan) over the head image."""
    return _mosaic(image, contours=[(mask, CYAN)], window=_window(image, mask))


def bias_mosaic(image: np.ndarray, bias: np.ndarray) -> str:
    """The N4 bias field (viridis, 1st-99th percentile) over the corrected image."""
    inside = bias[(bias != 0) & np.isfinite(bias)]
    window = (float(np.percentile(inside, 1)), float(np.percentile(inside, 99))) if inside.size else (0.0, 1.0)
    if window[1] <= window[0]:
        window = (window[0], window[0] + 1e-6)
    return _mosaic(image, overlay=np.where(np.isfinite(bias), bias, 0), cmap="viridis", window=window)


def map_mosaic(volume: np.ndarray, mask: np.ndarray | None, cmap: str) -> str:
    """A scalar map (BOLD mean, tSNR) as a mosaic, windowed on the 1st-99.5th percentile in ``mask``."""
    return _mosaic(volume, cmap=cmap, window=_window(volume, mask))


def carpet_plot(bold_XYZT: np.ndarray, mask: np.ndarray, fd: np.ndarray | None = None, max_rows: int = 600) -> str:
    """Carpet plot (Power 2017): z-scored brain voxels (rows) x volumes (columns), FD bars above.

    The FD strip spans 0..1 mm; the red line marks 0.2 mm.
    """
    vox_VT = bold_XYZT[mask.astype(bool)].astype(np.float64)
    if vox_VT.shape[0] > max_rows:
        vox_VT = vox_VT[np.linspace(0, vox_VT.shape[0] - 1, max_rows).astype(int)]
    n_t = bold_XYZT.shape[-1]
    sd = vox_VT.std(axis=1, keepdims=True)
    z_VT = np.divide(vox_VT - vox_VT.mean(axis=1, keepdims=True), sd, out=np.zeros_like(vox_VT), where=sd > 0)
    col = max(1, 800 // max(n_t, 1))
    carpet = np.repeat(_colour(z_VT, (-2.0, 2.0), "gray"), col, axis=1)
    strip_h = 60
    strip = np.zeros((strip_h, carpet.shape[1], 3))
    if fd is not None and len(fd) == n_t:
        heights = (np.clip(np.nan_to_num(np.asarray(fd, dtype=float)), 0, 1.0) * (strip_h - 1)).astype(int)
        for t, h in enumerate(heights):
            if h > 0:
                strip[strip_h - h :, t * col : (t + 1) * col] = (1.0, 0.6, 0.0)
        strip[strip_h - 1 - int(0.2 * (strip_h - 1)), :] = RED
    img = np.concatenate([strip, np.zeros((4, carpet.shape[1], 3)), carpet], axis=0)
    return _png((np.clip(img, 0, 1) * 255).astype(np.uint8))


# ----------------------------------------------------------------------------- group plots


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def metric_strip_svg(df: pd.DataFrame, metric: str, thresholds: Mapping[str, Sequence[tuple[str, float]]]) -> str:
    """Inline SVG strip plot of one metric: a lane per modality, a point per scan, thresholds as red lines.

    Parameters
    ----------
    df : DataFrame
        The curation table.
    metric : str
        Column to plot.
    thresholds : mapping
        Modality -> ``[(kind, value), ...]`` for this metric.

    Returns
    -------
    str
        SVG markup; every dataset string in it is escaped.
    """
    width, lane_h, left, right = 640, 44, 80, 20
    values = pd.to_numeric(df[metric], errors="coerce").astype(float)
    finite = values[np.isfinite(values)]
    modalities = [m for m in dict.fromkeys(df["modality"]) if np.isfinite(values[df["modality"] == m]).any()]
    if finite.empty or not modalities:
        return ""
    thr_values = [v for m in modalities for _, v in thresholds.get(m, ())]
    lo = float(min(finite.min(), *thr_values)) if thr_values else float(finite.min())
    hi = float(max(finite.max(), *thr_values)) if thr_values else float(finite.max())
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    pad = 0.04 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (width - left - right)

    height = lane_h * len(modalities) + 24
    esc = html.escape
    parts = [
        f'<svg class="strip" data-metric="{esc(metric)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" role="img">',
        f"<title>{esc(metric)}</title>",
    ]
    for lane, mod in enumerate(modalities):
        y0 = lane * lane_h
        parts.append(f'<text x="4" y="{y0 + lane_h / 2 + 4:.1f}" class="lane">{esc(str(mod))}</text>')
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y0 + lane_h:.1f}" y2="{y0 + lane_h:.1f}" class="grid"/>')
        for kind, thr in thresholds.get(mod, ()):
            x = x_of(thr)
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0 + 2}" y2="{y0 + lane_h - 2}" class="thr">'
                f"<title>{esc(kind)} {esc(metric)} = {thr:g}</title></line>"
            )
        sub = df[(df["modality"] == mod) & np.isfinite(values)]
        for i, (idx, row) in enumerate(sub.iterrows()):
            # Golden-ratio jitter spreads points evenly and reproducibly.
            jitter = ((i * 0.618034) % 1.0) * (lane_h - 16) + 8
            cls = "pass" if bool(row["include"]) else "fail"
            label = f"sub-{row['subject']} {row['path']}: {metric} = {_fmt(float(values[idx]))}"
            parts.append(
                f'<a href="sub-{esc(str(row["subject"]))}.html"><circle cx="{x_of(float(values[idx])):.1f}" '
                f'cy="{y0 + jitter:.1f}" r="3" class="{cls}"><title>{esc(label)}</title></circle></a>'
            )
    y_axis = lane_h * len(modalities) + 16
    for t in np.linspace(lo + pad, hi - pad, 5):
        parts.append(f'<text x="{x_of(t):.1f}" y="{y_axis}" class="tick">{t:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _metric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in _NON_METRIC and pd.api.types.is_numeric_dtype(df[c])]


def _thresholds_by_metric(df: pd.DataFrame, qc: QCConfig) -> dict[str, dict[str, list[tuple[str, float]]]]:
    from qc.curation import rules_for

    out: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for mod in dict.fromkeys(df["modality"]):
        try:
            rules = rules_for(str(mod), qc)
        except ValueError:
            continue
        for metric, kind, thr in rules:
            out.setdefault(metric, {}).setdefault(str(mod), []).append((kind, thr))
    return out


def render_group_report(df: pd.DataFrame, qc: QCConfig, subjects_with_errors: Sequence[str] = ()) -> str:
    """HTML of the group report: metric distributions, the sortable table and review controls."""
    metrics = _metric_columns(df)
    thr = _thresholds_by_metric(df, qc)
    plots = [(m, metric_strip_svg(df, m, thr.get(m, {}))) for m in metrics]
    from markupsafe import Markup

    rows = []
    for _, r in df.iterrows():
        rows.append(
            {
                "subject": str(r["subject"]),
                "entities": {k: str(r[k]) for k in ("session", "task", "acq", "run") if str(r[k])},
                "modality": str(r["modality"]),
                "site": str(r["site"]),
                "path": str(r["path"]),
                "metrics": [(m, r[m], _fmt(float(r[m])) if pd.notna(r[m]) else "n/a") for m in metrics],
                "qc_pass": bool(r["qc_pass"]),
                "failed_rules": str(r["failed_rules"]),
                "layer": str(r.get("qc_layer", "")),
                "reason": str(r.get("qc_reason", "")),
                "outliers": str(r["outlier_metrics"]),
                "override": str(r["override"]),
                "comment": str(r["override_comment"]),
                "include": bool(r["include"]),
            }
        )
    summary = {
        "scans": len(df),
        "subjects": int(df["subject"].nunique()) if len(df) else 0,
        "passed": int(df["qc_pass"].sum()) if len(df) else 0,
        "included": int(df["include"].sum()) if len(df) else 0,
        "overridden": int((df["override"] != "").sum()) if len(df) else 0,
    }
    initial = {r["path"]: {"decision": r["override"], "comment": r["comment"]} for r in rows if r["override"]}
    return environment().get_template("group.html").render(
        summary=summary,
        metrics=metrics,
        plots=[(m, Markup(svg)) for m, svg in plots if svg],
        rows=rows,
        errors=list(subjects_with_errors),
        ratings_json=_script_json(initial),
    )


def render_subject_report(
    subject: str,
    scans: Sequence[Mapping[str, Any]],
    errors: Sequence[tuple[str, str]] = (),
    report_key: str = "",
) -> str:
    """HTML of one subject's report.

    Parameters
    ----------
    subject : str
        Label without ``sub-``.
    scans : sequence of mapping
        Each with ``title``, ``path``, ``modality``, ``rules`` (list of
        ``(metric, kind, threshold, value, ok)``), ``metrics`` (list of
        ``(name, formatted value)``), ``qc_pass``, ``include``, ``override``,
        ``comment`` and ``figures`` (list of ``(caption, data URI)``).
    errors : sequence of (str, str)
        ``(file name, text)`` of crash files.
    report_key : str
        Content key of what the report shows (hex), written into its ``<head>`` so that a later run can
        tell an unchanged report without drawing it again (:func:`read_report_key`).
    """
    return environment().get_template("subject.html").render(subject=subject, scans=list(scans), errors=list(errors),
                                                             report_key=report_key)


def write_html(path: str | Path, text: str) -> Path:
    """Write a report atomically."""
    return atomic_write_text(path, text)
