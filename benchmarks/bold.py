"""Benchmark: the BOLD workflow's denoising presets, motion correction and a real resting run.

Prints three groups of figures (benchmarks/README.md, "BOLD workflow"):

1. Task run (``../shared/data/func/sub-02_task-oneback_run-1``, studyforrest
   visual localizer, no T1w): ``init_bold_preproc_wf`` with the default
   config (``denoise = "auto"`` -> ``task``), then every denoising preset
   applied to the same motion-corrected MNI ROI means, against a crude
   pipeline in the same run (no motion correction, no denoising). Per preset:
   visual-network mean r with the HRF-convolved events, the next network,
   Vis / every other network, the best visual ROI.
2. Motion correction: known rigid motion (<= 2 mm, <= 2 deg; a smooth and a
   spiky trace) applied (ANTs B-spline) to a motion-free series made of the
   real run's reference volume plus Gaussian noise at the run's own
   temporal noise level; mean error of the Gauss-Newton fit (default) and of
   the previous ANTs per-volume fit (same run), and seconds per 156-volume
   run with one ITK thread.
3. Resting run (``../shared/data/corpus`` sub-philipsA, T1w -> BOLD -> MNI):
   ``neurocurate prep ... participant --participant-label philipsA`` (run
   here unless ``--rest-out`` already holds its derivatives), then for the
   resting default (and every other preset, from the same ROI means)
   within- minus between-network mean correlation of the Yeo-7 networks of
   the Schaefer-400 ROIs, tSNR, FD.

Usage::

    python benchmarks/bold.py [--work DIR] [--rest-out DIR] [--skip task,moco,rest] [--moco-volumes N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Every figure is for one core: ITK (ANTs) and BLAS read these before their first use.
for _var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
BOLD = DATA / "func" / "sub-02_task-oneback_run-1_bold.nii.gz"
EVENTS = DATA / "func" / "sub-02_task-oneback_run-1_events.tsv"
CORPUS = DATA / "corpus"
YEO7 = ("Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default")


def network_of(roi: str) -> str:
    """Schaefer network, or ``Subcortex`` for the Tian ROIs."""
    from pipeline.roi.atlas import schaefer_network

    return schaefer_network(roi) or "Subcortex"


def design_figures(columns: list[str], x_TR: np.ndarray, regressor_T: np.ndarray) -> dict:
    """Per-network mean correlation with the regressor and the best visual ROI."""
    x = x_TR - x_TR.mean(axis=0)
    r = regressor_T - regressor_T.mean()
    denom = np.linalg.norm(x, axis=0) * np.linalg.norm(r)
    corr = np.divide(x.T @ r, denom, out=np.zeros(x.shape[1]), where=denom > 0)
    nets: dict[str, list[float]] = {}
    for name, c in zip(columns, corr):
        nets.setdefault(network_of(name), []).append(c)
    means = {k: float(np.mean(v)) for k, v in nets.items()}
    others = {k: v for k, v in means.items() if k != "Vis"}
    next_name = max(others, key=others.get)
    vis_idx = [i for i, n in enumerate(columns) if network_of(n) == "Vis"]
    best = vis_idx[int(np.argmax(corr[vis_idx]))]
    return {
        "vis": means["Vis"], "next_name": next_name, "next": others[next_name],
        "vis_2x": all(means["Vis"] >= 2 * v for v in others.values()),
        "best_roi": columns[best], "best_r": float(corr[best]), "n_volumes": x.shape[0],
    }


def crude_pipeline(work: Path, epi_template: Path, n_dummy: int) -> Path:
    """No motion correction, no denoising: rigid EPI-template fit, resample, ROI means."""
    import ants

    from pipeline.roi.atlas import load_atlas
    from pipeline.roi.parcellation import extract_timeseries
    from workflows.ops.bold import (
        bold_reference,
        drop_volumes,
        identity_transforms,
        register_reference,
        resample_bold,
    )

    steady = drop_volumes(BOLD, n_dummy, work / "crude_steady.nii")
    ref, _ = bold_reference(steady, 10, work / "crude_ref.nii.gz", work / "crude_mask.nii.gz")
    xfm = register_reference(ref, epi_template, work / "crude_xfm.mat", transform="Rigid")
    n = ants.image_read(str(steady)).shape[3]
    std = resample_bold(steady, identity_transforms(n, work / "crude_xfms"), xfm, epi_template, work / "crude_std.nii")
    return extract_timeseries(str(std), load_atlas(None), work / "crude_timeseries.tsv", 2.0)


def apply_preset(preset: str, raw_tsv: Path, confounds_tsv: Path, confounds_json: Path, tr: float, cfg, work: Path,
                 design_T: np.ndarray | None) -> tuple[list[str], np.ndarray, dict]:
    """Denoise raw ROI means with one preset exactly as the workflow's node does."""
    import pandas as pd

    from workflows.ops.denoise import clean_series, load_preset_confounds

    bc = cfg.bold
    raw = pd.read_csv(raw_tsv, sep="\t")
    conf, mask, info = load_preset_confounds(
        preset, confounds_tsv, confounds_json, work / f"preset_{preset}", design_T=design_T,
        task_max_design_r=bc.task_max_design_r, motion_regressors=bc.motion_regressors, high_pass=bc.high_pass,
        scrub_fd_threshold=bc.scrub_fd_threshold, scrub_dvars_threshold=bc.scrub_dvars_threshold,
        scrub_min_segment=bc.scrub_min_segment, compcor_components=bc.compcor_components)
    low_pass = bc.low_pass if preset not in ("none", "task") else 0.0
    clean = clean_series(raw.to_numpy(dtype=float), conf, mask, tr, detrend=bc.detrend, standardize=bc.standardize,
                         low_pass=low_pass)
    info["kept"] = np.arange(len(raw)) if mask is None else mask
    return list(raw.columns), clean, info


