"""Layer 4 reads a scan from a site with enough scans against that site's typical scan (issue 16), via the CLI.

Seven synthetic T1w scans of one site share a style the shipped classifier takes for an artifact on its own (a
residual intensity trend and a noise floor in the air, as the 2 mm 8-bit NiChart scans have); one of them also
has a strong extra trend. ``neurocurate qc OUT`` must keep the six and reject the seventh; without the site (or
with calibration off, or too few scans) the six are rejected by the classifier.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.core.derivatives import anat_outputs, raw_source, raw_source_uri
from pipeline.core.layout import OutputLayout
from pipeline.core.templates import get_template

N_STYLE = 6


@pytest.fixture(scope="module")
def site_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site") / "out"
    t1_img = nib.load(get_template(2, "T1w"))
    t1 = np.asanyarray(t1_img.dataobj).astype(np.float32)
    mask = np.asanyarray(nib.load(get_template(2, "mask", "brain")).dataobj).astype(np.uint8)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in t1.shape], indexing="ij")
    scale = float(np.percentile(t1[mask > 0], 99))
    rng = np.random.default_rng(0)
    rows = ["participant_id\tsite\tscanner"]
    for i in range(N_STYLE + 1):
        image = t1 * (1 + 0.3 * (grid[2] + 0.2 * rng.normal())) + np.abs(rng.normal(0, 0.04 * scale, t1.shape))
        field = np.ones_like(t1)
        if i == N_STYLE:  # worse than its own site: a strong field along A-P, which N4 measured and left a part of
            field = (1 + 0.8 * grid[1]).astype(np.float32)
            image = image * field
        o = anat_outputs(out, {"sub": f"{i:02d}"}, "T1w", 2)
        o.preproc.parent.mkdir(parents=True, exist_ok=True)
        for path, data in ((o.preproc, image), (o.mask, mask), (o.biasfield, field)):
            nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32 if data.dtype != np.uint8 else np.uint8),
                                     t1_img.affine), path)
        o.sidecar.write_text(json.dumps({"Sources": ["bids:raw:x"], "Parameters": {}}))
        rows.append(f"sub-{i:02d}\tOld\tn/a")
    (out / "participants.tsv").write_text("\n".join(rows) + "\n")
    return out


def _qc(out: Path, tmp_path: Path, toml: str, capsys) -> pd.DataFrame:
    from pipeline.cli import main

    cfg = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.toml')))}.toml"
    cfg.write_text(toml)
    capsys.readouterr()
    assert main(["qc", str(out), "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"QC metrics: \d+ scan\(s\) measured", text), text
    return pd.read_parquet(OutputLayout(out).curation_table).set_index("subject")


def test_a_site_style_is_not_an_artifact_but_a_scan_worse_than_its_site_is(site_output: Path, tmp_path: Path,
                                                                          capsys) -> None:
    table = _qc(site_output, tmp_path, "", capsys)  # defaults: site column "site", calibration from 5 scans
    style = [f"{i:02d}" for i in range(N_STYLE)]
    assert table.loc[style, "qc_pass"].all(), table.loc[style, ["p_artifact", "qc_reason"]]
    assert (table.loc[style, "p_artifact"] < 0.01).all()
    worse = table.loc[f"{N_STYLE:02d}"]
    assert not worse["qc_pass"]
    # Read against its site, the seventh scan stands far above the six (the operating point itself is the
    # benchmark's choice and may move; the separation is what the calibration must give).
    assert worse["p_artifact"] > 0.5
    # With the operating point at 0.5 it is the classifier that rejects it, and the reason says how it was read.
    table = _qc(site_output, tmp_path, "[qc]\nclassifier_threshold = 0.5\n", capsys)
    assert table.loc[style, "qc_pass"].all()
    worse = table.loc[f"{N_STYLE:02d}"]
    assert not worse["qc_pass"] and "classifier" in worse["qc_layer"], table[["p_artifact", "qc_layer"]]
    assert "typical T1w scan of site Old" in worse["qc_reason"]


@pytest.mark.parametrize("toml", [
    "[qc]\nsite_calibration_min_group = 0\n",  # calibration off
    "[qc]\nsite_calibration_min_group = 8\n",  # 7 scans: too few
    '[qc]\nsite_column = "scanner"\n',  # every site "n/a": unknown
])
def test_without_a_known_site_of_enough_scans_the_style_is_rejected(site_output: Path, tmp_path: Path, capsys,
                                                                    toml: str) -> None:
    table = _qc(site_output, tmp_path, toml, capsys)
    style = [f"{i:02d}" for i in range(N_STYLE)]
    assert not table.loc[style, "qc_pass"].any()
    assert all("classifier" in layer for layer in table.loc[style, "qc_layer"])
    assert not any("typical" in reason for reason in table["qc_reason"])


def test_a_site_column_the_table_lacks_is_a_clear_error(site_output: Path, tmp_path: Path, capsys) -> None:
    from pipeline.cli import main

    cfg = tmp_path / "typo.toml"
    cfg.write_text('[qc]\nsite_column = "scaner"\n')
    code = main(["qc", str(site_output), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code != 0
    assert "participants.tsv" in err and "no column 'scaner'" in err and "site, scanner" in err


@pytest.fixture(scope="module")
def acquisition_output(tmp_path_factory: pytest.TempPathFactory, site_output: Path) -> Path:
    """The same seven scans in a dataset whose participants.tsv names no site: the raw BIDS images they came from
    (2 mm, uint8, as the derivatives' sidecars and dataset_description.json say) give the acquisition."""
    import shutil

    root = tmp_path_factory.mktemp("acq")
    raw, out = root / "raw", root / "out"
    shutil.copytree(site_output, out)
    (out / "participants.tsv").write_text("participant_id\tage\n" + "".join(f"sub-{i:02d}\t70\n" for i in range(N_STYLE + 1)))
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "d", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "SourceDatasets": [{"URL": raw.as_uri()}]}))
    for i in range(N_STYLE + 1):
        src = raw / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_T1w.nii.gz"
        src.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])), src)
        o = anat_outputs(out, {"sub": f"{i:02d}"}, "T1w", 2)
        o.sidecar.write_text(json.dumps({"Sources": [raw_source_uri(src.relative_to(raw))]}))
    return out


