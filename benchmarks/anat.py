"""Figures for the anatomical workflow (issues 2 and 13). Prints the numbers; see benchmarks/README.md.

Issue 13 (``--figures``; every chain below runs the workflow's own functions, ``workflows/ops/anat.py``, with the
settings of ``[anat]`` in ``pipeline.core.config.AnatConfig``: "fast" = today's defaults, "old" = the
pre-issue-13 defaults, N4 on the native grid with shrink 4 and registration of the native-resolution image):

1. Time per T1w on one core (ITK and torch 1 thread), per step (validate, N4, skull strip, affine, resample to
   2 mm, QC metrics), median over every real T1w in ../shared/data (anat + corpus), fast beside old in the same
   run; peak RSS of the process after the fast chains and after all.
2. For the fast defaults: known-transform error (same protocol as issue 2's figure 1), Dice vs the template mask
   carried through a known affine, and the QC decision (qc.curation.build_table on the metrics of every scan,
   fast vs old) of every real T1w.
3. SyN vs affine over the corpus T1w: Pearson r with the MNI T1 template inside its brain mask, Dice of the
   template's 3-class tissue masks with the scan's (same k-means, inside the template brain mask), time per scan.

Issue 2 (``--parts``): 1. known-transform recovery, 2. skull strip Dice, 3. timing, 4. T2w.

Usage: python benchmarks/anat.py --figures 1 2 3 [--scans NAME ...] [--n-affines 3]
       python benchmarks/anat.py --parts recovery strip timing t2w   (issue-2 figures, old defaults)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import ants  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.core.config import AnatConfig  # noqa: E402
from workflows.ops import anat as ops  # noqa: E402

FAST = AnatConfig()
OLD = AnatConfig(n4_working_resolution_mm=0.0, n4_shrink_factor=4, n4_iterations=(50, 50, 50, 50),
                 registration_moving_resolution_mm=0.0)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NEUROCURATE_SHARED_DATA", REPO.parent / "shared" / "data"))
TPL = DATA / "templates"
T1 = str(TPL / "MNI152NLin6Asym_res-2_T1w.nii.gz")
T1_BRAIN = str(TPL / "MNI152NLin6Asym_res-2_desc-brain_T1w.nii.gz")
T2 = str(TPL / "MNI152NLin6Asym_res-2_T2w.nii.gz")
MASK = str(TPL / "MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz")


def affine_matrix(path: str) -> np.ndarray:
    """4x4 matrix (ITK physical/LPS space) of an ANTs affine .mat: template point -> subject point."""
    tx = ants.read_transform(path)
    p, c = np.asarray(tx.parameters), np.asarray(tx.fixed_parameters)
    a, t = p[:9].reshape(3, 3), p[9:12]
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = t + c - a @ c
    return m


def write_affine(m: np.ndarray, path: str) -> str:
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    tx.set_parameters(np.concatenate([m[:3, :3].ravel(), m[:3, 3]]))
    tx.set_fixed_parameters(np.zeros(3))
    ants.write_transform(tx, path)
    return path


def brain_points() -> np.ndarray:
    """Template brain voxel centres in ITK physical space (N x 4, homogeneous)."""
    img = ants.image_read(MASK)
    idx = np.argwhere(img.numpy() > 0).astype(float)
    pts = (np.asarray(img.direction) @ (idx * np.asarray(img.spacing)).T).T + np.asarray(img.origin)
    return np.c_[pts, np.ones(len(pts))]


def random_affine(rng: np.random.Generator, center: np.ndarray) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-15, 15))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    a = rot @ np.diag(rng.uniform(0.9, 1.1, 3))
    shift = rng.uniform(-1, 1, 3)
    shift *= rng.uniform(0, 20) / np.linalg.norm(shift)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = center + shift - a @ center
    return m


def degrade(img: ants.ANTsImage, rng: np.random.Generator) -> ants.ANTsImage:
    """Smooth multiplicative bias (up to about +-30%) and Gaussian noise (2% of the 99th percentile)."""
    arr = img.numpy().astype(np.float32)
    grids = np.meshgrid(*(np.linspace(-1, 1, s) for s in arr.shape), indexing="ij")
    coef = rng.uniform(-0.15, 0.15, 6)
    field = np.exp(sum(c * g for c, g in zip(coef[:3], grids)) + sum(c * g**2 for c, g in zip(coef[3:], grids)))
    out = arr * field + rng.normal(0, 0.02 * np.percentile(arr, 99), arr.shape)
    return ants.from_numpy(np.clip(out, 0, None).astype(np.float32), img.origin, img.spacing, img.direction)


def chain(in_file: str, work: Path, template: str = T1_BRAIN, strip: str = "deepbet", a: AnatConfig = OLD,
          syn: bool = False, qc: bool = False) -> dict:
    """The workflow's chain on one file: validate -> N4 -> strip -> affine [-> SyN] -> resample to 2 mm [-> QC].

    Returns the outputs and ``steps``: seconds of wall time per step.
    """
    steps: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        steps[name] = now - t0
        t0 = now

    ras, n4, bias = str(work / "ras.nii"), str(work / "n4.nii"), str(work / "bias.nii")
    mask, xfm, out = str(work / "mask.nii"), str(work / "xfm.mat"), str(work / "mni.nii.gz")
    ops.validate_anat_file(in_file, ras)
    lap("validate")
    ops.n4_correct(ras, n4, bias, shrink_factor=a.n4_shrink_factor, iterations=a.n4_iterations,
                   convergence=a.n4_convergence, working_resolution_mm=a.n4_working_resolution_mm)
    lap("n4")
    reg = dict(metric=a.registration_metric, iterations=a.registration_iterations,
               shrink_factors=a.registration_shrink_factors, smoothing_sigmas=a.registration_smoothing_sigmas,
               sampling_rate=a.registration_sampling_rate, moving_resolution_mm=a.registration_moving_resolution_mm,
               seed=a.registration_seed)
    if strip == "deepbet":
        ops.deepbet_mask(n4, mask, threshold=a.deepbet_threshold, model_shape=a.deepbet_shape)
        lap("strip")
        ops.register_affine(n4, template, xfm, moving_mask=mask, **reg)
        lap("affine")
    else:
        ops.register_affine(n4, template, xfm, **reg)
        lap("affine")
        ops.template_mask_to_native(n4, MASK, xfm, mask)
        lap("strip")
    to_std = xfm
    if syn:
        to_std = str(work / "syn.h5")
        ops.register_syn(n4, template, xfm, to_std, moving_mask=mask if strip == "deepbet" else None,
                         metric=a.syn_metric, iterations=a.syn_iterations,
                         moving_resolution_mm=a.registration_moving_resolution_mm, seed=a.registration_seed)
        lap("syn")
    mni_mask, mni_bias = str(work / "mni_mask.nii.gz"), str(work / "mni_bias.nii.gz")
    ops.resample_to_template(n4, T1, to_std, out)
    ops.resample_to_template(mask, T1, to_std, mni_mask, kind="mask")
    ops.resample_to_template(bias, T1, to_std, mni_bias, kind="field")
    lap("resample")
    res = {"steps": steps, "xfm": xfm, "to_std": to_std, "mask": mask, "mni": out, "n4": n4}
    if qc:
        res["metrics"] = qc_metrics(out, mni_mask, mni_bias)
        lap("qc")
    res["seconds"] = sum(steps.values())
    return res


_TPL_CACHE: dict[str, object] = {}


def _templates() -> dict:
    if not _TPL_CACHE:
        from qc.metrics import template_tissues

        t1 = nib.load(T1).get_fdata(dtype=np.float32)
        m = nib.load(MASK).get_fdata(dtype=np.float32)
        _TPL_CACHE.update(t1=t1, mask=m, tissues=template_tissues(t1, m > 0))
    return _TPL_CACHE


def qc_metrics(mni: str, mni_mask: str, mni_bias: str) -> dict[str, float]:
    """The group step's anatomical metrics (qc.group.anat_metrics) of one chain's MNI outputs."""
    from qc.group import anat_metrics

    t = _templates()
    return anat_metrics(nib.load(mni).get_fdata(dtype=np.float32), "T1w", t["t1"], t["mask"], t["tissues"],
                        nib.load(mni_mask).get_fdata(dtype=np.float32), nib.load(mni_bias).get_fdata(dtype=np.float32))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def known_transform_recovery(scans: list[tuple[str, str]], n_affines: int, work: Path, settings: AnatConfig = OLD) -> None:
    pts = brain_points()
    rng = np.random.default_rng(2026)
    print("\n1. Known-transform recovery (error over template brain voxels, mm)")
    print(f"{'scan':24s} {'mean':>6s} {'p95':>6s}   per-affine means")
    all_means = []
    for name, path in scans:
        if name == "MNI152_T1_2mm":
            ref_m = np.eye(4)
        else:
            ref = chain(path, _fresh(work / f"{name}_ref"), a=settings)
            ref_m = affine_matrix(ref["xfm"])
        img = ants.image_read(str(ops.load_nifti(path).get_filename()))
        center = np.asarray(ants.get_center_of_mass(img))
        means, p95s = [], []
        for k in range(n_affines):
            g = random_affine(rng, center)
            gfile = write_affine(g, str(work / f"{name}_g{k}.mat"))
            # W(y) = S(G y): resample S through G on its own grid, then degrade.
            moved = ants.apply_transforms(fixed=img, moving=img, transformlist=[gfile], interpolator="linear")
            wfile = str(work / f"{name}_moved{k}.nii.gz")
            ants.image_write(degrade(moved, rng), wfile)
            est = affine_matrix(chain(wfile, _fresh(work / f"{name}_{k}"), a=settings)["xfm"])
            truth = np.linalg.inv(g) @ ref_m
            err = np.linalg.norm((pts @ est.T - pts @ truth.T)[:, :3], axis=1)
            means.append(err.mean())
            p95s.append(np.percentile(err, 95))
        all_means += means
        print(f"{name:24s} {np.mean(means):6.2f} {np.mean(p95s):6.2f}   " + " ".join(f"{m:.2f}" for m in means))
    print(f"{'all':24s} {np.mean(all_means):6.2f}   (goal: mean <= 1.0 mm)")


def skull_strip(work: Path, settings: AnatConfig = OLD, colin: bool = True) -> None:
    print("\n2. Skull strip Dice")
    colin_file = str(DATA / "anat" / "colin27_T1w.nii.gz")
    ref = nib.as_closest_canonical(nib.load(DATA / "anat" / "colin27_desc-brain_T1w.nii.gz")).get_fdata() > 0
    for strip in ("deepbet", "template") if colin else ():
        template = T1_BRAIN if strip == "deepbet" else T1
        res = chain(colin_file, _fresh(work / f"colin_{strip}"), template=template, strip=strip, a=settings)
        print(f"  Colin27 {strip:9s} vs its reference brain: {dice(nib.load(res['mask']).get_fdata() > 0, ref):.3f}")
    # The template as a subject, moved by a known affine: truth = template mask carried through it.
    rng = np.random.default_rng(7)
    img = ants.image_read(T1)
    g = write_affine(random_affine(rng, np.asarray(ants.get_center_of_mass(img))), str(work / "tpl_g.mat"))
    moved = str(work / "tpl_moved.nii.gz")
    ants.image_write(degrade(ants.apply_transforms(fixed=img, moving=img, transformlist=[g]), rng), moved)
    truth = ants.apply_transforms(fixed=img, moving=ants.image_read(MASK), transformlist=[g], interpolator="linear")
    truth_ras = nib.as_closest_canonical(nib.Nifti1Image((truth.numpy() >= 0.5).astype(np.uint8), nib.load(T1).affine))
    for strip in ("deepbet", "template"):
        template = T1_BRAIN if strip == "deepbet" else T1
        res = chain(moved, _fresh(work / f"tpl_{strip}"), template=template, strip=strip, a=settings)
        print(f"  moved MNI template {strip:9s} vs carried template mask: "
              f"{dice(nib.load(res['mask']).get_fdata() > 0, truth_ras.get_fdata() > 0):.3f}")
    print("  (goal: >= 0.95)")


def timing(scans: list[tuple[str, str]], work: Path) -> None:
    import torch

    torch.set_num_threads(1)
    print("\n3. Time per scan, one thread (N4 + strip + registration + resample to 2 mm)")
    times = []
    for name, path in scans:
        if name == "MNI152_T1_2mm":
            continue
        cpu0 = time.process_time()
        res = chain(path, _fresh(work / f"time_{name}"))
        times.append(res["seconds"])
        print(f"  {name:24s} wall {res['seconds']:6.1f} s   cpu {time.process_time() - cpu0:6.1f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  median wall {statistics.median(times):.1f} s (goal <= 20 s); peak RSS of this process {peak:.0f} MB")
    print(f"  load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def t2w(work: Path) -> None:
    print("\n4. T2w to the T2 template")
    res = chain(str(DATA / "anat" / "niivue_T2w.nii.gz"), _fresh(work / "t2w"), template=T2, strip="template")
    mni = nib.load(res["mni"]).get_fdata()
    tpl = nib.load(T2).get_fdata()
    m = nib.load(MASK).get_fdata() > 0
    print(f"  niivue_T2w Pearson r with MNI152 T2 inside the brain mask: {np.corrcoef(mni[m], tpl[m])[0, 1]:.3f}")


def real_t1w(names: list[str] | None = None) -> list[tuple[str, str]]:
    """Every real T1w of ../shared/data: anat (the tuning set of issue 13) then corpus (held out)."""
    scans = [(p.name.split(".")[0], str(p)) for p in sorted((DATA / "anat").glob("*T1w*.nii.gz"))
             if "desc-brain" not in p.name]
    scans += [(p.name.split(".")[0], str(p)) for p in sorted((DATA / "corpus").glob("sub-*/anat/*_T1w.nii.gz"))]
    return [s for s in scans if not names or s[0] in names]


def _group(name: str) -> str:
    return "corpus" if name.startswith("sub-") else "anat"


STEPS = ("validate", "n4", "strip", "affine", "resample", "qc")


def figure_timing_and_qc(scans: list[tuple[str, str]], work: Path) -> dict:
    """Figure 1 (time per step, fast beside old) and the QC-decision part of figure 2."""
    import torch

    torch.set_num_threads(1)
    results: dict[str, dict[str, dict]] = {"fast": {}, "old": {}}
    peaks = {}
    print(f"\n13.1 Time per T1w, one core (ITK 1 thread, torch 1 thread), wall seconds per step; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'scan':36s} {'set':5s} " + " ".join(f"{s:>8s}" for s in STEPS) + f" {'total':>8s}")
    for label, a in (("fast", FAST), ("old", OLD)):
        for name, path in scans:
            res = chain(path, _fresh(work / f"t13_{label}_{name}"), a=a, qc=True)
            results[label][name] = res
            st = res["steps"]
            print(f"{name:36s} {label:5s} " + " ".join(f"{st.get(s, 0):8.1f}" for s in STEPS)
                  + f" {res['seconds']:8.1f}", flush=True)
        peaks[label] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for label in ("fast", "old"):
        for group in ("anat", "corpus", "all"):
            rows = [r for n, r in results[label].items() if group == "all" or _group(n) == group]
            if not rows:
                continue
            med = {s: statistics.median(r["steps"].get(s, 0.0) for r in rows) for s in STEPS}
            total = statistics.median(r["seconds"] for r in rows)
            print(f"  median {label:4s} {group:6s} (n={len(rows):2d}): total {total:5.1f} s  "
                  + "  ".join(f"{s} {med[s]:.1f}" for s in STEPS))
    print(f"  peak RSS of the process: {peaks['fast']:.0f} MB after the fast chains, {peaks['old']:.0f} MB after all"
          f"; load average at end {os.getloadavg()[0]:.1f}  (goal: fast median <= 20 s)")

    from pipeline.core.config import QCConfig
    from qc.curation import build_table

    print("\n13.2c QC decision of every real T1w, fast vs old defaults (qc.curation.build_table, no site layer)")
    tables = {}
    qc_cfg = QCConfig()
    for label in ("fast", "old"):
        records = [{"subject": n.replace("_", "").replace("-", ""), "modality": "T1w", "path": n, **r["metrics"]}
                   for n, r in results[label].items()]
        try:
            tables[label] = build_table(records, qc_cfg).set_index("path")
        except ValueError as exc:  # the shipped classifier failed to train (qc/ is not this benchmark's)
            print(f"  (layer 4 left out: the artifact classifier failed: {exc})")
            qc_cfg = dataclasses.replace(qc_cfg, classifier=False)
            tables = {lab: build_table([{"subject": n.replace("_", "").replace("-", ""), "modality": "T1w",
                                         "path": n, **r["metrics"]} for n, r in results[lab].items()],
                                       qc_cfg).set_index("path") for lab in ("fast", "old") if results[lab]}
            break
    changed = 0
    for name, _ in scans:
        f, o = tables["fast"].loc[name], tables["old"].loc[name]
        flag = "" if bool(f["qc_pass"]) == bool(o["qc_pass"]) else "  CHANGED"
        changed += bool(flag)
        print(f"  {name:36s} old {'pass' if o['qc_pass'] else 'FAIL':4s} fast {'pass' if f['qc_pass'] else 'FAIL':4s}"
              f"  cjv {o['cjv']:.3f} -> {f['cjv']:.3f}  cnr {o['cnr']:.2f} -> {f['cnr']:.2f}"
              f"  {f['qc_layer'] or ''}{flag}")
    for group in ("anat", "corpus"):
        names = [n for n, _ in scans if _group(n) == group]
        if names:
            dc = [tables["fast"].loc[n, "cjv"] - tables["old"].loc[n, "cjv"] for n in names]
            dn = [tables["fast"].loc[n, "cnr"] - tables["old"].loc[n, "cnr"] for n in names]
            print(f"  {group}: median CJV change {statistics.median(dc):+.4f} (max {max(dc):+.4f}), "
                  f"median CNR change {statistics.median(dn):+.3f} (min {min(dn):+.3f})")
    print(f"  decisions changed: {changed} of {len(scans)} (goal: 0)")
    return results


def figure_syn(scans: list[tuple[str, str]], work: Path) -> None:
    """Figure 3: SyN vs affine (fast defaults otherwise)."""
    import torch

    from qc.iqms import tissue_segmentation

    torch.set_num_threads(1)
    t = _templates()
    tmask = t["mask"] > 0
    tpl_t = {k: v for k, v in tissue_segmentation(t["t1"], tmask, "T1w").items()}
    print("\n13.3 SyN vs affine to MNI152NLin6Asym 2 mm (fast defaults; r inside the template brain mask; "
          f"Dice of the 3 tissue classes); load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name, path in scans:
        res = chain(path, _fresh(work / f"syn_{name}"), a=FAST, syn=True)
        out = {}
        for kind, xfm in (("affine", res["xfm"]), ("syn", res["to_std"])):
            mni = str(work / f"syn_{name}" / f"mni_{kind}.nii.gz")
            ops.resample_to_template(res["n4"], T1, xfm, mni)
            img = nib.load(mni).get_fdata(dtype=np.float32)
            r = float(np.corrcoef(img[tmask], t["t1"][tmask])[0, 1])
            seg = tissue_segmentation(img, tmask, "T1w")
            d = float(np.mean([dice(seg[k], tpl_t[k]) for k in ("csf", "gm", "wm")]))
            out[kind] = (r, d)
        rows.append((out, res["steps"]["syn"]))
        print(f"  {name:36s} r affine {out['affine'][0]:.3f} syn {out['syn'][0]:.3f}   tissue Dice affine "
              f"{out['affine'][1]:.3f} syn {out['syn'][1]:.3f}   SyN step {res['steps']['syn']:.1f} s", flush=True)
    if rows:
        for i, what in ((0, "Pearson r"), (1, "tissue Dice")):
            a_ = [o["affine"][i] for o, _ in rows]
            s_ = [o["syn"][i] for o, _ in rows]
            better = sum(x > y for x, y in zip(s_, a_))
            print(f"  median {what}: affine {statistics.median(a_):.3f}, syn {statistics.median(s_):.3f} "
                  f"(syn higher on {better} of {len(rows)})")
        print(f"  median SyN step {statistics.median(t_ for _, t_ in rows):.1f} s per scan (one thread)")


def _fresh(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-affines", type=int, default=5)
    ap.add_argument("--scans", nargs="+", default=None,
                    help="issue 2: files of ../shared/data/anat (default colin27_T1w niivue_T1w_neck brainchop_T1w); "
                         "issue 13: names of real T1w (default every one)")
    ap.add_argument("--parts", nargs="+", default=[], choices=["recovery", "strip", "timing", "t2w"],
                    help="issue-2 figures (old defaults)")
    ap.add_argument("--figures", nargs="+", default=[], choices=["1", "2", "3"], help="issue-13 figures")
    args = ap.parse_args()
    if not args.parts and not args.figures:
        args.figures = ["1", "2", "3"]
    with tempfile.TemporaryDirectory(prefix="nc_bench_anat_") as tmp:
        work = Path(tmp)
        t1w = real_t1w(args.scans)
        if "1" in args.figures or "2" in args.figures:
            figure_timing_and_qc(t1w, work)
        if "2" in args.figures:
            three = [("MNI152_T1_2mm", T1)] + [(n, p) for n, p in real_t1w() if _group(n) == "anat"]
            print("\n13.2a Known-transform error, fast defaults")
            known_transform_recovery(three, args.n_affines, work, settings=FAST)
            print("\n13.2b Skull-strip Dice, fast defaults")
            skull_strip(work, settings=FAST)
        if "3" in args.figures:
            figure_syn([s for s in t1w if _group(s[0]) == "corpus"], work)
        old_scans = args.scans or ["colin27_T1w", "niivue_T1w_neck", "brainchop_T1w"]
        scans = [("MNI152_T1_2mm", T1)] + [(s, str(DATA / "anat" / f"{s}.nii.gz")) for s in old_scans]
        if "timing" in args.parts:
            timing(scans, work)
        if "recovery" in args.parts:
            known_transform_recovery(scans, args.n_affines, work)
        if "strip" in args.parts:
            skull_strip(work)
        if "t2w" in args.parts:
            t2w(work)


if __name__ == "__main__":
    main()
