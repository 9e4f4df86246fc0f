"""Stage ``gradients``: diffusion-map gradients of the group connectome of the curated ROI series.

Entry point: :func:`run_gradients`. The maths lives in :mod:`pipeline.roi.gradients`; this module finds the
curated series of OUTPUT_DIR, picks the atlas and writes ``gradients/atlas-<name>_gradients.{tsv,json}``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_write_text
from pipeline.core.config import Config, DaskConfig, GradientsConfig
from pipeline.core.console import USER_LOG
from pipeline.core.errors import InputError, NeurocurateError
from pipeline.core.faults import crash_point
from pipeline.core.layout import OutputLayout
from pipeline.roi.gradients import (
    affinity_matrix,
    align_gradients,
    average_fisher_z,
    diffusion_map,
    read_gradients,
    run_fisher_z,
)

__all__ = ["GradientResult", "build_group_gradients", "curated_atlases", "find_curated_series", "resolve_atlas",
           "run_gradients"]

LOG = logging.getLogger(__name__)
_ATLAS_TS_RE = re.compile(r"_atlas-([A-Za-z0-9]+)_timeseries\.tsv$")


def curated_atlases(output_dir: str | Path) -> list[str]:
    """Atlas names of the ROI series in OUTPUT_DIR: of the included rows of the curation table when there is
    one, else of every ``*_atlas-<name>_timeseries.tsv`` file."""
    output_dir = Path(output_dir)
    table_path = OutputLayout(output_dir).curation_table
    if table_path.is_file():
        import pandas as pd

        try:
            table = pd.read_parquet(table_path, columns=["path", "include"])
        except Exception as exc:  # pyarrow raises several error types
            raise InputError(table_path, f"cannot read curation table ({exc})") from None
        paths = table.loc[table["include"].astype(bool), "path"].astype(str)
    else:
        paths = [p.name for p in output_dir.rglob("*_timeseries.tsv") if not p.name.startswith(".")]
    return sorted({m.group(1) for p in paths if (m := _ATLAS_TS_RE.search(p))})


def resolve_atlas(output_dir: str | Path, cfg: Config, atlas: str | None = None) -> str:
    """The atlas whose series the gradients use.

    ``atlas`` when given, else ``[gradients].atlas``, else the only atlas with curated series in OUTPUT_DIR;
    with several, the ``[parcellation]`` atlas if it is among them, else an error naming them.
    """
    from pipeline.roi.atlas import DEFAULT_ATLAS, atlas_from_config, bundled_atlases

    if atlas or cfg.gradients.atlas:
        return atlas or cfg.gradients.atlas
    present = curated_atlases(output_dir)
    if len(present) == 1:
        return present[0]
    chosen = cfg.parcellation.atlas or DEFAULT_ATLAS
    # A bundled atlas is named by its key; loading it (a second) only to read the name would slow every no-op rerun.
    name = chosen if chosen in bundled_atlases() else atlas_from_config(cfg.parcellation).name
    if not present or name in present:
        return name
    raise NeurocurateError(f"{output_dir}: curated ROI series of several atlases ({', '.join(present)}); "
                           "choose one with --atlas or [gradients].atlas")


def run_gradients(output_dir: str | Path, cfg: Config, *, atlas: str | None = None) -> "GradientResult":
    """Build and write the group gradients of the curated ROI series of one atlas (see :func:`resolve_atlas`)."""
    name = resolve_atlas(output_dir, cfg, atlas)
    result = build_group_gradients(output_dir, name, cfg.gradients, dask=cfg.dask)
    var = ", ".join(f"{v:.3f}" for v in result.variance_explained[:3])
    USER_LOG.info(f"{result.tsv}: {len(result.roi_names)} ROIs x {result.gradients_RK.shape[1]} gradients from "
                  f"{len(result.subjects)} subject(s); variance explained g1-g3: {var}")
    return result


def find_curated_series(output_dir: str | Path, atlas_name: str) -> list[Path]:
    """The ROI series that go into the group gradients.

    From ``curation/curation.parquet`` when it exists (rows with ``include``
    true, modality ``timeseries`` or ``bold``, whose path is an
    ``_atlas-<name>_timeseries.tsv``); otherwise every such file under
    ``output_dir``.
    """
    output_dir = Path(output_dir)
    suffix = f"_atlas-{atlas_name}_timeseries.tsv"
    table_path = OutputLayout(output_dir).curation_table
    if table_path.exists():
        import pandas as pd

        try:
            table = pd.read_parquet(table_path)
        except Exception as exc:  # pyarrow raises several error types
            raise InputError(table_path, f"cannot read curation table ({exc})") from None
        missing = {"include", "modality", "path"} - set(table.columns)
        if missing:
            raise InputError(table_path, f"curation table lacks column(s) {sorted(missing)}")
        rows = table[table["include"].astype(bool) & table["modality"].isin(["timeseries", "bold"])]
        paths = []
        for rel in rows["path"].astype(str):
            # a run curated through another atlas's series counts for this atlas's series too
            same_run = _ATLAS_TS_RE.sub(suffix, rel)
            if same_run.endswith(suffix) and (rel.endswith(suffix) or (output_dir / same_run).exists()):
                paths.append(output_dir / same_run)
        return sorted(set(paths))
    return sorted(p for p in output_dir.rglob(f"*{suffix}") if not p.name.startswith("."))


def _read_series_tsv(path: Path) -> tuple[np.ndarray, list[str]]:
    import pandas as pd

    try:
        table = pd.read_csv(path, sep="\t")
        values = table.to_numpy(dtype=np.float64)
    except FileNotFoundError:
        raise InputError(path, "ROI series file does not exist") from None
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(path, f"not a numeric ROI series TSV ({exc})") from None
    if values.ndim != 2 or values.shape[0] < 3:
        raise InputError(path, f"ROI series needs at least 3 volumes, got {values.shape[0]}")
    return values, [str(c) for c in table.columns]


@dataclass(frozen=True)
class GradientResult:
    """What :func:`build_group_gradients` wrote."""

    tsv: Path
    sidecar: Path
    roi_names: tuple[str, ...]
    gradients_RK: np.ndarray
    eigenvalues: np.ndarray
    variance_explained: np.ndarray
    subjects: tuple[str, ...]


def _run_z(path: Path) -> tuple[np.ndarray, list[str]]:
    """Fisher z connectome of one ROI series file and its ROI names (one task of the group connectome)."""
    series, cols = _read_series_tsv(path)
    return run_fisher_z(series), cols


def build_group_gradients(output_dir: str | Path, atlas_name: str, cfg: GradientsConfig = GradientsConfig(),
                          *, dask: DaskConfig | None = None, workers: int = 0) -> GradientResult:
    """Group gradients from the curated ROI series of one atlas.

    Writes ``OUTPUT_DIR/gradients/atlas-<name>_gradients.tsv`` (rows = ROIs
    in atlas order, columns ``roi, g1..gk``; ``n/a`` for ROIs without data)
    and its JSON sidecar (eigenvalues, variance explained, source subjects
    and runs, parameters).

    Raises
    ------
    NeurocurateError
        When there are no (or too few) curated series for the atlas.
    InputError
        When a series file is unreadable or has different ROIs than the others.

    The per-run connectomes are computed in parallel (:func:`pipeline.core.parallel.parallel_map`: ``workers``
    local threads, 0 = every core, or the dask cluster of ``dask``) and averaged in file order, so the result
    does not depend on where they ran.
    """
    from pipeline.core.derivatives import parse_name

    output_dir = Path(output_dir)
    files = find_curated_series(output_dir, atlas_name)
    if not files:
        raise NeurocurateError(f"{output_dir}: no curated ROI series for atlas {atlas_name!r} (*_atlas-{atlas_name}_timeseries.tsv)")
    from pipeline.core.parallel import MapError, parallel_map

    subjects = [parse_name(path)[0].get("sub", path.name) for path in files]
    n_subjects = len(set(subjects))
    if n_subjects < cfg.min_subjects:
        raise NeurocurateError(f"{output_dir}: {n_subjects} subject(s) for atlas {atlas_name!r}, need {cfg.min_subjects}")
    runs, names = [], None
    for path, result in zip(files, parallel_map(_run_z, files, workers=workers, dask=dask, catch=(InputError,),
                                                 progress="connectome", unit="run")):
        if isinstance(result, MapError):
            raise NeurocurateError(result.message)
        z, cols = result
        if names is None:
            names = cols
        elif cols != names:
            raise InputError(path, f"ROI columns differ from {files[0].name}")
        runs.append(z)
        crash_point("gradients.run_read")
    LOG.info("group connectome of atlas %s: %d run(s) from %d subject(s)", atlas_name, len(runs), n_subjects)
    conn, n_sub = average_fisher_z(runs, subjects)
    keep = np.all(n_sub > 0, axis=1)
    if keep.sum() <= cfg.n_components:
        raise NeurocurateError(f"only {int(keep.sum())} ROIs with data; need more than n_components={cfg.n_components}")
    emb = diffusion_map(
        affinity_matrix(conn[np.ix_(keep, keep)], cfg.sparsity, cfg.kernel),
        cfg.n_components,
        cfg.alpha,
        cfg.diffusion_time,
    )
    grads = np.full((len(names), cfg.n_components), np.nan)
    grads[keep] = emb.gradients_RK
    alignment = "sign-of-largest-entry"
    if cfg.reference:
        grads = _align_to_reference(grads, names, cfg)
        alignment = f"{cfg.alignment} to {cfg.reference}"

    layout = OutputLayout(output_dir)
    out_tsv = layout.gradients_tsv(atlas_name)
    header = "roi\t" + "\t".join(f"g{i + 1}" for i in range(cfg.n_components))
    lines = [header] + [
        name + "\t" + "\t".join("n/a" if not np.isfinite(v) else f"{v:.8g}" for v in row) for name, row in zip(names, grads)
    ]
    sidecar = {
        "AtlasName": atlas_name,
        "Method": "diffusion maps (Coifman & Lafon 2006; Margulies et al. 2016)",
        "Kernel": cfg.kernel,
        "Sparsity": cfg.sparsity,
        "Alpha": cfg.alpha,
        "DiffusionTime": cfg.diffusion_time,
        "NumberOfComponents": cfg.n_components,
        "Eigenvalues": emb.raw_eigenvalues.tolist(),
        "ScaledEigenvalues": emb.eigenvalues.tolist(),
        "VarianceExplained": emb.variance_explained.tolist(),
        "Order": "descending eigenvalue",
        "SignConvention": alignment,
        "DroppedROIs": [n for n, k in zip(names, keep) if not k],
        "SourceSubjects": sorted(set(subjects)),
        "NumberOfRuns": len(runs),
        "Sources": [str(p.relative_to(output_dir)) if p.is_relative_to(output_dir) else str(p) for p in files],
    }
    sidecar_path = layout.gradients_json(atlas_name)
    atomic_write_text(sidecar_path, json.dumps(sidecar, indent=2) + "\n")
    crash_point("gradients.sidecar_written")
    atomic_write_text(out_tsv, "\n".join(lines) + "\n")
    return GradientResult(out_tsv, sidecar_path, tuple(names), grads, emb.eigenvalues, emb.variance_explained, tuple(sorted(set(subjects))))


def _align_to_reference(grads: np.ndarray, names: list[str], cfg: GradientsConfig) -> np.ndarray:
    ref_names, ref_values = read_gradients(cfg.reference)
    index = {n: i for i, n in enumerate(ref_names)}
    shared = [i for i, n in enumerate(names) if n in index]
    if len(shared) <= min(grads.shape[1], ref_values.shape[1]):
        raise InputError(cfg.reference, f"shares only {len(shared)} ROI names with the atlas")
    ref = np.full((len(names), ref_values.shape[1]), np.nan)
    ref[shared] = ref_values[[index[names[i]] for i in shared]]
    try:
        return align_gradients(grads, ref, cfg.alignment)
    except ValueError as exc:
        raise InputError(cfg.reference, str(exc)) from None
