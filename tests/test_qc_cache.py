"""Add one subject cheaply (issue 13): the QC metric cache, unchanged reports left alone, a lone scan on every core.

The group step re-measures only new or changed scans and never takes a decision from the cache. Every QC test
drives ``neurocurate qc OUT`` and reads its counters (``QC metrics: N scan(s) measured, M from
the cache``; ``QC reports: N subject report(s) drawn, M unchanged``) rather than timing anything.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from test_reports import make_synthetic_output

from pipeline.core.derivatives import anat_outputs
from pipeline.core.layout import OutputLayout

# The classifier layer is not what these tests are about; leaving it out keeps them about the cache.
BASE_TOML = "[qc]\nclassifier = false\n"
N_SCANS = 5  # sub-01: T1w, BOLD, ROI series; sub-02: two T1w (sub-03 has only a crash log)
MISLABEL = "sub-02/anat/sub-02_acq-mislabel_space-MNI152NLin6Asym_res-2_desc-preproc_T1w.nii.gz"  # T2 contrast
CLEAN = "sub-01/anat/sub-01_space-MNI152NLin6Asym_res-2_desc-preproc_T1w.nii.gz"


def _qc(out: Path, config: Path, capsys) -> tuple[int, int, int, int]:
    """Run ``neurocurate qc OUT --config FILE``; (measured, cached, reports drawn, reports unchanged)."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main(["qc", str(out), "--config", str(config)])
    text = capsys.readouterr().out
    assert code == 0, text
    m = re.search(r"QC metrics: (\d+) scan\(s\) measured, (\d+) from the cache", text)
    r = re.search(r"QC reports: (\d+) subject report\(s\) drawn, (\d+) unchanged", text)
    assert m and r, text
    return int(m[1]), int(m[2]), int(r[1]), int(r[2])


def _table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(OutputLayout(out).curation_table).set_index("path")


def _report_mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in OutputLayout(out).reports_dir.glob("sub-*.html")}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> Path:
    """A synthetic OUTPUT_DIR after one group run (every scan measured once)."""
    root = tmp_path_factory.mktemp("qc_cache")
    out = make_synthetic_output(root)
    (root / "base.toml").write_text(BASE_TOML)
    from pipeline.cli import main

    assert main(["qc", str(out), "--config", str(root / "base.toml")]) == 0
    return out


@pytest.fixture
def out(measured: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(measured, copy, symlinks=True)
    return copy


def _config(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.toml')))}.toml"
    path.write_text(BASE_TOML + text)
    return path


def test_first_run_measures_every_scan(tmp_path: Path, capsys) -> None:
    out = make_synthetic_output(tmp_path)
    measured_, cached, drawn, unchanged = _qc(out, _config(tmp_path), capsys)
    assert (measured_, cached) == (N_SCANS, 0)
    assert (drawn, unchanged) == (3, 0)
    assert len(list(OutputLayout(out).qc_cache_dir.glob("*.json"))) == N_SCANS


def test_second_run_on_unchanged_data_measures_nothing_and_gives_the_same_table(out: Path, tmp_path: Path,
                                                                                 capsys) -> None:
    layout = OutputLayout(out)
    before_table, before_tsv = _table(out), layout.curation_tsv.read_bytes()
    before_reports = _report_mtimes(out)
    assert _qc(out, _config(tmp_path), capsys) == (0, N_SCANS, 0, 3)
    # Metrics read back from the cache are the measured numbers: the table is the same, byte for byte.
    pd.testing.assert_frame_equal(_table(out), before_table)
    assert layout.curation_tsv.read_bytes() == before_tsv
    assert _report_mtimes(out) == before_reports  # no report drawn again


def test_changed_derivative_is_measured_again_and_its_decision_changes(out: Path, tmp_path: Path, capsys) -> None:
    assert not _table(out).loc[MISLABEL, "qc_pass"]
    before_reports = _report_mtimes(out)
    img = nib.load(out / CLEAN)  # the T2-contrast scan labelled T1w is replaced by a (brighter) T1w
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj) * np.float32(1.2), img.affine), out / MISLABEL)
    assert _qc(out, _config(tmp_path), capsys) == (1, N_SCANS - 1, 1, 2)
    table = _table(out)
    assert table.loc[MISLABEL, "qc_pass"]
    assert table.loc[MISLABEL, "wm_gm_ratio"] == pytest.approx(table.loc[CLEAN, "wm_gm_ratio"])
    after = _report_mtimes(out)
    assert after["sub-02.html"] != before_reports["sub-02.html"]
    assert {k: v for k, v in after.items() if k != "sub-02.html"} == \
        {k: v for k, v in before_reports.items() if k != "sub-02.html"}
    # The stale entry is pruned: one entry per scan.
    assert len(list(OutputLayout(out).qc_cache_dir.glob("*.json"))) == N_SCANS


def test_changed_companion_file_invalidates_the_scan(out: Path, tmp_path: Path, capsys) -> None:
    bias = anat_outputs(out, {"sub": "01"}, "T1w", 2).biasfield
    img = nib.load(bias)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj) * np.float32(1.5), img.affine), bias)
    measured_, cached, _, _ = _qc(out, _config(tmp_path), capsys)
    assert (measured_, cached) == (1, N_SCANS - 1)


