"""Does the affine registration absorb a tilted head? (issue 16, the wrong-orientation false rejects)

Every real anatomical scan of ``../shared/data`` (corpus + ``anat``; the N4
images of ``benchmarks/qc_generalisation.py``'s cache, made with the
workflow's settings) is registered to the 2 mm MNI template of its contrast
as it is, and again with its header turned by a known rotation about the
centre of the volume: 12 degrees and -20 degrees about the left-right axis
(pitch) and 15 degrees about the anterior-posterior axis (roll). Nothing
else changes, so the right answer is known: the turned registration must map
every template point to the turned image of the point that the untilted
registration maps it to. The error is the mean distance (mm) between the two
over the template brain (every second voxel of the 2 mm mask); a
registration *holds* the tilt when it is under 2 mm (one template voxel).

Two settings of ``workflows.ops.anat.register_affine``, all else the
``[anat]`` defaults: the rotation search (``registration_init_arc_deg`` 27,
the default since issue 16) and the centre-of-mass start alone
(``registration_init_arc_deg = 0``, the setting before). The untilted
reference registration of each scan uses the same setting as its tilted ones.

Usage::

    python benchmarks/registration_tilt.py [--workdir DIR] [--jobs 2] [--limit-scans N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import qc_generalisation as qcg  # noqa: E402

from pipeline.core.config import AnatConfig  # noqa: E402
from workflows.ops.transforms import itk_linear_ras  # noqa: E402

#: (name, axis of the rotation in RAS world coordinates, degrees)
TILTS: tuple[tuple[str, int, float], ...] = (("pitch+12", 0, 12.0), ("pitch-20", 0, -20.0), ("roll+15", 1, 15.0))
SETTINGS: dict[str, AnatConfig] = {
    "rotation search (default)": AnatConfig(),
    "centre of mass only (before)": replace(AnatConfig(), registration_init_arc_deg=0.0),
}
HOLD_MM = 2.0


def subject_points(xfm: str, points_ras: np.ndarray) -> np.ndarray:
    """N x 3 RAS template points mapped by a registration's forward transform (RAS subject points)."""
    return nib.affines.apply_affine(itk_linear_ras(xfm), points_ras)


def brain_points(template_mask: Path) -> np.ndarray:
    img = nib.load(template_mask)
    ijk = np.argwhere(np.asanyarray(img.dataobj) > 0)[::2]
    return nib.affines.apply_affine(img.affine, ijk)


def one_scan(scan: qcg.RealScan, work: Path, points: np.ndarray, settings_labels: tuple[str, ...]) -> list[dict]:
    """Every setting x tilt of one scan: error (mm) and seconds per registration."""
    from workflows.ops.anat import register_affine

    folder = qcg.prepare_scan(scan, work)
    n4 = nib.load(folder / "n4.nii.gz")
    data = np.asanyarray(n4.dataobj).astype(np.float32)
    out_dir = work / "tilt" / scan.key
    out_dir.mkdir(parents=True, exist_ok=True)
    template = qcg._template(scan.modality)
    rows = []
    for label in settings_labels:
        settings = SETTINGS[label]
        tag = "search" if settings.registration_init_arc_deg > 0 else "com"
        ref_xfm = out_dir / f"{tag}_untilted.mat"
        t0 = time.perf_counter()
        register_affine(str(folder / "n4.nii.gz"), template, str(ref_xfm), **settings.affine_kwargs())
        seconds = [time.perf_counter() - t0]
        ref_subject = subject_points(str(ref_xfm), points)
        for name, axis, degrees in TILTS:
            turn = qcg.tilt_matrix(n4.affine, data.shape, axis, degrees)
            moved = out_dir / f"{tag}_{name}.nii"
            qcg._save(data, turn @ n4.affine, moved)
            xfm = out_dir / f"{tag}_{name}.mat"
            t0 = time.perf_counter()
            register_affine(str(moved), template, str(xfm), **settings.affine_kwargs())
            seconds.append(time.perf_counter() - t0)
            moved.unlink()
            expected = nib.affines.apply_affine(turn, ref_subject)
            err = np.linalg.norm(subject_points(str(xfm), points) - expected, axis=1)
            rows.append({"scan": scan.key, "source": scan.source, "setting": label, "tilt": name,
                         "mean_mm": float(err.mean()), "max_mm": float(err.max())})
        for r in rows[-len(TILTS):]:
            r["seconds"] = float(np.median(seconds))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/neurocurate_registration_tilt"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--limit-scans", type=int, default=0)
    ap.add_argument("--scans", nargs="*", default=[], help="only these scans (keys such as sub-tciaJ_T2w)")
    ap.add_argument("--setting", choices=["default", "before", "both"], default="both")
    args = ap.parse_args(argv)
    labels = tuple(SETTINGS)
    if args.setting != "both":
        labels = (labels[0],) if args.setting == "default" else (labels[1],)
    import pandas as pd

    from pipeline.core.templates import get_template

    scans = qcg.real_scans()
    if args.scans:
        scans = [s for s in scans if s.key in set(args.scans)]
    if args.limit_scans:
        scans = scans[: args.limit_scans]
    points = brain_points(get_template(2, "mask", "brain"))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        rows = [r for rows in pool.map(one_scan, scans, [args.workdir] * len(scans), [points] * len(scans),
                                                [labels] * len(scans))
                for r in rows]
    df = pd.DataFrame(rows)
    print(f"{len(scans)} real scans x {len(TILTS)} tilts ({', '.join(t[0] for t in TILTS)}); "
          f"holds = mean error < {HOLD_MM} mm over the template brain; {time.perf_counter() - t0:.0f} s")
    for label in labels:
        d = df[df.setting == label]
        held = d.mean_mm < HOLD_MM
        print(f"\n{label}: holds {int(held.sum())}/{len(d)} ({held.mean():.3f}); mean error median "
              f"{d.mean_mm.median():.2f} mm, worst {d.mean_mm.max():.1f} mm; "
              f"median {d.seconds.median():.1f} s per registration")
        for tilt in d.tilt.unique():
            dt = d[d.tilt == tilt]
            print(f"  {tilt:9s} holds {int((dt.mean_mm < HOLD_MM).sum())}/{len(dt)}")
        for _, r in d[~held].iterrows():
            print(f"  fails: {r.scan} {r.tilt}: mean {r.mean_mm:.1f} mm, max {r.max_mm:.1f} mm")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