def test_without_a_site_column_the_acquisition_is_the_site(acquisition_output: Path, tmp_path: Path, capsys) -> None:
    table = _qc(acquisition_output, tmp_path, "[qc]\nclassifier_threshold = 0.5\n", capsys)
    style = [f"{i:02d}" for i in range(N_STYLE)]
    assert set(table["site"]) == {"2x2x2 mm uint8"}
    assert table.loc[style, "qc_pass"].all(), table.loc[style, ["p_artifact", "qc_reason"]]
    worse = table.loc[f"{N_STYLE:02d}"]
    assert not worse["qc_pass"] and "typical T1w scan of site 2x2x2 mm uint8" in worse["qc_reason"]
    # When the raw images cannot be found the acquisition is unknown, and the style is rejected again.
    for i in range(N_STYLE + 1):
        (acquisition_output.parent / "raw" / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_T1w.nii.gz").unlink()
    table = _qc(acquisition_output, tmp_path, "[qc]\nclassifier_threshold = 0.5\n", capsys)
    assert set(table["site"]) == {"unknown"}
    assert not table.loc[style, "qc_pass"].any()


def test_raw_source_round_trip() -> None:
    uri = raw_source_uri(Path("sub-01") / "anat" / "sub-01_T1w.nii.gz")
    assert uri == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
    assert raw_source({"Sources": ["doi:x", uri]}) == "sub-01/anat/sub-01_T1w.nii.gz"
    assert raw_source({"Sources": ["doi:x"]}) is None
    assert raw_source({"Sources": "bids:raw:x"}) is None  # not a list: not a BIDS Sources field
    assert raw_source({}) is None
