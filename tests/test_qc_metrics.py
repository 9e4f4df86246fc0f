"""Template-similarity metrics and MRIQC-style IQMs on small synthetic arrays with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import InputError
from qc import iqms, metrics


@pytest.fixture()
def phantom() -> tuple[np.ndarray, np.ndarray]:
    """A 3-tissue spherical 'brain' (CSF 30, GM 60, WM 100 in T1w order) in noisy air."""
    rng = np.random.default_rng(1)
    z, y, x = np.mgrid[:40, :40, :40]
    r = np.sqrt((x - 20) ** 2 + (y - 20) ** 2 + (z - 20) ** 2)
    img = np.zeros((40, 40, 40), np.float32)
    img[r < 15] = 30
    img[r < 12] = 60
    img[r < 7] = 100
    img[r < 17] += 0  # skull-free head
    img += np.abs(rng.normal(0, 2, img.shape)).astype(np.float32)
    return img, r < 15


def test_mutual_information_identity_and_independence() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((20, 20, 20))
    mask = np.ones(a.shape, bool)
    mi_same, nmi_same = metrics.mutual_information(a, a, mask, bins=16)
    mi_ind, nmi_ind = metrics.mutual_information(a, rng.random(a.shape), mask, bins=16)
    assert nmi_same == pytest.approx(2.0, abs=1e-9)
    assert nmi_ind == pytest.approx(1.0, abs=0.02)
    assert mi_same > 2.5 > 0.05 > mi_ind >= 0
    # One-to-one intensity remapping keeps MI (the point of MI for multi-contrast).
    assert metrics.mutual_information(a, 1 - a, mask, bins=16)[1] == pytest.approx(2.0, abs=1e-9)


def test_psnr_and_correlation() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((16, 16, 16))
    mask = np.ones(a.shape, bool)
    assert metrics.psnr(a, a, mask) == float("inf")
    # Robust normalization makes PSNR ignore affine intensity scaling.
    assert metrics.psnr(3 * a + 7, a, mask) > 200  # equal up to float rounding
    low = metrics.psnr(a + rng.normal(0, 0.05, a.shape), a, mask)
    high = metrics.psnr(a + rng.normal(0, 0.3, a.shape), a, mask)
    assert low > high > 0
    b = a + rng.normal(0, 0.1, a.shape)
    assert metrics.pearson_correlation(a, b, mask) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    assert metrics.pearson_correlation(a, -a, mask) == pytest.approx(-1.0)
    assert np.isnan(metrics.pearson_correlation(a, np.ones_like(a), mask))
    # Only voxels inside the mask count.
    half = np.zeros(a.shape, bool)
    half[:8] = True
    c = a.copy()
    c[8:] = rng.random(c[8:].shape)
    assert metrics.pearson_correlation(a, c, half) == pytest.approx(1.0)


def test_brain_coverage_and_errors() -> None:
    img = np.ones((10, 10, 10))
    mask = np.ones(img.shape, bool)
    assert metrics.brain_coverage(img, mask) == 1.0
    img[:5] = 0
    assert metrics.brain_coverage(img, mask) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.template_similarity(img, img[:5], mask)
    with pytest.raises(ValueError, match="fewer than 2"):
        metrics.pearson_correlation(img, img, np.zeros(img.shape, bool))
    sim = metrics.template_similarity(img + np.arange(1000).reshape(img.shape), img, mask)
    assert set(sim) == {"mi", "nmi", "psnr", "correlation", "edge_correlation", "brain_coverage"}


def test_tissue_segmentation_follows_contrast(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    img, brain = phantom
    t1 = iqms.tissue_segmentation(img, brain, "T1w")
    assert img[t1["wm"]].mean() > img[t1["gm"]].mean() > img[t1["csf"]].mean()
    # The same intensities read as T2w: the brightest class is CSF.
    t2 = iqms.tissue_segmentation(img, brain, "T2w")
    assert np.array_equal(t2["csf"], t1["wm"]) and np.array_equal(t2["wm"], t1["csf"])
    with pytest.raises(ValueError, match="no tissue order"):
        iqms.tissue_segmentation(img, brain, "DWI")


def test_snr_cnr_cjv_known_values() -> None:
    rng = np.random.default_rng(0)
    n = 20000
    img = np.concatenate([rng.normal(100, 5, n), rng.normal(60, 5, n), rng.normal(0, 3, n)])
    wm = np.zeros(3 * n, bool)
    wm[:n] = True
    gm = np.zeros(3 * n, bool)
    gm[n : 2 * n] = True
    air = ~(wm | gm)
    assert iqms.snr(img, wm) == pytest.approx(20, rel=0.03)
    assert iqms.cjv(img, wm, gm) == pytest.approx(10 / 40, rel=0.03)
    assert iqms.cnr(img, wm, gm, air) == pytest.approx(40 / np.sqrt(25 + 25 + 9), rel=0.03)
    # Without usable air the air term drops out.
    assert iqms.cnr(img, wm, gm, np.zeros_like(air)) == pytest.approx(40 / np.sqrt(50), rel=0.03)


def test_efc_fber_wm2max_inu() -> None:
    uniform = np.ones((10, 10, 10))
    assert iqms.efc(uniform) == pytest.approx(1.0)  # maximal entropy
    focused = np.full((10, 10, 10), 1e-6)
    focused[5, 5, 5] = 1000
    assert iqms.efc(focused) < 0.05
    rng = np.random.default_rng(0)
    img = np.abs(rng.normal(0, 1, (30, 30, 30)))
    head = np.zeros(img.shape, bool)
    head[5:25, 5:25, 5:25] = True
    img[head] = 50
    fber = iqms.fber(img, head, ~head)
    assert fber == pytest.approx(2500 / np.median(img[~head] ** 2), rel=1e-6) and fber > 100
    zero_bg = np.where(head, 50.0, 0.0)
    assert np.isnan(iqms.fber(zero_bg, head, ~head))
    assert iqms.wm2max(img, head) == pytest.approx(50 / np.percentile(img, 99.95))
    bias = np.ones(img.shape)
    bias[:15] = 2
    stats = iqms.inu_stats(bias, np.ones(img.shape, bool))
    assert stats["inu_range"] == pytest.approx(1.0 / stats["inu_med"])


def test_structural_iqms_detect_noise(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    img, brain = phantom
    rng = np.random.default_rng(2)
    clean = iqms.structural_iqms(img, brain, "T1w", bias=np.ones_like(img))
    noisy = iqms.structural_iqms(img + rng.normal(0, 15, img.shape).astype(np.float32), brain, "T1w")
    assert clean["snr"] > 3 * noisy["snr"]
    assert clean["cnr"] > 2 * noisy["cnr"] and clean["cjv"] < noisy["cjv"]
    assert clean["inu_range"] == 0 and "inu_range" not in noisy
    assert 0 < clean["efc"] < 1


def test_head_mask_fills_the_head(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    img, brain = phantom
    head = iqms.head_mask(img)
    assert head[brain].mean() > 0.99 and head[~brain].mean() < 0.1


def test_bold_metrics(tmp_path: Path) -> None:
    conf = tmp_path / "conf.tsv"
    conf.write_text("framewise_displacement\tdvars\ttrans_x\nn/a\tn/a\t0\n0.1\t2\t0\n0.3\t4\t0\n0.5\t6\t0\n")
    c = iqms.read_confounds(conf)
    m = iqms.confound_metrics(c)
    assert m == pytest.approx({"fd_mean": 0.3, "fd_max": 0.5, "fd_perc": 100 * 2 / 3, "dvars_mean": 4.0})
    rng = np.random.default_rng(0)
    bold = (100 + rng.normal(0, 5, (4, 4, 4, 400))).astype(np.float32)
    mask = np.ones((4, 4, 4), bool)
    out = iqms.bold_iqms(bold, mask, c)
    assert out["tsnr"] == pytest.approx(20, rel=0.05) and out["n_volumes"] == 400
    assert iqms.tsnr_map(bold).shape == (4, 4, 4)
    with pytest.raises(ValueError, match="4-D"):
        iqms.tsnr_map(bold[..., 0])
    bad = tmp_path / "bad.tsv"
    bad.write_text("trans_x\n0\n")
    with pytest.raises(InputError, match="framewise_displacement"):
        iqms.read_confounds(bad)


@pytest.mark.integration
def test_real_colin27_passes_default_curation(shared_data: Path) -> None:
    """Colin27 is already near MNI: resampled onto the 2 mm grid it must pass; with severe noise it must fail."""
    import nibabel as nib
    from nilearn.image import resample_to_img

    from pipeline.core.config import QCConfig
    from qc.curation import build_table
    from qc.group import anat_metrics
    from qc.metrics import template_tissues

    tdir = shared_data / "templates"
    tpl_img = nib.load(tdir / "MNI152NLin6Asym_res-2_T1w.nii.gz")
    template = tpl_img.get_fdata(dtype=np.float32)
    mask = nib.load(tdir / "MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz").get_fdata() > 0
    colin = nib.load(shared_data / "anat" / "colin27_T1w.nii.gz")
    colin = nib.Nifti1Image(colin.get_fdata(dtype=np.float32), colin.affine)
    rng = np.random.default_rng(0)
    noisy_native = colin.get_fdata(dtype=np.float32)
    sigma = 0.2 * np.percentile(noisy_native[noisy_native > 0], 99)
    noisy_native = np.sqrt((noisy_native + rng.normal(0, sigma, noisy_native.shape)) ** 2
                           + rng.normal(0, sigma, noisy_native.shape) ** 2)
    tissues = template_tissues(template, mask)
    records = []
    for name, img in (("clean", colin), ("noisy", nib.Nifti1Image(noisy_native.astype(np.float32), colin.affine))):
        data = resample_to_img(img, tpl_img, interpolation="linear", force_resample=True, copy_header=True).get_fdata()
        m = anat_metrics(data.astype(np.float32), "T1w", template, mask, tissues)  # what the group step measures
        records.append({"subject": name, "modality": "T1w", "path": f"sub-{name}/anat/x.nii.gz", **m})
    by = build_table(records, QCConfig()).set_index("subject")
    assert by.loc["clean", "qc_pass"], by.loc["clean", "qc_reason"]
    assert not by.loc["noisy", "qc_pass"]
