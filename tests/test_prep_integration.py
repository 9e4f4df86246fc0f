"""End to end on real head scans: `neurocurate prep BIDS OUT participant`, then a rerun that does no work."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.core.derivatives import anat_outputs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def processed(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("prep")
    bids = root / "bids"
    anat = shared_data / "anat"
    files = {
        "sub-01/anat/sub-01_T1w.nii.gz": anat / "colin27_T1w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz": anat / "niivue_T1w_neck.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_acq-fast_T2w.nii.gz": anat / "niivue_T2w.nii.gz",
    }
    for rel, src in files.items():
        (bids / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, bids / rel)
    # A broken subject must not stop the others.
    bad = nib.load(anat / "colin27_T1w.nii.gz")
    data = np.asarray(bad.dataobj, dtype=np.float32)
    data[10:20, 10:20, 10:20] = np.nan
    (bids / "sub-03/anat").mkdir(parents=True)
    nib.Nifti1Image(data, bad.affine).to_filename(bids / "sub-03/anat/sub-03_T1w.nii.gz")
    (bids / "dataset_description.json").write_text('{"Name": "real heads", "BIDSVersion": "1.9.0"}')
    (bids / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t33\tM\nsub-02\t41\tF\nsub-03\t25\tF\n")
    out = root / "out"
    argv = ["prep", str(bids), str(out), "participant", "--nprocs", "2", "--template-dir", str(shared_data / "templates")]
    code = main(argv)
    return {"bids": bids, "out": out, "argv": argv, "code": code, "template_dir": shared_data / "templates"}


SCANS = [({"sub": "01"}, "T1w"), ({"sub": "02", "ses": "1"}, "T1w"), ({"sub": "02", "ses": "1", "acq": "fast"}, "T2w")]


def test_partial_exit_code_and_crash_log_names_the_file(processed):
    assert processed["code"] == 3
    logs = list((processed["out"] / "logs").glob("sub-03_*_crash.txt"))
    assert logs, "the failing subject gets a crash log"
    first = logs[0].read_text().splitlines()[0]
    assert "sub-03_T1w.nii.gz" in first and "NaN/Inf" in first
    assert not list((processed["out"] / "logs").glob("sub-0[12]_*"))


@pytest.mark.parametrize(("entities", "modality"), SCANS)
def test_outputs_on_template_grid_with_plausible_brain(processed, entities, modality):
    out = anat_outputs(processed["out"], entities, modality, 2)
    for path in (out.preproc, out.mask, out.biasfield, out.xfm, out.sidecar):
        assert path.is_file(), path
    grid = nib.load(processed["template_dir"] / "MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz")
    img, mask = nib.load(out.preproc), nib.load(out.mask)
    for im in (img, mask):
        assert im.shape == grid.shape and np.allclose(im.affine, grid.affine)
    brain = mask.get_fdata() > 0
    volume_cm3 = brain.sum() * np.prod(mask.header.get_zooms()) / 1000
    assert 900 < volume_cm3 < 2000
    tpl_name = "MNI152NLin6Asym_res-2_T1w.nii.gz" if modality == "T1w" else "MNI152NLin6Asym_res-2_T2w.nii.gz"
    tpl = nib.load(processed["template_dir"] / tpl_name).get_fdata()
    tpl_mask = grid.get_fdata() > 0
    r = np.corrcoef(img.get_fdata()[tpl_mask], tpl[tpl_mask])[0, 1]
    assert r > (0.5 if modality == "T1w" else 0.3), r


def test_sidecar_and_dataset_description(processed):
    import json

    out = processed["out"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "neurocurate"
    side = json.loads(anat_outputs(out, {"sub": "02", "ses": "1"}, "T1w").sidecar.read_text())
    assert side["Sources"] == ["bids:raw:sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"]
    assert {"antspyx", "nipype", "neurocurate"} <= set(side["SoftwareVersions"])
    assert side["SkullStripMethod"] == "deepbet"
    assert side["Parameters"]["registration_metric"] == "mattes"
    t2 = json.loads(anat_outputs(out, {"sub": "02", "ses": "1", "acq": "fast"}, "T2w").sidecar.read_text())
    assert t2["SpatialReference"]["Template"].endswith("T2w.nii.gz") and t2["SkullStripMethod"] == "template"
    assert (out / "neurocurate_config.toml").is_file()
    assert "sub-02\t41\tF" in (out / "participants.tsv").read_text()
    written = {p.relative_to(out).parts[0] for p in out.iterdir()}
    from pipeline.core.layout import OutputLayout

    qc_cache = OutputLayout(out).qc_cache_dir.name  # the subject reports' QC metric cache (issue 13)
    assert written <= {"dataset_description.json", "participants.tsv", "neurocurate_config.toml", "sub-01", "sub-02",
                       "logs", "reports", ".work", qc_cache}
    # Affine is the default: no SyN warp is written.
    assert not anat_outputs(out, {"sub": "01"}, "T1w").warp.exists()


def test_subject_reports_drawn_by_graph_nodes_and_failed_subject_by_main(processed):
    """Finished subjects' reports come from their report node on a worker; the failed one's (with its crash)
    from the main process after the run (issue 17: no per-subject work left serial in the main process)."""
    from nipype.utils.filemanip import loadpkl

    from pipeline.core.layout import OutputLayout

    out = processed["out"]
    layout = OutputLayout(out)
    work = out / ".work" / "neurocurate_wf"
    for sub in ("01", "02"):
        result = loadpkl(work / f"sub_{sub}_wf" / "subject_report" / "result_subject_report.pklz")
        assert result.outputs.out_report == str(layout.subject_report(sub))
        assert layout.subject_report(sub).is_file()
    assert not (work / "sub_03_wf" / "subject_report" / "result_subject_report.pklz").exists()
    assert "sub-03_T1w.nii.gz" in layout.subject_report("03").read_text()


def test_rerun_does_no_work(processed):
    out = processed["out"]
    register_result = next((out / ".work").rglob("register/result_register.pklz"))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("sub-0[12]/**/*") if p.is_file()}
    before[register_result] = register_result.stat().st_mtime_ns
    code = main(processed["argv"] + ["--participant-label", "01", "02"])
    assert code == 0
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before
