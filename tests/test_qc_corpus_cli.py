"""Real scans of two corpus sources, and severe copies of them, through ``neurocurate prep ... participant`` and ``group``.

Every clean scan must be included and every severe copy excluded, with the layer that rejected it in the
curation table. The copies are extra BIDS subjects of a temporary dataset copied from the corpus.
"""

from __future__ import annotations

import subprocess
import sys

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
CLEAN = {  # subject -> anatomical files (2 sources, 3 scans)
    "mrtrixM": ["sub-mrtrixM_T1w.nii.gz"],
    "ds011s01": ["sub-ds011s01_T1w.nii.gz", "sub-ds011s01_acq-inplane_T2w.nii.gz"],
}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/data/corpus not available"),
]


def _copy_subject(src_sub: str, dst: Path, files: list[str], new_sub: str | None = None, transform=None,
                  rename: dict[str, str] | None = None) -> None:
    new_sub = new_sub or src_sub
    folder = dst / f"sub-{new_sub}" / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        src = CORPUS / f"sub-{src_sub}" / "anat" / name
        target = name.replace(f"sub-{src_sub}", f"sub-{new_sub}")
        for a, b in (rename or {}).items():
            target = target.replace(a, b)
        if transform is None:
            shutil.copyfile(src, folder / target)
            continue
        img = nib.load(src)
        data = transform(np.asanyarray(img.dataobj).astype(np.float32))
        nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine, img.header), folder / target)
        side = src.with_name(name.replace(".nii.gz", ".json"))
        if side.is_file():
            shutil.copyfile(side, folder / target.replace(".nii.gz", ".json"))


def _rician(data: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    sigma = 0.2 * float(np.percentile(data[data > 0], 99))
    return np.sqrt((data + rng.normal(0, sigma, data.shape)) ** 2 + rng.normal(0, sigma, data.shape) ** 2)


def _top_cut(data: np.ndarray) -> np.ndarray:
    # ds000011 T1w is stored PIR-like; cut 40 % of the head along the axis that the header maps to S.
    img = nib.load(CORPUS / "sub-ds011s01" / "anat" / "sub-ds011s01_T1w.nii.gz")
    codes = nib.aff2axcodes(img.affine)
    ax = next(i for i, c in enumerate(codes) if c in "SI")
    out = data.copy()
    n = out.shape[ax]
    sl = [slice(None)] * 3
    sl[ax] = slice(int(0.6 * n), None) if codes[ax] == "S" else slice(0, int(0.4 * n))
    out[tuple(sl)] = 0
    return out


def _tissue_loss(data: np.ndarray) -> np.ndarray:
    # The issue-16 benchmark's severe tissue loss: a spherical signal void 30 mm in radius in one hemisphere.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from qc_generalisation import inject

    affine = nib.load(CORPUS / "sub-mrtrixM" / "anat" / "sub-mrtrixM_T1w.nii.gz").affine
    return inject(data, affine, "tissue_loss", "severe", seed=0)


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:

    root = tmp_path_factory.mktemp("corpus16")
    bids = root / "bids"
    bids.mkdir()
    shutil.copyfile(CORPUS / "dataset_description.json", bids / "dataset_description.json")
    for sub, files in CLEAN.items():
        _copy_subject(sub, bids, files)
    _copy_subject("mrtrixM", bids, CLEAN["mrtrixM"], "noisyM", _rician)
    _copy_subject("ds011s01", bids, ["sub-ds011s01_T1w.nii.gz"], "cropS", _top_cut)
    _copy_subject("mrtrixM", bids, CLEAN["mrtrixM"], "holeM", _tissue_loss)
    # A T2w stored as T1w (wrong modality).
    _copy_subject("ds011s01", bids, ["sub-ds011s01_acq-inplane_T2w.nii.gz"], "swapS",
                  rename={"acq-inplane_T2w": "T1w"})
    parts = ["participant_id\tsite"] + [f"sub-{s}\tn/a" for s in ("mrtrixM", "ds011s01", "noisyM", "cropS", "holeM", "swapS")]
    (bids / "participants.tsv").write_text("\n".join(parts) + "\n")
    out = root / "out"
    # a fresh process, as a user's command: ANTs fixes its thread count when first used in a process, and an
    # earlier in-process test that used ANTs would otherwise decide the registrations' threads (and last bits)
    cli = [sys.executable, "-m", "pipeline.cli"]
    for level in ("participant", "group"):
        run = subprocess.run([*cli, "prep", str(bids), str(out), level, "--nprocs", "2"], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
    return pd.read_parquet(out / "curation" / "curation.parquet")


def test_clean_corpus_scans_are_included(curated: pd.DataFrame) -> None:
    clean = curated[curated["subject"].isin(CLEAN)]
    assert len(clean) == 3
    assert clean["include"].all(), clean[["path", "qc_layer", "qc_reason"]].to_string()


def test_severe_copies_are_excluded_with_a_reason(curated: pd.DataFrame) -> None:
    bad = curated[~curated["subject"].isin(CLEAN)].set_index("subject")
    assert sorted(bad.index) == ["cropS", "holeM", "noisyM", "swapS"]
    assert not bad["include"].any(), bad[["qc_layer", "qc_reason", "p_artifact"]].to_string()
    assert (bad["qc_reason"].str.len() > 0).all()
    assert "absolute" in bad.loc["swapS", "qc_layer"]  # the T2w contrast under a T1w label
    # The 40 % top cut and the 30 mm void leave voids a 12 mm ball fits into (qc.metrics.signal_void).
    for sub in ("cropS", "holeM"):
        assert "absolute" in bad.loc[sub, "qc_layer"] and "signal voids" in bad.loc[sub, "qc_reason"]
    assert (curated.loc[curated["subject"].isin(CLEAN), "signal_void"] == 0).all()


def test_every_metric_a_layer_can_judge_has_a_name_a_reviewer_reads(curated: pd.DataFrame) -> None:
    """The dataset layer names any metric column in its reason; none may reach a reviewer as a raw key (inu_med did)."""
    from pipeline.core.layout import CURATION_NON_METRIC_COLUMNS
    from qc.curation import METRIC_WORDS

    metrics = [c for c in curated.columns
               if c not in CURATION_NON_METRIC_COLUMNS and pd.api.types.is_numeric_dtype(curated[c])]
    assert "inu_med" in metrics and "cjv" in metrics
    assert [m for m in metrics if m not in METRIC_WORDS] == []