def task_figures(work: Path) -> None:
    import pandas as pd

    from pipeline.core.config import load_config
    from workflows.bold import init_bold_preproc_wf
    from workflows.ops.denoise import DENOISE_PRESETS, design_regressor

    templates = DATA / "templates"
    cfg = load_config(overrides={"templates": {"template_dir": str(templates)}})
    wf = init_bold_preproc_wf(bold_file=str(BOLD), metadata={"RepetitionTime": 2.0}, has_t1w=False,
                              output_dir=str(work / "out"), cfg=cfg)
    wf.base_dir = str(work / "wf")
    wf.config["execution"].update({"poll_sleep_duration": 0.01, "crashdump_dir": str(work / "crash")})
    t0 = time.perf_counter()
    graph = wf.run(plugin="Linear")
    runtime = time.perf_counter() - t0
    nodes = {n.name: n for n in graph.nodes()}
    n_dummy = nodes["nonsteady"].result.outputs.n_dummy
    out_ts = Path(nodes["ds_bold"].result.outputs.timeseries)
    raw_ts = Path(nodes["parcellate_denoise"].result.outputs.raw_timeseries)
    conf_tsv = Path(nodes["ds_bold"].result.outputs.confounds)
    conf_json = conf_tsv.with_suffix(".json")
    sidecar = json.loads(out_ts.with_suffix(".json").read_text())

    t1 = time.perf_counter()
    crude = crude_pipeline(work, templates / "SPM_OldNorm_EPI_2mm.nii.gz", n_dummy)
    crude_runtime = time.perf_counter() - t1

    n_vols = len(pd.read_csv(raw_ts, sep="\t"))
    design = design_regressor(EVENTS, n_vols, 2.0, n_dummy)
    print(f"== 1. task run: workflow {runtime:.1f} s (crude reference {crude_runtime:.1f} s); "
          f"non-steady-state volumes removed: {n_dummy}; preset that ran: {sidecar['DenoisingPreset']}")
    for name, node in sorted(nodes.items()):
        rt = getattr(node.result, "runtime", None)
        if rt is not None and getattr(rt, "duration", None) is not None:
            print(f"  node {name:20s} {rt.duration:6.1f} s")
    conf = pd.read_csv(conf_tsv, sep="\t", na_values="n/a")
    print(f"  mean FD {conf['framewise_displacement'].mean():.3f} mm, max FD {conf['framewise_displacement'].max():.3f} mm")
    cj = json.loads(conf_json.read_text())
    base = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "white_matter", "csf", "global_signal",
            "a_comp_cor_00", "a_comp_cor_01"]
    print("  design correlation (confounds JSON): " + ", ".join(
        f"{k} {cj[k]['DesignCorrelation']:+.2f}" for k in base if k in cj))
    print("  task preset dropped: " + json.dumps(sidecar["Denoising"].get("dropped_for_design_correlation", {})))
    rows = []
    crude_df = pd.read_csv(crude, sep="\t")
    rows.append(("crude reference", design_figures(list(crude_df.columns), crude_df.to_numpy(float), design), n_vols))
    out_df = pd.read_csv(out_ts, sep="\t")
    rows.append((f"workflow output ({sidecar['DenoisingPreset']})",
                 design_figures(list(out_df.columns), out_df.to_numpy(float), design), len(out_df)))
    for preset in DENOISE_PRESETS:
        cols, clean, info = apply_preset(preset, raw_ts, conf_tsv, conf_json, 2.0, cfg, work, design)
        rows.append((preset, design_figures(cols, clean, design[info["kept"]]), len(info["kept"])))
    print(f"  {'preset':28s} {'vols':>4s} {'Vis r':>6s} {'next network':>20s} {'Vis>=2x':>7s} {'best Vis ROI':>24s}")
    for label, f, n in rows:
        print(f"  {label:28s} {n:4d} {f['vis']:6.3f} {f['next_name']:>13s} {f['next']:6.3f} "
              f"{'yes' if f['vis_2x'] else 'no':>7s} {f['best_roi']:>17s} {f['best_r']:6.3f}")


