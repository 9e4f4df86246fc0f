"""Issue 13: the ITK thread count a node is given, the fast anatomical defaults on a real scan, and SyN from the CLI."""

from __future__ import annotations

import json
import os
import shutil

import ants
import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.core.config import AnatConfig, QCConfig, load_config
from pipeline.core.derivatives import anat_outputs, func_outputs
from workflows.ops import anat as ops
from workflows.ops.itk_threads import call_with_threads, itk_threads, thread_report


def test_registration_config_and_fast_defaults():
    a = AnatConfig()
    assert a.registration == "affine"  # nonlinear only on request
    assert a.n4_working_resolution_mm > 0 and a.registration_moving_resolution_mm > 0
    assert load_config(None, {"anat": {"registration": "syn"}}).anat.registration == "syn"
    with pytest.raises(ValueError, match="registration"):
        load_config(None, {"anat": {"registration": "bspline"}})


def test_a_node_gets_the_itk_threads_it_is_given():
    """ITK fixes its pool when antspyx is imported: a different count runs in a fresh interpreter that has it."""
    here = call_with_threads(itk_threads() or 1, thread_report)
    n = here[1]
    assert here[0] == os.getpid() and n == itk_threads()
    two = call_with_threads(n + 2, thread_report)
    four = call_with_threads(n + 4, thread_report)
    assert two[0] != os.getpid() and two[1] == n + 2 and four[1] == n + 4
    # Same imports in both children: the extra OS threads are ITK's pool, sized as asked.
    assert four[2] - two[2] == 2
    # The parent keeps its own count and keeps running in-process.
    assert call_with_threads(n, thread_report)[0] == os.getpid()


def test_child_errors_reach_the_caller(tmp_path):
    n = itk_threads() or 1
    with pytest.raises(Exception, match="does not exist"):
        call_with_threads(n + 1, ops.validate_anat_file, str(tmp_path / "missing.nii.gz"), str(tmp_path / "o.nii"))


# ----------------------------------------------------------------------------- real data

def _chain(in_file, work, a: AnatConfig, template, tpl_mask):
    work.mkdir(parents=True, exist_ok=True)
    ras, n4, bias, mask, xfm = (str(work / n) for n in ("ras.nii", "n4.nii", "bias.nii", "mask.nii", "xfm.mat"))
    ops.validate_anat_file(str(in_file), ras)
    ops.n4_correct(ras, n4, bias, shrink_factor=a.n4_shrink_factor, iterations=a.n4_iterations,
                   working_resolution_mm=a.n4_working_resolution_mm)
    ops.deepbet_mask(n4, mask, model_shape=a.deepbet_shape)
    ops.register_affine(n4, template, xfm, moving_mask=mask, **a.affine_kwargs())
    outs = {}
    for src, kind in ((n4, "image"), (mask, "mask"), (bias, "field")):
        outs[kind] = str(work / f"mni_{kind}.nii.gz")
        ops.resample_to_template(src, tpl_mask, xfm, outs[kind], kind=kind)
    return xfm, outs


def _matrix(path):
    tx = ants.read_transform(path)
    p, c = np.asarray(tx.parameters), np.asarray(tx.fixed_parameters)
    a, t = p[:9].reshape(3, 3), p[9:12]
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = a, t + c - a @ c
    return m


def _decision(outs, template_dir):
    from qc.curation import evaluate_rules, reference_failures
    from qc.group import anat_metrics
    from qc.metrics import template_tissues
    from qc.reference import load_reference

    t1 = nib.load(template_dir / "MNI152NLin6Asym_res-2_T1w.nii.gz").get_fdata(dtype=np.float32)
    tm = nib.load(template_dir / "MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz").get_fdata(dtype=np.float32)
    load = lambda k: nib.load(outs[k]).get_fdata(dtype=np.float32)  # noqa: E731
    m = anat_metrics(load("image"), "T1w", t1, tm, template_tissues(t1, tm > 0), load("mask"), load("field"))
    qc = QCConfig()
    ok, _ = evaluate_rules(m, "T1w", qc)
    return ok and not reference_failures(m, "T1w", load_reference(qc.reference_table or None), qc.reference_z_limit), m


