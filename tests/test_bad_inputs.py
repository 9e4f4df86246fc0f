"""Every bad input of the corpus gives ONE line that names the file and the reason, and costs nothing else."""

from __future__ import annotations

import re

import pytest

from bad_inputs.corpus import CASES, Ctx


# The bad inputs issue 8 names, each with at least one case in the corpus.
ISSUE_8 = {
    "truncated_nii_gz", "zero_byte_file", "t1w_4d", "nan_inf_voxels", "all_zero_image", "degenerate_affine",
    "qform_ne_sform", "missing_repetition_time", "too_few_bold_volumes", "header_sidecar_tr_mismatch",
    "malformed_participants_tsv", "non_bids_names", "missing_dataset_description", "duplicate_runs",
    "unreadable_file", "corrupted_shard", "corrupted_checkpoint", "atlas_label_table_mismatch",
    "phenotype_row_without_labels", "disk_full_writing_shard",
}


def test_corpus_covers_the_issue():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)) >= 20
    assert ISSUE_8 <= set(names), sorted(ISSUE_8 - set(names))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gives_one_line_naming_the_file(case, tmp_path, monkeypatch):
    ctx = Ctx(tmp_path, monkeypatch)
    built = case.build(ctx)
    message = case.trigger(ctx, built)
    assert message.strip(), "no message at all"
    assert "\n" not in message.strip(), f"not one line:\n{message}"
    named = str(built.offending) if case.full_path else built.offending.name
    assert named in message, (named, message)
    assert re.search(case.reason, message), (case.reason, message)
    assert "Traceback" not in message
    if case.verify is not None:
        case.verify(ctx, built)


@pytest.mark.integration
def test_prep_reports_a_truncated_scan_and_keeps_the_good_subject(tmp_path, shared_data, capsys):
    """A real ``neurocurate prep`` run: the broken subject is named in the log, its crash file and its report."""
    import shutil

    from pipeline.cli import main
    from pipeline.core.errors import EXIT_PARTIAL
    from pipeline.core.derivatives import anat_outputs

    templates = shared_data / "templates"
    bids = tmp_path / "bids"
    (bids / "sub-good/anat").mkdir(parents=True)
    (bids / "sub-bad/anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "one good, one bad", "BIDSVersion": "1.9.0"}')
    # The 2 mm template stands in for a head scan: real anatomy, and the smallest image that registers.
    shutil.copyfile(templates / "MNI152NLin6Asym_res-2_T1w.nii.gz", bids / "sub-good/anat/sub-good_T1w.nii.gz")
    raw = (templates / "MNI152NLin6Asym_res-2_T1w.nii.gz").read_bytes()
    bad = bids / "sub-bad/anat/sub-bad_T1w.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"

    code = main(["prep", str(bids), str(out), "participant", "--skull-strip", "template", "--nprocs", "2",
                 "--template-dir", str(templates)])

    assert code == EXIT_PARTIAL
    printed = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(printed) == 1 and "sub-bad_T1w.nii.gz" in printed[0] and "cannot be read as NIfTI" in printed[0]
    crash = list((out / "logs").glob("sub-bad_*_crash.txt"))
    assert len(crash) == 1
    first = crash[0].read_text().splitlines()[0]
    assert "sub-bad_T1w.nii.gz" in first and "cannot be read as NIfTI" in first
    assert not list((out / "logs").glob("sub-good_*"))
    assert "cannot be read as NIfTI" in (out / "reports" / "sub-bad.html").read_text()
    good = anat_outputs(out, {"sub": "good"}, "T1w", 2)
    assert good.preproc.is_file() and good.mask.is_file()
