from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from pipeline.core.bids import check_bids_root, collect_scans, dataset_fingerprint, index_dataset, read_participants
from pipeline.cli import main
from pipeline.core.errors import InputError, NeurocurateError


def _tiny_dataset(root, subjects=("01", "02")):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.9.0"}')
    img = nib.Nifti1Image(np.random.default_rng(0).random((10, 10, 10), dtype=np.float32), np.eye(4))
    for sub in subjects:
        (root / f"sub-{sub}" / "ses-a" / "anat").mkdir(parents=True)
        img.to_filename(root / f"sub-{sub}" / "ses-a" / "anat" / f"sub-{sub}_ses-a_acq-mprage_run-1_T1w.nii.gz")
    return root


def test_not_a_bids_dataset(tmp_path):
    (tmp_path / "sub-01").mkdir()
    with pytest.raises(InputError, match="dataset_description.json is missing"):
        check_bids_root(tmp_path)
    (tmp_path / "dataset_description.json").write_text("{oops")
    with pytest.raises(InputError, match="is not valid JSON"):
        check_bids_root(tmp_path)


def test_collect_keeps_session_and_acquisition(tmp_path):
    layout = index_dataset(_tiny_dataset(tmp_path / "ds"), tmp_path / "work")
    scans = collect_scans(layout, ["sub-02"])
    assert list(scans) == ["02"]
    (scan,) = scans["02"].anat
    assert scan.suffix == "T1w"
    assert scan.entities == {"sub": "02", "ses": "a", "acq": "mprage", "run": "1"}


def test_unknown_participant_label(tmp_path):
    layout = index_dataset(_tiny_dataset(tmp_path / "ds"), tmp_path / "work")
    with pytest.raises(NeurocurateError, match=r"participant label\(s\) 07 not found .*available: 01, 02"):
        collect_scans(layout, ["07"])


def test_index_is_cached_and_refreshed_when_the_dataset_changes(tmp_path):
    ds = _tiny_dataset(tmp_path / "ds")
    work = tmp_path / "work"
    index_dataset(ds, work)
    db_file = next((work / "bids_db").glob("*.sqlite"))
    mtime = db_file.stat().st_mtime_ns
    before = dataset_fingerprint(ds)
    layout = index_dataset(ds, work)
    assert db_file.stat().st_mtime_ns == mtime, "an unchanged dataset must not be re-crawled"
    assert layout.get_subjects() == ["01", "02"]
    shutil.copytree(ds / "sub-01", ds / "sub-03")
    for f in (ds / "sub-03").rglob("*.nii.gz"):
        f.rename(f.with_name(f.name.replace("sub-01", "sub-03")))
    assert dataset_fingerprint(ds) != before
    assert index_dataset(ds, work).get_subjects() == ["01", "02", "03"]


def test_malformed_participants_table(tmp_path):
    ds = _tiny_dataset(tmp_path / "ds")
    (ds / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\textra\n")
    with pytest.raises(InputError, match=r"participants\.tsv: malformed participants table: line 2"):
        read_participants(ds)


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = main(["prep", str(tmp_path), str(tmp_path / "out"), "participant"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "dataset_description.json is missing" in err
    ds = _tiny_dataset(tmp_path / "ds")
    code = main(["prep", str(ds), str(tmp_path / "out"), "participant", "--participant-label", "99"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "99 not found" in err


def test_duplicate_scan_skips_only_its_subject(tmp_path):
    ds = _tiny_dataset(tmp_path / "ds")
    src = ds / "sub-01/ses-a/anat/sub-01_ses-a_acq-mprage_run-1_T1w.nii.gz"
    nib.save(nib.load(src), src.with_name("sub-01_ses-a_acq-mprage_run-01_T1w.nii.gz"))
    layout = index_dataset(ds, tmp_path / "work")
    errors = {}
    scans = collect_scans(layout, errors=errors)
    assert list(scans) == ["02"]
    assert list(errors) == ["01"] and "duplicate of" in str(errors["01"])
    with pytest.raises(InputError, match="duplicate of"):
        collect_scans(layout, ["01"])