@pytest.mark.integration
def test_fast_path_keeps_known_transform_and_qc_decision(tmp_path, shared_data, template_dir):
    """The real neck scan moved by a known affine: the fast defaults recover it within 1 mm and decide as the old."""
    scan = shared_data / "anat" / "niivue_T1w_neck.nii.gz"
    brain = str(template_dir / "MNI152NLin6Asym_res-2_desc-brain_T1w.nii.gz")
    grid = str(template_dir / "MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz")
    fast = AnatConfig()
    old = AnatConfig(n4_working_resolution_mm=0.0, n4_shrink_factor=4, n4_iterations=(50, 50, 50, 50),
                     registration_moving_resolution_mm=0.0)
    ref_xfm, fast_outs = _chain(scan, tmp_path / "fast", fast, brain, grid)
    _, old_outs = _chain(scan, tmp_path / "old", old, brain, grid)
    fast_ok, fm = _decision(fast_outs, template_dir)
    old_ok, om = _decision(old_outs, template_dir)
    assert fast_ok == old_ok, (fm, om)
    assert fm["cjv"] <= om["cjv"] * 1.05 and fm["cnr"] >= om["cnr"] * 0.95

    # Move the scan by a known rotation + translation and register the moved copy.
    img = ants.image_read(str(tmp_path / "fast" / "ras.nii"))
    c = np.asarray(ants.get_center_of_mass(img))
    ang = np.deg2rad(10.0)
    rot = np.array([[1, 0, 0], [0, np.cos(ang), -np.sin(ang)], [0, np.sin(ang), np.cos(ang)]])
    g = np.eye(4)
    g[:3, :3], g[:3, 3] = rot, c + np.array([8.0, -6.0, 5.0]) - rot @ c
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    tx.set_parameters(np.concatenate([g[:3, :3].ravel(), g[:3, 3]]))
    tx.set_fixed_parameters(np.zeros(3))
    gfile = str(tmp_path / "g.mat")
    ants.write_transform(tx, gfile)
    moved = str(tmp_path / "moved.nii.gz")
    ants.image_write(ants.apply_transforms(fixed=img, moving=img, transformlist=[gfile], interpolator="linear"), moved)
    est_xfm, _ = _chain(moved, tmp_path / "moved", fast, brain, grid)
    mask = ants.image_read(grid)
    idx = np.argwhere(mask.numpy() > 0).astype(float)
    pts = (np.asarray(mask.direction) @ (idx * np.asarray(mask.spacing)).T).T + np.asarray(mask.origin)
    pts = np.c_[pts, np.ones(len(pts))]
    truth = np.linalg.inv(g) @ _matrix(ref_xfm)
    err = np.linalg.norm((pts @ _matrix(est_xfm).T - pts @ truth.T)[:, :3], axis=1)
    assert err.mean() <= 1.0, err.mean()


