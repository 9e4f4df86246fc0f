"""``neurocurate demo`` end to end on the bundled real sample, then a rerun that does no work."""

from __future__ import annotations

import hashlib
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.stages.demo import build_demo_dataset, demo_root
from pipeline.core.layout import OutputLayout, RunLayout
from pipeline.core.manifest import read_manifest
from pipeline.runner import STAGES

pytestmark = pytest.mark.integration


def _tree_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_bundled_data_is_small_and_rebuilds_from_shared_data(tmp_path, shared_data):
    bundled = demo_root() / "bids"
    assert _tree_bytes(demo_root()) <= 30 * 2**20
    rebuilt = build_demo_dataset(shared_data, tmp_path / "bids")
    for path in sorted(p for p in bundled.rglob("*") if p.is_file()):
        twin = rebuilt / path.relative_to(bundled)
        assert twin.is_file(), twin
        if path.name.endswith((".json", ".tsv")) or "anat" in path.parts:
            assert hashlib.sha256(twin.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest(), path
        else:  # gzip headers carry a time stamp: compare the voxels and the geometry
            a, b = nib.load(path), nib.load(twin)
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine), path
    bold = nib.load(bundled / "sub-01" / "func" / "sub-01_task-oneback_bold.nii.gz")
    assert bold.shape[-1] == 30 and bold.get_data_dtype() == np.int16


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    t0 = time.perf_counter()
    code = main(["demo", str(out)])
    return {"out": out, "code": code, "seconds": time.perf_counter() - t0}


def test_demo_runs_every_stage_and_writes_both_reports(demo_run, capsys):
    out = demo_run["out"]
    assert demo_run["code"] == 0
    for stage in STAGES:
        assert read_manifest(out, stage) is not None, stage
    assert (out / "reports" / "group.html").is_file()
    report = RunLayout(OutputLayout(out).pretrain_dir).evaluation_dir("run_half", "kfold") / "report.html"
    assert report.is_file()
    table = pd.read_parquet(out / "curation" / "curation.parquet")
    assert set(table["subject"]) == {"01", "02", "03", "04"}
    index = pd.read_parquet(out / "shards" / "index.parquet")
    assert len(index) > 0
    assert (out / "pretrain" / "metrics.jsonl").is_file()


def test_demo_rerun_does_no_work(demo_run, capsys):
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(["demo", str(demo_run["out"])]) == 0
    seconds = time.perf_counter() - t0
    text = capsys.readouterr().out
    for stage in STAGES:
        assert f"[{stage}] up to date" in text, text
    assert "smoke run" in text
    assert seconds < 30
