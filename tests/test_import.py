"""Import of precomputed ROI series: readers, ABIDE phenotypes, partial failures, real ABIDE files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import ImportConfig
from pipeline.core.errors import InputError
from pipeline.stages.import_series import (
    abide_file_id,
    import_timeseries,
    load_abide_phenotypes,
    merge_participants,
    read_series,
)

PHENO_HEADER = "FILE_ID,SUB_ID,SITE_ID,DX_GROUP,SEX,AGE_AT_SCAN,FIQ\n"


def _write_1d(path, series):
    header = "\t".join(f"#{i + 1}" for i in range(series.shape[1]))
    body = "\n".join("\t".join(f"{v:.6f}" for v in row) for row in series)
    path.write_text(header + "\n" + body + "\n")
    return path


@pytest.fixture()
def toy_abide(tmp_path):
    rng = np.random.default_rng(0)
    rois = tmp_path / "rois_cc200"
    rois.mkdir()
    s1 = rng.standard_normal((120, 5))
    s1[:, 2] = 0.0  # ROI outside the field of view
    _write_1d(rois / "NYU_0050952_rois_cc200.1D", s1)
    _write_1d(rois / "UCLA_1_0051201_rois_cc200.1D", rng.standard_normal((40, 5)))
    _write_1d(rois / "UM_1_0050272_rois_cc200.1D", rng.standard_normal((130, 5)))
    _write_1d(rois / "NYU_0099999_rois_cc200.1D", rng.standard_normal((120, 5)))  # no phenotype row
    (rois / "USM_0050433_rois_cc200.1D").write_text("#1\t#2\n1.0\t2.0\n3.0\n")  # ragged: malformed
    pheno = tmp_path / "pheno.csv"
    pheno.write_text(
        PHENO_HEADER
        + "NYU_0050952,50952,NYU,1,1,13.5,110\n"
        + "UCLA_1_0051201,51201,UCLA_1,2,2,-9999,-9999\n"
        + "UM_1_0050272,50272,UM_1,2,1,14.2,98\n"
        + "USM_0050433,50433,USM,1,1,20.0,100\n"
    )
    return rois, pheno, s1


def test_read_series_formats(tmp_path):
    data = np.arange(12, dtype=float).reshape(4, 3) * 1.5
    one_d = _write_1d(tmp_path / "a.1D", data)
    series, names = read_series(one_d, "CC200")
    np.testing.assert_allclose(series, data, atol=1e-6)
    assert names == ("CC200_1", "CC200_2", "CC200_3")
    tsv = tmp_path / "b.tsv"
    tsv.write_text("V1\tV2\tV3\n" + "\n".join("\t".join(map(str, r)) for r in data) + "\n")
    assert read_series(tsv)[1] == ("V1", "V2", "V3")
    csv = tmp_path / "c.csv"
    csv.write_text("\n".join(",".join(map(str, r)) for r in data) + "\n")
    series, names = read_series(csv, "Custom")
    np.testing.assert_allclose(series, data)
    assert names == ("Custom_1", "Custom_2", "Custom_3")
    npy = tmp_path / "d.npy"
    np.save(npy, data)
    np.testing.assert_allclose(read_series(npy)[0], data)


def test_read_series_malformed(tmp_path):
    ragged = tmp_path / "ragged.1D"
    ragged.write_text("#1\t#2\n1\t2\n3\n")
    with pytest.raises(InputError, match=r"ragged\.1D: line 3: 1 columns, expected 2"):
        read_series(ragged)
    text = tmp_path / "text.1D"
    text.write_text("#1\t#2\n1\t2\n3\tabc\n")
    with pytest.raises(InputError, match=r"text\.1D: line 3: non-numeric"):
        read_series(text)
    empty = tmp_path / "empty.1D"
    empty.write_text("#1\t#2\n")
    with pytest.raises(InputError, match=r"empty\.1D: series file holds no data rows"):
        read_series(empty)
    header = tmp_path / "header.1D"
    header.write_text("#1\t#2\t#3\n1\t2\n")
    with pytest.raises(InputError, match=r"header\.1D: header names 3 ROIs but rows have 2"):
        read_series(header)
    bad_npy = tmp_path / "bad.npy"
    np.save(bad_npy, np.zeros(3))
    with pytest.raises(InputError, match=r"bad\.npy: expected a 2-D numeric array"):
        read_series(bad_npy)


def test_abide_file_id():
    assert abide_file_id("x/NYU_0050952_rois_cc200.1D") == "NYU_0050952"
    assert abide_file_id("MaxMun_a_0051318_rois_cc200.1D") == "MaxMun_a_0051318"


def test_import_collects_errors_and_writes_contract(toy_abide, tmp_path):
    rois, pheno, s1 = toy_abide
    out = tmp_path / "derivs"
    report = import_timeseries([rois], out, ImportConfig(), phenotypes=pheno)
    assert sorted(r.subject for r in report.runs) == ["0050272", "0050952", "0051201"]
    assert len(report.errors) == 2
    assert any("NYU_0099999_rois_cc200.1D: FILE_ID 'NYU_0099999' has no row" in e for e in report.errors)
    assert any("USM_0050433_rois_cc200.1D: line 3" in e for e in report.errors)
    assert any("sub-0051201" in w and "age" in w for w in report.warnings)
    assert report.too_short == ["UCLA_1_0051201_rois_cc200.1D: 40 volumes < 100"]

    tsv = out / "sub-0050952" / "func" / "sub-0050952_task-rest_atlas-CC200_timeseries.tsv"
    side = json.loads(tsv.with_suffix(".json").read_text())
    assert side["Source"] == "imported"
    assert side["AtlasName"] == "CC200"
    assert side["RepetitionTime"] == 2.0
    assert side["NumberOfVolumes"] == 120
    assert side["ZeroVarianceROIs"] == ["CC200_3"]
    assert side["ROINames"] == [f"CC200_{i}" for i in range(1, 6)]
    values = pd.read_csv(tsv, sep="\t").to_numpy()
    np.testing.assert_allclose(values, s1, atol=1e-6)
    ucla = json.loads((out / "sub-0051201/func/sub-0051201_task-rest_atlas-CC200_timeseries.json").read_text())
    assert ucla["RepetitionTime"] == 3.0 and ucla["NumberOfVolumes"] == 40

    parts = pd.read_csv(out / "participants.tsv", sep="\t", keep_default_na=False)
    assert list(parts.columns[:5]) == ["participant_id", "age", "sex", "diagnosis", "site"]
    row = parts.set_index("participant_id").loc["sub-0050952"]
    assert (row["sex"], row["diagnosis"], row["site"], float(row["age"])) == ("M", "autism", "NYU", 13.5)
    ucla_row = parts.set_index("participant_id").loc["sub-0051201"]
    assert (ucla_row["age"], ucla_row["fiq"], ucla_row["sex"], ucla_row["diagnosis"]) == ("n/a", "n/a", "F", "control")
    assert (out / "dataset_description.json").exists()


def test_filters_and_participants_merge(toy_abide, tmp_path):
    rois, pheno, _ = toy_abide
    out = tmp_path / "derivs"
    out.mkdir()
    (out / "participants.tsv").write_text("participant_id\tage\tsex\nsub-keep\t30\tF\n")
    report = import_timeseries([rois], out, ImportConfig(), phenotypes=pheno, sites=["nyu", "UM_1"], limit=1)
    assert [r.subject for r in report.runs] == ["0050952"]
    report = import_timeseries([rois], out, ImportConfig(repetition_time=1.5), phenotypes=pheno, participant_labels=["sub-0050272"])
    assert [r.subject for r in report.runs] == ["0050272"] and report.runs[0].repetition_time == 1.5
    parts = pd.read_csv(out / "participants.tsv", sep="\t")
    assert sorted(parts["participant_id"]) == ["sub-0050272", "sub-0050952", "sub-keep"]
    merge_participants(out / "participants.tsv", {"sub-keep": {"age": 31.0}})
    parts = pd.read_csv(out / "participants.tsv", sep="\t")
    assert parts.set_index("participant_id").loc["sub-keep", "age"] == 31.0
    assert len(parts) == 3


def test_generic_files_without_phenotypes(tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "sub-ab12_task-rest_bold.npy", rng.standard_normal((150, 4)))
    np.save(src / "sub-ab12_task-rest_run-2_bold.npy", rng.standard_normal((150, 4)))
    np.save(src / "patient-07.npy", rng.standard_normal((150, 4)))
    out = tmp_path / "derivs"
    report = import_timeseries([src], out, ImportConfig(atlas_name="MyAtlas"))
    assert sorted(r.subject for r in report.runs) == ["ab12", "ab12", "patient07"]
    assert (out / "sub-ab12/func/sub-ab12_task-rest_run-2_atlas-MyAtlas_timeseries.tsv").exists()
    side = json.loads((out / "sub-ab12/func/sub-ab12_task-rest_atlas-MyAtlas_timeseries.json").read_text())
    assert side["RepetitionTime"] is None
    assert any("RepetitionTime unknown" in w for w in report.warnings)
    assert not (out / "participants.tsv").exists()
    with pytest.raises(InputError, match="needs the phenotypic CSV"):
        import_timeseries([src], out, ImportConfig(), sites=["NYU"])
    with pytest.raises(InputError, match="must be alphanumeric"):
        import_timeseries([src], out, ImportConfig(atlas_name="cc-200"))


def test_phenotype_file_errors(tmp_path):
    bad = tmp_path / "pheno.csv"
    bad.write_text("FILE_ID,SITE_ID\nNYU_1,NYU\n")
    with pytest.raises(InputError, match=r"pheno\.csv: missing column\(s\) \['SUB_ID'"):
        load_abide_phenotypes(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text(PHENO_HEADER + "NYU_1,1,NYU,1,1,10,100\nNYU_1,1,NYU,1,1,10,100\n")
    with pytest.raises(InputError, match=r"dup\.csv: FILE_ID 'NYU_1' appears more than once"):
        load_abide_phenotypes(dup)


def test_cli_exit_code_partial(toy_abide, tmp_path, capsys):
    from pipeline.cli import main

    rois, pheno, _ = toy_abide

    def cli(*argv: str) -> int:
        return main(["import-timeseries", *argv])
    assert cli(str(rois), "-o", str(tmp_path / "d"), "--phenotypes", str(pheno)) == 3
    assert "imported 3 run(s); 2 file(s) failed" in capsys.readouterr().err
    # every file needs a phenotype row, whatever the filters
    assert cli(str(rois), "-o", str(tmp_path / "d2"), "--phenotypes", str(pheno), "--sites", "UM_1") == 3
    err = capsys.readouterr().err
    assert "imported 1 run(s); 1 file(s) failed" in err and "UCLA" not in err
    good = [str(rois / "UM_1_0050272_rois_cc200.1D"), str(rois / "NYU_0050952_rois_cc200.1D")]
    assert cli(*good, "-o", str(tmp_path / "d3"), "--phenotypes", str(pheno), "--tr", "2.5") == 0
    assert "imported 2 run(s); 0 file(s) failed; 1 run(s) with zero-variance ROIs" in capsys.readouterr().out
    assert (tmp_path / "d3" / "neurocurate_import_config.toml").exists()
    bad = tmp_path / "only_bad"
    bad.mkdir()
    (bad / "USM_0050433_rois_cc200.1D").write_text("garbage\n")
    assert cli(str(bad), "-o", str(tmp_path / "d4"), "--phenotypes", str(pheno)) == 2


def test_real_abide_subset(shared_data, tmp_path):
    abide = shared_data / "abide"
    pheno = abide / "Phenotypic_V1_0b_preprocessed1.csv"
    report = import_timeseries(
        [abide / "rois_cc200" / "NYU_0051062_rois_cc200.1D", abide / "rois_cc200" / "Trinity_0050232_rois_cc200.1D"],
        tmp_path, ImportConfig(), phenotypes=pheno,
    )
    assert report.ok, report.errors
    by_subject = {r.subject: r for r in report.runs}
    assert by_subject["0051062"].zero_variance_rois == ("CC200_43",)
    assert by_subject["0051062"].n_volumes == 176 and by_subject["0051062"].repetition_time == 2.0
    assert by_subject["0050232"].site == "TRINITY" and by_subject["0050232"].n_volumes == 146
    parts = pd.read_csv(tmp_path / "participants.tsv", sep="\t").set_index("participant_id")
    assert parts.loc["sub-0050232", "diagnosis"] == "autism" and parts.loc["sub-0050232", "age"] == 23.08
    series = pd.read_csv(by_subject["0050232"].output, sep="\t")
    assert series.shape == (146, 200)
