"""Group level end to end on a small synthetic derivatives folder: table, reports, escaping, review server."""

from __future__ import annotations

import re

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import Config, from_dict
from pipeline.core.derivatives import anat_outputs, func_outputs, timeseries_output
from pipeline.core.templates import get_template

# The default configuration: all four layers (the shipped reference and classifier).
SYNTHETIC_CFG = Config()

EVIL = '<script>alert("x")</script>'


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def make_synthetic_output(root: Path, with_anat: bool = True) -> Path:
    """OUTPUT_DIR with a clean T1w (sub-01), a noisy T1w and a T2w-as-T1w (sub-02), one BOLD run
    and ROI series (sub-01), a crash log (sub-03) and hostile strings in participants.tsv."""
    out = root / "out"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    t1_img = nib.load(get_template(2, "T1w"))
    t1 = np.asanyarray(t1_img.dataobj).astype(np.float32)
    t2 = np.asanyarray(nib.load(get_template(2, "T2w")).dataobj).astype(np.float32)
    mask = np.asanyarray(nib.load(get_template(2, "mask", "brain")).dataobj).astype(np.uint8)
    aff = t1_img.affine
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in t1.shape], indexing="ij")
    bias = np.exp(0.1 * grid[0]).astype(np.float32)
    scale = float(np.percentile(t1[mask > 0], 99))

    def write_anat(ents: dict, modality: str, image: np.ndarray) -> None:
        o = anat_outputs(out, ents, modality, 2)
        _save(o.preproc, image.astype(np.float32), aff)
        _save(o.mask, mask, aff)
        _save(o.biasfield, bias, aff)
        o.sidecar.write_text(json.dumps({"Sources": ["bids:raw:x"], "Parameters": {}}))

    if with_anat:
        clean = t1 + rng.normal(0, 0.01 * scale, t1.shape)
        write_anat({"sub": "01"}, "T1w", clean)
        noisy = np.abs(t1 + rng.normal(0, 0.6 * scale, t1.shape))
        write_anat({"sub": "02"}, "T1w", noisy)
        write_anat({"sub": "02", "acq": "mislabel"}, "T1w", t2)

    # A small BOLD run on its own grid with a matching confounds TSV.
    fo = func_outputs(out, {"sub": "01", "task": "rest"}, 2)
    baff = np.diag([4.0, 4.0, 4.0, 1.0])
    bmask = np.zeros((12, 14, 12), np.uint8)
    bmask[3:9, 3:11, 3:9] = 1
    bold = 100 + rng.normal(0, 2, (12, 14, 12, 30)).astype(np.float32)
    _save(fo.preproc, bold, baff)
    _save(fo.mask, bmask, baff)
    fd = ["n/a"] + [f"{v:.3f}" for v in np.full(29, 0.1)]
    lines = ["framewise_displacement\tdvars\ttrans_x"] + [f"{f}\t1.0\t0.0" for f in fd]
    fo.confounds.write_text("\n".join(lines) + "\n")

    ts = timeseries_output(out, {"sub": "01", "task": "rest"}, "Toy")
    ts.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rng.normal(size=(150, 4)), columns=["a", "b", "c", "d"]).to_csv(ts, sep="\t", index=False)
    ts.with_suffix(".json").write_text(json.dumps({
        "RepetitionTime": 2.0, "AtlasName": "Toy", "ROINames": ["a", "b", "c", "d"], "NumberOfVolumes": 150,
        "EmptyROIs": [], "ZeroVarianceROIs": ["d"], "Source": "preprocessed",
    }))

    (out / "logs").mkdir()
    (out / "logs" / "sub-03_crash.txt").write_text(f"Traceback: registration failed {EVIL}\n")
    (out / "participants.tsv").write_text(f"participant_id\tsite\nsub-01\tSiteA\nsub-02\t<b>{EVIL}</b>\nsub-03\tSiteA\n")
    return out


@pytest.fixture(scope="module")
def group_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    from qc.group import run_group

    out = make_synthetic_output(tmp_path_factory.mktemp("grp"))
    code = run_group(out, SYNTHETIC_CFG)
    return out, code


def test_group_builds_table(group_output: tuple[Path, int]) -> None:
    out, code = group_output
    assert code == 0
    df = pd.read_parquet(out / "curation" / "curation.parquet")
    tsv = pd.read_csv(out / "curation" / "curation.tsv", sep="\t", keep_default_na=False)
    assert list(df.columns) == list(tsv.columns)
    assert sorted(df["modality"]) == ["T1w", "T1w", "T1w", "bold", "timeseries"]
    by = {(r.subject, r.modality, r.acq): r for r in df.itertuples()}
    assert by[("01", "T1w", "")].qc_pass and by[("01", "T1w", "")].include
    noisy = by[("02", "T1w", "")]
    assert not noisy.qc_pass and noisy.qc_layer and noisy.qc_reason
    # The T2 template labelled T1w has the T2w contrast signature: rejected by the absolute layer.
    mislabel = by[("02", "T1w", "mislabel")]
    assert not mislabel.qc_pass and "absolute" in mislabel.qc_layer and "wm_gm_ratio" in mislabel.failed_rules
    assert "wrong modality" in mislabel.qc_reason
    ts = df[df["modality"] == "timeseries"].iloc[0]
    assert ts["zero_variance_fraction"] == pytest.approx(0.25) and not ts["qc_pass"]
    bold = df[df["modality"] == "bold"].iloc[0]
    assert bold["n_volumes"] == 30 and bold["fd_mean"] == pytest.approx(0.1)
    assert "n_volumes=30<100" in bold["failed_rules"]
    assert set(df["site"]) == {"SiteA", f"<b>{EVIL}</b>"}
    assert df["path"].str.startswith("sub-").all()
    assert (out / "curation" / "neurocurate_config.toml").is_file()


