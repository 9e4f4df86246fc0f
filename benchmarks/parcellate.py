"""Parcellation speed and agreement: pipeline.roi.parcellation vs nilearn NiftiLabelsMasker (mean).

Two runs, each timed for both implementations in the same process:

* ``real``: the studyforrest BOLD run in ``../shared/data/func`` (80x80x35x156,
  3 mm, scanner space): the 2 mm Schaefer400+Tian S3 atlas is resampled
  (nearest neighbour) onto the BOLD grid by both;
* ``mni200``: a 200-volume run on the 2 mm MNI grid (91x109x91, float32),
  made from the bundled MNI T1 template with a random per-volume scaling
  and voxel noise (seeded), so no resampling is needed.

Both implementations receive the same in-memory image (data already
decompressed) and the atlas as a file path, so the timing covers atlas
loading, resampling and the reduction, not gzip decoding; the end-to-end
time from the ``.nii.gz`` file is printed for the real run as well.

Usage: ``python benchmarks/parcellate.py [--repeats 3] [--volumes 200]``
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.roi.atlas import load_atlas
from pipeline.roi.parcellation import parcellate_img
from pipeline.core.templates import get_template

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEUROCURATE_SHARED_DATA", REPO.parent / "shared" / "data"))


def _nilearn(img, atlas):
    from nilearn.maskers import NiftiLabelsMasker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masker = NiftiLabelsMasker(str(atlas.labels_img), strategy="mean")
        signals = masker.fit_transform(img)
    ids = [v for k, v in masker.region_ids_.items() if k != "background"]
    return signals, ids


def _ours(img, atlas):
    return parcellate_img(img, atlas).signals_TR


def _best(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def compare(label, img, atlas, repeats):
    """Time both implementations on one image and check their agreement."""
    t_ours, ours = _best(lambda: _ours(img, atlas), repeats)
    t_ref, (ref, ids) = _best(lambda: _nilearn(img, atlas), repeats)
    cols = [atlas.label_ids.index(i) for i in ids]
    rel = np.abs(ours[:, cols] - ref) / np.maximum(np.abs(ref), 1e-12)
    print(
        f"{label:8s} shape={img.shape} ROIs compared={len(cols)}/{atlas.n_rois} "
        f"ours={t_ours:.3f}s nilearn={t_ref:.3f}s speedup={t_ref / t_ours:.1f}x max_rel_diff={rel.max():.2e}"
    )
    if rel.max() > 1e-4:
        raise SystemExit(f"{label}: results differ from nilearn by {rel.max():.2e} > 1e-4")
    return t_ref / t_ours


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings (default 3)")
    parser.add_argument("--volumes", type=int, default=200, help="volumes of the synthetic 2 mm run (default 200)")
    args = parser.parse_args(argv)
    atlas = load_atlas()

    bold_path = SHARED / "func" / "sub-02_task-oneback_run-1_bold.nii.gz"
    src = nib.load(bold_path)
    real = nib.Nifti1Image(np.asanyarray(src.dataobj), src.affine, src.header)
    ratio_real = compare("real", real, atlas, args.repeats)

    t_file_ours, _ = _best(lambda: _ours(nib.load(bold_path), atlas), 1)
    t_file_ref, _ = _best(lambda: _nilearn(str(bold_path), atlas), 1)
    print(f"real, from .nii.gz incl. gzip decode: ours={t_file_ours:.3f}s nilearn={t_file_ref:.3f}s ratio={t_file_ref / t_file_ours:.1f}x")

    template = nib.load(get_template(resolution=2))
    base = np.asanyarray(template.dataobj).astype(np.float32)
    rng = np.random.default_rng(0)
    data = np.empty(base.shape + (args.volumes,), dtype=np.float32, order="F")
    for t in range(args.volumes):
        data[..., t] = base * np.float32(1 + 0.01 * rng.standard_normal()) + rng.standard_normal(base.shape, dtype=np.float32) * 5
    mni = nib.Nifti1Image(data, template.affine)
    ratio_mni = compare("mni200", mni, atlas, args.repeats)
    print(f"speedup vs nilearn: real run {ratio_real:.1f}x, 2 mm {args.volumes}-volume run {ratio_mni:.1f}x")


if __name__ == "__main__":
    main()