@pytest.mark.integration
def test_cli_prep_with_syn_writes_the_warp_and_beats_the_affine(tmp_path, shared_data, template_dir):
    """`neurocurate prep ... --registration syn` on a small real T1w: composite .h5 written, outputs on the
    template grid, and the scan through the warp correlates with the template better than through the affine."""
    bids = tmp_path / "bids"
    src = shared_data / "corpus" / "sub-nichart01" / "anat" / "sub-nichart01_T1w.nii.gz"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    shutil.copyfile(src, bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    (bids / "dataset_description.json").write_text('{"Name": "syn", "BIDSVersion": "1.9.0"}')
    out = tmp_path / "out"
    code = main(["prep", str(bids), str(out), "participant", "--nprocs", "1", "--omp-nthreads", "1",
                 "--registration", "syn", "--template-dir", str(template_dir), "--no-progress"])
    assert code == 0
    o = anat_outputs(out, {"sub": "01"}, "T1w", 2)
    assert o.warp.is_file() and o.xfm.is_file() and o.warp.name.endswith("_mode-image_xfm.h5")
    meta = json.loads(o.sidecar.read_text())
    assert meta["Transform"] == o.warp.name and meta["Parameters"]["registration"] == "syn"
    grid = nib.load(template_dir / "MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz")
    pre = nib.load(o.preproc)
    assert pre.shape == grid.shape and np.allclose(pre.affine, grid.affine)

    t1 = str(template_dir / "MNI152NLin6Asym_res-2_T1w.nii.gz")
    tmask = grid.get_fdata() > 0
    tpl = nib.load(t1).get_fdata()
    rs = {}
    for kind, xfm in (("affine", o.xfm), ("syn", o.warp)):
        rs[kind] = str(tmp_path / f"{kind}.nii.gz")
        ops.resample_to_template(str(src), t1, str(xfm), rs[kind])
    r = {k: np.corrcoef(nib.load(v).get_fdata()[tmask], tpl[tmask])[0, 1] for k, v in rs.items()}
    assert r["syn"] > r["affine"] + 0.01, r
    r_pre = np.corrcoef(pre.get_fdata()[tmask], tpl[tmask])[0, 1]
    assert r_pre > r["affine"], (r_pre, r)


def _corr(a, b, m):
    return float(np.corrcoef(np.asarray(a)[m], np.asarray(b)[m])[0, 1])


def _dice(a, b):
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.mark.integration
def test_cli_prep_bold_goes_through_the_syn_warp(tmp_path, shared_data, template_dir):
    """`neurocurate prep ... --registration syn` on a subject with BOLD: the BOLD run reaches MNI through the
    composite (affine + SyN) transform.

    One real subject (sub-philipsA: its T1w on a 2 mm grid and 8 volumes of its resting BOLD, to keep the test
    short). The affine run first, then the SyN run in the same work folder: N4, skull strip, affine and the BOLD
    motion/rigid nodes come from its cache, so the two MNI BOLD references differ only by the anatomical
    transform, and the SyN one must be the affine one carried through the warp alone (affine^-1 o composite).
    """
    from nibabel.processing import resample_to_output

    src = shared_data / "corpus" / "sub-philipsA"
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "sub-01" / "func").mkdir(parents=True)
    t1w = nib.load(src / "anat" / "sub-philipsA_T1w.nii.gz")
    nib.save(resample_to_output(t1w, voxel_sizes=(2.0, 2.0, 2.0), order=1),
             bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    raw = nib.load(src / "func" / "sub-philipsA_task-rest_bold.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(raw.dataobj[..., 10:18]), raw.affine, raw.header),
             bids / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz")
    shutil.copyfile(src / "func" / "sub-philipsA_task-rest_bold.json",
                    bids / "sub-01" / "func" / "sub-01_task-rest_bold.json")
    (bids / "dataset_description.json").write_text('{"Name": "synbold", "BIDSVersion": "1.9.0"}')
    # No denoising (8 volumes cannot carry the rest preset's regressors) and lighter N4/SyN levels: the test is
    # about the transform the BOLD run is resampled with, not about their accuracy.
    config = tmp_path / "config.toml"
    config.write_text('[bold]\ndenoise = "none"\ndummy_scans = 0\n'
                      '[anat]\nn4_iterations = [20, 20]\nsyn_iterations = [30, 0]\n')
    work = tmp_path / "work"
    runs = {}
    for kind in ("affine", "syn"):
        out = tmp_path / f"out_{kind}"
        code = main(["prep", str(bids), str(out), "participant", "--nprocs", "2", "--omp-nthreads", "1",
                     "--registration", kind, "--template-dir", str(template_dir), "--work-dir", str(work),
                     "--config", str(config), "--no-progress"])
        assert code == 0, kind
        runs[kind] = (anat_outputs(out, {"sub": "01"}, "T1w", 2),
                      func_outputs(out, {"sub": "01", "task": "rest"}, 2))
    a_anat, a_func = runs["affine"]
    s_anat, s_func = runs["syn"]
    assert s_anat.warp.is_file() and s_anat.warp.name.endswith("_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.h5")
    assert not a_anat.warp.exists()

    grid = nib.load(template_dir / "MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz")
    tmask = grid.get_fdata() > 0
    for f in (s_func.preproc, s_func.boldref, s_func.mask):
        img = nib.load(f)
        assert img.shape[:3] == grid.shape and np.allclose(img.affine, grid.affine), f
    assert nib.load(s_func.preproc).shape[3] >= 5

    aff = ants.image_read(str(a_func.boldref))
    ref_a, ref_s = aff.numpy(), ants.image_read(str(s_func.boldref)).numpy()
    # The affine reference through the warp alone: ANTs applies the list last-first (affine^-1, then composite).
    warped = ants.apply_transforms(fixed=aff, moving=aff, transformlist=[str(s_anat.warp), str(s_anat.xfm)],
                                   whichtoinvert=[False, True], interpolator="linear").numpy()
    head = tmask | (ref_a > 0) | (ref_s > 0)
    moved = np.abs(ref_s - ref_a)[head].mean()
    left = np.abs(ref_s - warped)[head].mean()
    # The warp moved the BOLD output (not a copy of the affine result), and by the anatomical warp.
    assert moved > 0.02 * np.abs(ref_a)[head].mean(), moved
    assert left < 0.5 * moved and _corr(ref_s, warped, head) > 0.99, (left, moved, _corr(ref_s, warped, head))
    assert _corr(ref_s, warped, head) > _corr(ref_s, ref_a, head)
    # The BOLD brain mask lands on the template's at least as well as through the affine.
    d_a, d_s = _dice(nib.load(a_func.mask).get_fdata() > 0, tmask), _dice(nib.load(s_func.mask).get_fdata() > 0, tmask)
    assert d_s >= d_a - 0.01, (d_s, d_a)


def test_thread_count_is_not_part_of_the_node_hash(tmp_path, shared_data):
    """A rerun with another thread count reuses the cached ANTs node; another real parameter reruns it."""
    import copy

    import nipype
    from nipype.pipeline import engine as pe

    from workflows.interfaces.anat import N4Correct

    scan = str(shared_data / "corpus" / "sub-nichart05" / "anat" / "sub-nichart05_T1w.nii.gz")

    def node(threads, iterations=(5, 5)):
        n = pe.Node(N4Correct(iterations=list(iterations), shrink_factor=4, working_resolution_mm=4.0,
                              num_threads=threads), name="n4", base_dir=str(tmp_path))
        n.inputs.in_file = scan
        n.config = copy.deepcopy(nipype.config._sections)  # what Node.run sets; needed to hash before running
        return n

    first = node(1)
    out = first.run().outputs.out_file
    stamp = os.stat(out).st_mtime_ns
    again = node(3)
    assert again._get_hashval()[1] == first._get_hashval()[1]
    assert again.is_cached()[1]  # up to date: nothing to rerun
    assert again.run().outputs.out_file == out and os.stat(out).st_mtime_ns == stamp
    changed = node(1, iterations=(6, 5))
    assert changed._get_hashval()[1] != first._get_hashval()[1] and not changed.is_cached()[1]


@pytest.mark.integration
def test_affine_absorbs_a_tilted_thick_slice_stack(tmp_path, shared_data, template_dir):
    """Issue 16: the glioma's 5.5 mm T2w with its header turned by 12 degrees registers to where the
    untilted scan does (the centre-of-mass start alone fell into a wrong minimum on this stack)."""
    from workflows.ops.transforms import itk_linear_ras

    scan = shared_data / "corpus" / "sub-tciaJ" / "anat" / "sub-tciaJ_T2w.nii.gz"
    template = str(template_dir / "MNI152NLin6Asym_res-2_T2w.nii.gz")
    a = AnatConfig()
    assert a.registration_init_arc_deg > 12
    ras = tmp_path / "ras.nii"
    ops.validate_anat_file(str(scan), str(ras))
    img = nib.load(ras)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    th = np.deg2rad(12.0)
    turn = np.eye(4)
    turn[1:3, 1:3] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
    centre = img.affine @ np.array([*(np.asarray(data.shape) - 1) / 2.0, 1.0])
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3], back[:3, 3] = centre[:3], -centre[:3]
    turn = shift @ turn @ back
    nib.save(nib.Nifti1Image(data, turn @ img.affine), tmp_path / "turned.nii")
    ops.register_affine(str(ras), template, str(tmp_path / "a.mat"), **a.affine_kwargs())
    ops.register_affine(str(tmp_path / "turned.nii"), template, str(tmp_path / "b.mat"), **a.affine_kwargs())
    assert not list(tmp_path.glob("*_init.*"))  # the search's transform and log are cleaned up
    mask = nib.load(template_dir / "MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz")
    pts = nib.affines.apply_affine(mask.affine, np.argwhere(np.asanyarray(mask.dataobj) > 0)[::4])
    expected = nib.affines.apply_affine(turn @ itk_linear_ras(tmp_path / "a.mat"), pts)
    err = np.linalg.norm(nib.affines.apply_affine(itk_linear_ras(tmp_path / "b.mat"), pts) - expected, axis=1)
    assert err.mean() < 2.0, err.mean()