def motion_traces(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """(n, 6) rigid parameters (mm, radians) within 2 mm / 2 deg."""
    t = np.arange(n) / n
    q = np.zeros((n, 6))
    limit = np.array([2.0, 2.0, 2.0, *np.deg2rad([2.0, 2.0, 2.0])])
    for k in range(6):
        amp, freq, phase = rng.uniform(0.3, 1.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        q[:, k] = amp * np.sin(2 * np.pi * freq * t + phase) * limit[k] * (0.5 if kind == "spiky" else 1.0)
    if kind == "spiky":
        spikes = rng.choice(n, size=max(1, n // 10), replace=False)
        q[spikes] = rng.uniform(-1, 1, (len(spikes), 6)) * limit
    return np.clip(q, -limit, limit)


def moco_figures(work: Path, n_volumes: int) -> None:
    import ants
    import nibabel as nib

    from workflows.ops.bold import (
        bold_reference,
        drop_volumes,
        motion_correct,
        rigid_matrix,
        write_rigid_transform,
    )

    steady = drop_volumes(BOLD, 0, work / "moco_steady.nii")
    ref_file, mask_file = bold_reference(steady, 10, work / "moco_ref.nii.gz", work / "moco_mask.nii.gz")
    ref_img = nib.load(str(ref_file))
    mask = np.asanyarray(nib.load(str(mask_file)).dataobj) > 0
    # Temporal noise of the real run (voxelwise SD after removing a linear trend), median inside the mask.
    run = np.asanyarray(nib.load(str(steady)).dataobj, dtype=np.float32)[mask]
    tt = np.arange(run.shape[1])
    coef = np.polyfit(tt, run.T, 1)
    sigma = float(np.median((run - (coef[0][:, None] * tt + coef[1][:, None])).std(axis=1)))
    del run
    affine = ref_img.affine
    centre = (affine @ np.r_[np.argwhere(mask).mean(axis=0), 1.0])[:3]
    pts = (affine @ np.c_[np.argwhere(mask), np.ones(int(mask.sum()))].T)
    fixed = ants.image_read(str(ref_file))
    print(f"== 2. motion correction: {n_volumes} volumes of the real run's reference + noise SD {sigma:.1f} "
          f"(reference mean {float(np.asanyarray(ref_img.dataobj)[mask].mean()):.0f}), one ITK thread")
    rng = np.random.default_rng(2026)
    for kind in ("smooth", "spiky"):
        truth = motion_traces(n_volumes, kind, rng)
        vols = np.zeros(ref_img.shape + (n_volumes,), dtype=np.float32)
        for t in range(n_volumes):
            m = rigid_matrix(truth[t], centre)  # reference point -> volume point
            inv_file = write_rigid_transform(np.linalg.inv(m), work / "moco_truth_inv.mat")
            moved = ants.apply_transforms(fixed=fixed, moving=fixed, transformlist=[str(inv_file)], interpolator="bSpline")
            vols[..., t] = moved.numpy() + rng.normal(0.0, sigma, ref_img.shape)
        series = work / f"moco_{kind}.nii"
        nib.save(nib.Nifti1Image(vols, affine, ref_img.header), str(series))
        del vols
        methods = (
            ("gauss_newton (default)", {"method": "gauss_newton"}),
            ("ants (previous default)", {"method": "ants", "iterations": (10, 10), "shrink_factors": (2, 1),
                                         "smoothing_sigmas": (1.0, 0.0), "sampling_rate": 0.3}),
        )
        for label, kwargs in methods:
            t0 = time.perf_counter()
            c0 = time.process_time()
            _, params = motion_correct(series, ref_file, mask_file, work / f"moco_{kind}_{kwargs['method']}", **kwargs)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            trans_err, rot_err, disp = [], [], []
            for t in range(n_volumes):
                est = rigid_matrix(params[t])
                diff = est @ np.linalg.inv(rigid_matrix(truth[t], centre))
                # Translation error at the brain's centre, rotation error angle, mean voxel displacement error.
                trans_err.append(np.linalg.norm((diff @ np.r_[centre, 1.0])[:3] - centre))
                rot_err.append(np.rad2deg(np.arccos(np.clip((np.trace(diff[:3, :3]) - 1) / 2, -1, 1))))
                disp.append(np.linalg.norm(((diff @ pts) - pts)[:3], axis=0).mean())
            print(f"  {kind:6s} {label:24s} translation error {np.mean(trans_err):.3f} mm (max {np.max(trans_err):.3f}), "
                  f"rotation error {np.mean(rot_err):.3f} deg (max {np.max(rot_err):.3f}), mean brain-voxel "
                  f"displacement error {np.mean(disp):.3f} mm; {wall:.1f} s wall, {cpu:.1f} s CPU")


def network_structure(columns: list[str], x_TR: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per Yeo-7 network: mean within-network and mean between-network correlation."""
    nets = np.array([network_of(c) for c in columns])
    keep = np.isin(nets, YEO7) & (x_TR.std(axis=0) > 0)
    c = np.corrcoef(x_TR[:, keep].T)
    nets = nets[keep]
    out = {}
    for net in YEO7:
        inside = nets == net
        if inside.sum() < 2:
            continue
        block = c[np.ix_(inside, inside)]
        within = block[~np.eye(int(inside.sum()), dtype=bool)].mean()
        between = c[np.ix_(inside, ~inside)].mean()
        out[net] = (float(within), float(between))
    return out


def rest_figures(out_dir: Path) -> None:
    import nibabel as nib
    import pandas as pd

    from pipeline.core.config import load_config
    from workflows.ops.denoise import DENOISE_PRESETS

    func = out_dir / "sub-philipsA" / "func"
    ts_files = sorted(func.glob("*_timeseries.tsv")) if func.is_dir() else []
    ts_files = [f for f in ts_files if "atlas-" in f.name]
    t0 = time.perf_counter()
    if not ts_files:
        cmd = [str(REPO / ".venv" / "bin" / "neurocurate"), "prep", str(CORPUS), str(out_dir), "participant",
               "--participant-label", "philipsA", "--nprocs", "1", "--omp-nthreads", "1"]
        subprocess.run(cmd, check=True)
        ts_files = [f for f in sorted(func.glob("*_timeseries.tsv")) if "atlas-" in f.name]
    runtime = time.perf_counter() - t0
    ts = ts_files[0]
    sidecar = json.loads(ts.with_suffix(".json").read_text())
    conf_tsv = next(func.glob("*_desc-confounds_timeseries.tsv"))
    conf = pd.read_csv(conf_tsv, sep="\t", na_values="n/a")
    bold = nib.load(str(next(func.glob("*_desc-preproc_bold.nii.gz"))))
    mask = np.asanyarray(nib.load(str(next(func.glob("*_desc-brain_mask.nii.gz")))).dataobj) > 0
    data = np.asanyarray(bold.dataobj, dtype=np.float32)[mask]
    sd = data.std(axis=1)
    tsnr = np.median(np.divide(data.mean(axis=1), sd, out=np.zeros_like(sd), where=sd > 0))
    del data
    print(f"== 3. resting run sub-philipsA ({'prep run here' if runtime > 5 else 'existing derivatives'}: "
          f"{runtime:.0f} s): {sidecar['NumberOfVolumes']} volumes; preset that ran: {sidecar['DenoisingPreset']}; "
          f"median brain tSNR {tsnr:.1f}; mean FD {conf['framewise_displacement'].mean():.3f} mm, "
          f"max FD {conf['framewise_displacement'].max():.3f} mm")
    rows = [(f"workflow output ({sidecar['DenoisingPreset']})", pd.read_csv(ts, sep="\t"))]
    raw = list((out_dir / ".work").rglob("sub_philipsA_wf/bold_*/parcellate_denoise/raw_timeseries.tsv"))
    cfg = load_config(out_dir / "neurocurate_config.toml") if (out_dir / "neurocurate_config.toml").is_file() else load_config()
    if raw:
        rows.append(("raw ROI means (no denoising)", pd.read_csv(raw[0], sep="\t")))
        for preset in DENOISE_PRESETS:
            if preset == "task":
                continue  # needs an events.tsv
            with tempfile.TemporaryDirectory() as tmp:
                cols, clean, _ = apply_preset(preset, raw[0], conf_tsv, conf_tsv.with_suffix(".json"),
                                              float(sidecar.get("RepetitionTime", 1.259)), cfg, Path(tmp), None)
            rows.append((preset, pd.DataFrame(clean, columns=cols)))
    print(f"  {'series':32s} " + " ".join(f"{n:>11s}" for n in YEO7) + "  all within>between")
    for label, df in rows:
        s = network_structure(list(df.columns), df.to_numpy(dtype=float))
        diffs = [s[n][0] - s[n][1] for n in YEO7 if n in s]
        print(f"  {label:32s} " + " ".join(f"{s[n][0] - s[n][1]:11.3f}" if n in s else f"{'-':>11s}" for n in YEO7)
              + f"  {'yes' if all(d > 0 for d in diffs) else 'no'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--rest-out", type=Path, default=None,
                        help="derivatives of `neurocurate prep` on the corpus for philipsA (default: made under --work)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: task, moco, rest")
    parser.add_argument("--moco-volumes", type=int, default=156, help="volumes of the synthetic motion runs")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bold-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    if "task" not in skip:
        task_figures(work / "task")
    if "moco" not in skip:
        (work / "moco").mkdir(parents=True, exist_ok=True)
        moco_figures(work / "moco", args.moco_volumes)
    if "rest" not in skip:
        rest_figures(args.rest_out or work / "rest")
    print(f"work dir: {work}; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