def test_changed_threshold_changes_the_decision_without_measuring(out: Path, tmp_path: Path, capsys) -> None:
    series = _table(out).query("modality == 'timeseries'")
    assert not series["qc_pass"].item()  # a quarter of its ROIs has zero variance (limit 0.1)
    cfg = _config(tmp_path, "[qc.timeseries]\nmax_zero_variance_fraction = 0.5\n")
    measured_, cached, drawn, unchanged = _qc(out, cfg, capsys)
    assert (measured_, cached) == (0, N_SCANS)
    assert _table(out).query("modality == 'timeseries'")["qc_pass"].item()
    assert (drawn, unchanged) == (1, 2)  # sub-01's report shows the new decision
    # and back: the old decision returns, still without measuring
    assert _qc(out, _config(tmp_path), capsys)[:2] == (0, N_SCANS)
    assert not _table(out).query("modality == 'timeseries'")["qc_pass"].item()


def test_changed_reference_limit_changes_decisions_without_measuring(out: Path, tmp_path: Path, capsys) -> None:
    before = _table(out)
    cfg = _config(tmp_path)
    cfg.write_text("[qc]\nclassifier = false\nreference_z_limit = 0.01\n")
    assert _qc(out, cfg, capsys)[:2] == (0, N_SCANS)
    after = _table(out)
    assert after.loc[CLEAN, "qc_pass"] != before.loc[CLEAN, "qc_pass"]
    assert "reference" in after.loc[CLEAN, "qc_layer"]


def test_metric_setting_invalidates_only_the_scans_it_affects(out: Path, tmp_path: Path, capsys) -> None:
    before = _table(out)
    cfg = _config(tmp_path)
    cfg.write_text("[qc]\nclassifier = false\nmi_bins = 32\n")
    assert _qc(out, cfg, capsys)[:2] == (3, 2)  # the three T1w; BOLD and ROI series do not use mi_bins
    after = _table(out)
    assert after.loc[CLEAN, "mi"] != before.loc[CLEAN, "mi"]


def test_new_subject_is_the_only_scan_measured(out: Path, tmp_path: Path, capsys) -> None:
    src = anat_outputs(out, {"sub": "01"}, "T1w", 2)
    dst = anat_outputs(out, {"sub": "04"}, "T1w", 2)
    dst.preproc.parent.mkdir(parents=True)
    shutil.copyfile(src.mask, dst.mask)
    shutil.copyfile(src.biasfield, dst.biasfield)
    img = nib.load(src.preproc)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj) * np.float32(1.1), img.affine), dst.preproc)
    before_reports = _report_mtimes(out)
    measured_, cached, drawn, unchanged = _qc(out, _config(tmp_path), capsys)
    assert (measured_, cached) == (1, N_SCANS)
    assert "sub-04.html" not in before_reports and "sub-04.html" in _report_mtimes(out)
    assert drawn >= 1 and drawn + unchanged == 4
    # A copy with the same content as a measured scan is found by its content, under any name.
    shutil.copyfile(src.preproc, dst.preproc)
    assert _qc(out, _config(tmp_path), capsys)[:2] == (0, N_SCANS + 1)
    table = _table(out)
    assert table.loc[dst.preproc.relative_to(out).as_posix(), "snr"] == table.loc[CLEAN, "snr"]


def test_corrupt_cache_entry_is_measured_again(out: Path, tmp_path: Path, capsys) -> None:
    for entry in OutputLayout(out).qc_cache_dir.glob("*.json"):
        entry.write_text("{not json")
    assert _qc(out, _config(tmp_path), capsys)[:2] == (N_SCANS, 0)
    assert _qc(out, _config(tmp_path), capsys)[:2] == (0, N_SCANS)


def test_fewer_scans_than_processes_get_more_threads_per_node() -> None:
    from pipeline.core.config import ExecutionConfig
    from pipeline.stages.prep import scan_threads

    auto = ExecutionConfig(nprocs=2, omp_nthreads=1, mem_gb=8.0)  # as resolve_execution makes [execution] 0/0
    assert scan_threads(auto, 0, 1).omp_nthreads == 2  # a lone subject's chain runs on both cores
    assert scan_threads(auto, 0, 10).omp_nthreads == 1
    big = ExecutionConfig(nprocs=16, omp_nthreads=8, mem_gb=8.0)
    assert scan_threads(big, 0, 1).omp_nthreads == 8 and scan_threads(big, 0, 4).omp_nthreads == 8
    assert scan_threads(ExecutionConfig(nprocs=16, omp_nthreads=2, mem_gb=8.0), 0, 4).omp_nthreads == 4
    assert scan_threads(auto, 1, 1).omp_nthreads == 1  # an explicit --omp-nthreads is kept
    slurm = ExecutionConfig(plugin="SLURM", nprocs=2, omp_nthreads=1, mem_gb=8.0)
    assert scan_threads(slurm, 0, 1).omp_nthreads == 1  # nodes leave the machine: its cores are not theirs
