"""Figures for the anatomical workflow (issue 2). Prints the numbers; see benchmarks/README.md.

1. Known-transform recovery: each scan (the MNI152 T1 2 mm head template itself, and the real heads in
   ../shared/data/anat) is moved by >= 5 random affines (rotation <= 15 deg, translation <= 20 mm, scale 0.9-1.1)
   with a smooth multiplicative bias field and noise, then run through the same chain as the workflow
   (N4 -> deepbet -> affine to MNI). Error over template brain voxels: for the template the truth is exact;
   for a real scan the reference is its own registration before the move (consistency error).
2. Skull strip Dice: deepbet and the template fallback against Colin27's reference brain, and against the
   template brain mask carried through the known transform.
3. Time per scan (N4 + registration + strip + resample to 2 mm), one thread, median; peak memory (RSS).
4. T2w (niivue_T2w, anisotropic) to the T2 template: Pearson r inside the template brain mask.

Usage: python benchmarks/anat.py [--n-affines 5] [--scans colin27_T1w niivue_T1w_neck brainchop_T1w]
"""

from __future__ import annotations

import argparse
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

from workflows.ops import anat as ops  # noqa: E402

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


def chain(in_file: str, work: Path, template: str = T1_BRAIN, strip: str = "deepbet") -> dict:
    """The workflow's chain on one file: validate -> N4 -> strip -> affine -> resample to 2 mm."""
    t0 = time.perf_counter()
    ras, n4, bias = str(work / "ras.nii.gz"), str(work / "n4.nii.gz"), str(work / "bias.nii.gz")
    mask, xfm, out = str(work / "mask.nii.gz"), str(work / "xfm.mat"), str(work / "mni.nii.gz")
    ops.validate_anat_file(in_file, ras)
    ops.n4_correct(ras, n4, bias)
    if strip == "deepbet":
        ops.deepbet_mask(n4, mask)
        ops.register_affine(n4, template, xfm, moving_mask=mask)
    else:
        ops.register_affine(n4, template, xfm)
        ops.template_mask_to_native(n4, MASK, xfm, mask)
    ops.resample_to_template(n4, T1, xfm, out)
    return {"seconds": time.perf_counter() - t0, "xfm": xfm, "mask": mask, "mni": out, "n4": n4}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def known_transform_recovery(scans: list[tuple[str, str]], n_affines: int, work: Path) -> None:
    pts = brain_points()
    rng = np.random.default_rng(2026)
    print("\n1. Known-transform recovery (error over template brain voxels, mm)")
    print(f"{'scan':24s} {'mean':>6s} {'p95':>6s}   per-affine means")
    all_means = []
    for name, path in scans:
        if name == "MNI152_T1_2mm":
            ref_m = np.eye(4)
        else:
            ref = chain(path, _fresh(work / f"{name}_ref"))
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
            est = affine_matrix(chain(wfile, _fresh(work / f"{name}_{k}"))["xfm"])
            truth = np.linalg.inv(g) @ ref_m
            err = np.linalg.norm((pts @ est.T - pts @ truth.T)[:, :3], axis=1)
            means.append(err.mean())
            p95s.append(np.percentile(err, 95))
        all_means += means
        print(f"{name:24s} {np.mean(means):6.2f} {np.mean(p95s):6.2f}   " + " ".join(f"{m:.2f}" for m in means))
    print(f"{'all':24s} {np.mean(all_means):6.2f}   (goal: mean <= 1.0 mm)")


def skull_strip(work: Path) -> None:
    print("\n2. Skull strip Dice")
    colin = str(DATA / "anat" / "colin27_T1w.nii.gz")
    ref = nib.as_closest_canonical(nib.load(DATA / "anat" / "colin27_desc-brain_T1w.nii.gz")).get_fdata() > 0
    for strip in ("deepbet", "template"):
        template = T1_BRAIN if strip == "deepbet" else T1
        res = chain(colin, _fresh(work / f"colin_{strip}"), template=template, strip=strip)
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
        res = chain(moved, _fresh(work / f"tpl_{strip}"), template=template, strip=strip)
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


def _fresh(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-affines", type=int, default=5)
    ap.add_argument("--scans", nargs="+", default=["colin27_T1w", "niivue_T1w_neck", "brainchop_T1w"])
    ap.add_argument("--parts", nargs="+", default=["recovery", "strip", "timing", "t2w"])
    args = ap.parse_args()
    scans = [("MNI152_T1_2mm", T1)] + [(s, str(DATA / "anat" / f"{s}.nii.gz")) for s in args.scans]
    with tempfile.TemporaryDirectory(prefix="nc_bench_anat_") as tmp:
        work = Path(tmp)
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