def test_reports_escape_dataset_strings(group_output: tuple[Path, int]) -> None:
    out, _ = group_output
    group = (out / "reports" / "group.html").read_text()
    assert EVIL not in group and "&lt;script&gt;alert" in group
    assert group.count("<svg class=\"strip\"") >= 5
    assert 'class="thr"' in group  # thresholds drawn
    crash = (out / "reports" / "sub-03.html").read_text()
    assert "registration failed" in crash and EVIL not in crash and "&lt;script&gt;" in crash
    sub01 = (out / "reports" / "sub-01.html").read_text()
    assert sub01.count("data:image/png;base64,") == 6  # 3 anat + 3 BOLD figures
    assert "Carpet plot" in sub01


def test_missing_confounds_is_partial(tmp_path: Path) -> None:
    from qc.group import run_group

    out = make_synthetic_output(tmp_path, with_anat=False)
    func_outputs(out, {"sub": "01", "task": "rest"}, 2).confounds.unlink()
    assert run_group(out, SYNTHETIC_CFG) == 3
    df = pd.read_parquet(out / "curation" / "curation.parquet")
    assert "bold" not in set(df["modality"])
    assert "missing confounds TSV" in (out / "reports" / "sub-01.html").read_text()


def test_empty_output_dir_is_an_error(tmp_path: Path) -> None:
    from pipeline.core.errors import NeurocurateError
    from qc.group import run_group

    with pytest.raises(NeurocurateError, match="no derivatives"):
        run_group(tmp_path, Config())


def test_thresholds_from_config_change_decisions(tmp_path: Path) -> None:
    from qc.group import run_group

    out = make_synthetic_output(tmp_path, with_anat=False)
    cfg = from_dict(Config, {"qc": {"timeseries": {"max_zero_variance_fraction": 0.5}}})
    run_group(out, cfg)
    df = pd.read_parquet(out / "curation" / "curation.parquet")
    assert df.loc[df["modality"] == "timeseries", "qc_pass"].item()


def _request(url: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode()
            return resp.status, json.loads(text) if resp.headers.get_content_type() == "application/json" else text
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def test_review_server_rates_and_guards(group_output: tuple[Path, int]) -> None:
    from qc.review import make_server

    out, _ = group_output
    server = make_server(out, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert server.server_address[0] == "127.0.0.1"
        status, page = _request(base + "/")
        assert status == 200 and "neurocurate group QC report" in page
        path = "sub-01/anat/sub-01_space-MNI152NLin6Asym_res-2_desc-preproc_T1w.nii.gz"
        rating = {"path": path, "decision": "exclude", "comment": "motion <b>"}
        # No custom header: a cross-site form post must not get through.
        assert _request(base + "/api/rate", rating, {"Content-Type": "application/json"})[0] == 403
        hdr = {"Content-Type": "application/json", "X-Neurocurate-Review": "1"}
        assert _request(base + "/api/rate", rating, {**hdr, "Host": "evil.example"})[0] == 403
        assert _request(base + "/api/rate", {**rating, "path": "sub-99/x.nii.gz"}, hdr)[0] == 400
        assert _request(base + "/api/rate", {**rating, "decision": "maybe"}, hdr)[0] == 400
        status, body = _request(base + "/api/rate", rating, hdr)
        assert status == 200 and body["include"] is False
        df = pd.read_parquet(out / "curation" / "curation.parquet")
        row = df[df["path"] == path].iloc[0]
        assert row["override"] == "exclude" and row["override_comment"] == "motion <b>" and not row["include"]
        assert _request(base + "/api/ratings")[1]["ratings"][path]["decision"] == "exclude"
        assert _request(base + "/../curation/ratings.json")[0] == 404
        assert _request(base + "/%2e%2e/curation/ratings.json")[0] == 404
        # Clearing the rating gives the decision back to the rules.
        _request(base + "/api/rate", {**rating, "decision": ""}, hdr)
        assert bool(pd.read_parquet(out / "curation" / "curation.parquet").set_index("path").loc[path, "include"])
    finally:
        server.shutdown()
        server.server_close()


def _qc_cli(argv: list[str]) -> int:
    from pipeline.cli import main

    return main(["qc", *argv])


def test_cli_import_ratings(group_output: tuple[Path, int], tmp_path: Path, capsys) -> None:

    out, _ = group_output
    path = "sub-02/anat/sub-02_space-MNI152NLin6Asym_res-2_desc-preproc_T1w.nii.gz"
    file = tmp_path / "ratings.json"
    file.write_text(json.dumps({"version": 1, "ratings": {path: {"decision": "include", "comment": "fine"}}}))
    assert _qc_cli(["import-ratings", str(out), str(file)]) == 0
    df = pd.read_parquet(out / "curation" / "curation.parquet").set_index("path")
    assert df.loc[path, "override"] == "include" and bool(df.loc[path, "include"]) and not df.loc[path, "qc_pass"]
    assert "fine" in (out / "reports" / "sub-02.html").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ratings": {"sub-77/anat/x.nii.gz": {"decision": "exclude"}}}))
    assert _qc_cli(["import-ratings", str(out), str(bad)]) == 2
    assert re.search("not in the curation table", capsys.readouterr().err)
    assert _qc_cli(["import-ratings", str(out), str(tmp_path / "nope.json")]) == 2
    assert re.search("does not exist", capsys.readouterr().err)
