"""Confound signals against hand-computed values, and the small BOLD ops around them."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from pipeline.core.errors import InputError
from workflows.ops.bold import find_epi_template, transform_parameters, validate_bold
from workflows.ops.confounds import (
    dvars,
    expand_regressors,
    framewise_displacement,
    lag1_autocorrelation,
    leading_outliers,
    motion_regressor_names,
    rigid_parameters,
)


def test_fd_power_hand_computed():
    params = np.array([
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.1, -0.2, 0.3, 0.001, 0.0, -0.002],
        [0.1, -0.2, 0.3, 0.001, 0.0, -0.002],
        [0.0, 0.0, 0.0, 0.0, 0.01, 0.0],
    ])
    fd = framewise_displacement(params, radius_mm=50.0)
    # |0.1|+|0.2|+|0.3| + 50*(0.001+0.002) = 0.6 + 0.15
    # then no change; then 0.6 + 50*(0.001+0.01+0.002) = 0.6 + 0.65
    np.testing.assert_allclose(fd, [0.0, 0.75, 0.0, 1.25])
    assert framewise_displacement(params, radius_mm=80.0)[1] == pytest.approx(0.6 + 80 * 0.003)


def test_fd_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(T, 6\)"):
        framewise_displacement(np.zeros((5, 3)))


def test_dvars_hand_computed():
    # two voxels, three volumes; no intensity scaling
    data = np.array([[1.0, 3.0, 2.0], [2.0, 2.0, 6.0]])
    dv, std = dvars(data, intensity_normalization=0)
    # diffs: t1 = (2, 0) -> sqrt((4+0)/2) = sqrt(2); t2 = (-1, 4) -> sqrt((1+16)/2)
    assert np.isnan(dv[0]) and np.isnan(std[0])
    np.testing.assert_allclose(dv[1:], [np.sqrt(2.0), np.sqrt(8.5)])
    # expected DVARS: mean_v sqrt(2 (1 - ar1_v)) * IQR_v / 1.349
    ar1 = lag1_autocorrelation(data)
    iqr = np.percentile(data, 75, axis=1) - np.percentile(data, 25, axis=1)
    expected = np.mean(np.sqrt(2 * (1 - ar1)) * iqr / 1.349)
    np.testing.assert_allclose(std[1:], dv[1:] / expected)


def test_lag1_autocorrelation_hand_computed():
    # demeaned (-1, 1, -1, 1): sum x_t x_{t-1} = -3, sum x^2 = 4
    np.testing.assert_allclose(lag1_autocorrelation(np.array([[0.0, 2.0, 0.0, 2.0], [5, 5, 5, 5]])), [-0.75, 0.0])


def test_dvars_intensity_normalisation_scales_to_median_1000():
    rng = np.random.default_rng(0)
    data = 500 + rng.normal(size=(50, 20))
    dv_raw, std_raw = dvars(data, intensity_normalization=0)
    dv_norm, std_norm = dvars(data, intensity_normalization=1000)
    np.testing.assert_allclose(dv_norm[1:], dv_raw[1:] * 1000 / np.median(data))
    # the standardised form does not depend on the scale
    np.testing.assert_allclose(std_norm[1:], std_raw[1:])


def test_expand_regressors_names_and_values():
    x = np.array([[1.0, 0.0], [3.0, 1.0], [2.0, -1.0]])
    out, names = expand_regressors(x, ["a", "b"])
    assert names == ["a", "a_derivative1", "a_power2", "a_derivative1_power2",
                     "b", "b_derivative1", "b_power2", "b_derivative1_power2"]
    np.testing.assert_allclose(out[1:, 1], [2.0, -1.0])
    np.testing.assert_allclose(out[:, 2], [1.0, 9.0, 4.0])
    np.testing.assert_allclose(out[1:, 7], [1.0, 4.0])
    assert np.isnan(out[0, 1]) and np.isnan(out[0, 3])


def test_motion_regressor_names():
    assert len(motion_regressor_names(24)) == 24 and "rot_z_derivative1_power2" in motion_regressor_names(24)
    assert motion_regressor_names(6)[0] == "trans_x" and motion_regressor_names(0) == []
    with pytest.raises(ValueError, match="0, 6, 12 or 24"):
        motion_regressor_names(18)


def test_leading_outliers_counts_only_leading_volumes():
    signal = np.r_[[300.0, 200.0], 100 + np.sin(np.arange(40)), [400.0]]
    assert leading_outliers(signal) == 2
    assert leading_outliers(100 + np.sin(np.arange(40))) == 0


def test_rigid_parameters_single_axis():
    a = 0.05
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    np.testing.assert_allclose(rigid_parameters(rz, [1, 2, 3]), [1, 2, 3, 0, 0, a], atol=1e-12)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    np.testing.assert_allclose(rigid_parameters(rx, [0, 0, 0])[3:], [a, 0, 0], atol=1e-12)


def test_transform_parameters_reads_ants_rigid(tmp_path):
    ants = pytest.importorskip("ants")
    a = 0.02
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    rz = [np.cos(a), -np.sin(a), 0, np.sin(a), np.cos(a), 0, 0, 0, 1]
    tx.set_parameters(np.array(rz + [1.0, -2.0, 0.5]))
    path = tmp_path / "x.mat"
    ants.write_transform(tx, str(path))
    p = transform_parameters(path)
    # LPS -> RAS flips x and y translations; a rotation about z keeps its sign
    np.testing.assert_allclose(p, [-1.0, 2.0, 0.5, 0.0, 0.0, a], atol=1e-6)


def _bold(tmp_path, n_vols=8, tr=2.0):
    img = nib.Nifti1Image(np.random.default_rng(0).random((4, 4, 3, n_vols)).astype(np.float32), np.eye(4))
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = tr
    path = tmp_path / "sub-01_task-rest_bold.nii.gz"
    nib.save(img, path)
    return path


def test_validate_reports_tr_disagreement(tmp_path):
    path = _bold(tmp_path, tr=1.79)
    result = validate_bold(path, 2.0)
    assert result.repetition_time == 2.0 and result.header_tr == pytest.approx(1.79)
    assert any("disagrees" in w for w in result.warnings)
    assert validate_bold(path, None).repetition_time == pytest.approx(1.79)


def test_validate_rejects_short_and_3d(tmp_path):
    with pytest.raises(InputError, match="4 volumes, fewer than the 5"):
        validate_bold(_bold(tmp_path, n_vols=4), 2.0)
    path3d = tmp_path / "sub-01_task-rest_run-2_bold.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), path3d)
    with pytest.raises(InputError, match="must be 4-D"):
        validate_bold(path3d, 2.0)
    with pytest.raises(InputError, match="not a positive number"):
        validate_bold(_bold(tmp_path), -1.0)


def test_epi_template_lookup(tmp_path, template_dir):
    path, warning = find_epi_template("", str(template_dir))
    assert path.name == "SPM_OldNorm_EPI_2mm.nii.gz" and warning is None
    path, warning = find_epi_template("", str(tmp_path))
    assert path.name.endswith("T2w.nii.gz") and "no EPI template" in warning
    with pytest.raises(InputError, match="bold.epi_template does not exist"):
        find_epi_template(str(tmp_path / "missing.nii.gz"), "")


def test_bold_config_defaults_and_strict_loading(tmp_path):
    from pipeline.core.config import ConfigError, load_config

    cfg = load_config()
    assert cfg.bold.motion_regressors == 24 and (cfg.bold.high_pass, cfg.bold.low_pass) == (0.008, 0.0)
    assert cfg.bold.denoise == "auto" and (cfg.bold.denoise_task, cfg.bold.denoise_rest) == ("task", "simple")
    assert cfg.bold.moco_method == "gauss_newton"
    toml = tmp_path / "c.toml"
    toml.write_text("[bold]\nmotion_regressors = 18\n")
    with pytest.raises(ConfigError, match="motion_regressors"):
        load_config(toml)
    toml.write_text("[bold]\nglobal_signal = true\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(toml)
    toml.write_text('[bold]\ndenoise_rest = "compcor_gsr"\nscrub_fd_threshold = 0.2\n')
    cfg = load_config(toml)
    assert cfg.bold.denoise_rest == "compcor_gsr" and cfg.bold.scrub_fd_threshold == 0.2


def test_kmeans_1d_orders_classes_by_intensity():
    from workflows.ops.bold import kmeans_1d

    x = np.r_[np.full(5, 100.0), np.full(5, 10.0), np.full(5, 50.0)] + np.tile([0, 1, -1, 0.5, -0.5], 3)
    labels = kmeans_1d(x, 3)
    np.testing.assert_array_equal(labels, [2] * 5 + [0] * 5 + [1] * 5)


def test_tissue_masks_on_template(tmp_path, template_dir):
    from workflows.ops.bold import tissue_masks

    wm, csf = tissue_masks(template_dir / "MNI152NLin6Asym_res-2_desc-brain_T1w.nii.gz",
                           template_dir / "MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz",
                           tmp_path / "wm.nii.gz", tmp_path / "csf.nii.gz")
    t1 = nib.load(template_dir / "MNI152NLin6Asym_res-2_desc-brain_T1w.nii.gz").get_fdata()
    wm_m, csf_m = nib.load(wm).get_fdata() > 0, nib.load(csf).get_fdata() > 0
    assert wm_m.sum() > 2000 and csf_m.sum() > 100 and not (wm_m & csf_m).any()
    # white matter is bright and CSF dark on a T1w
    assert t1[wm_m].mean() > 1.5 * t1[csf_m].mean()
    # the lateral ventricles sit near the midline: CSF mask centred in x
    assert abs(np.argwhere(csf_m)[:, 0].mean() - 45) < 5
