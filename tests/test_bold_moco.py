"""Fast rigid motion correction (workflows.ops.bold.realign_volumes / motion_correct)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from workflows.ops.bold import (
    motion_correct,
    realign_volumes,
    rigid_matrix,
    transform_parameters,
)
from workflows.ops.confounds import rigid_parameters

AFFINE = np.array([[-3.0, 0, 0, 60], [0, 3.0, 0, -70], [0, 0, 3.3, -40], [0, 0, 0, 1]])


def _phantom(shape=(40, 44, 30), seed=0) -> np.ndarray:
    """A smooth head-like volume: an ellipsoid with blobs of varying contrast."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    r = np.sqrt((((grid.T - centre) / (np.array(shape) * 0.38)) ** 2).sum(axis=-1)).T
    img = 800.0 * (r < 1.0)
    for _ in range(30):
        c = centre + rng.uniform(-0.3, 0.3, 3) * np.array(shape)
        img += rng.uniform(-300, 300) * np.exp(-(((grid.T - c) ** 2).sum(axis=-1)).T / (2 * rng.uniform(2, 5) ** 2))
    return ndimage.gaussian_filter(img, 1.0)


def _moved(ref: np.ndarray, params_T6: np.ndarray, centre: np.ndarray, noise: float, seed: int = 1) -> np.ndarray:
    """``vol_t(M_t x) = ref(x)`` for each rigid ``M_t`` (cubic B-spline), plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    inv_aff = np.linalg.inv(AFFINE)
    out = np.zeros(ref.shape + (len(params_T6),))
    for t, q in enumerate(params_T6):
        vox = inv_aff @ np.linalg.inv(rigid_matrix(q, centre)) @ AFFINE  # output voxel -> reference voxel
        out[..., t] = ndimage.affine_transform(ref, vox[:3, :3], vox[:3, 3], order=3, mode="nearest")
    return out + rng.normal(0, noise, out.shape)


def test_rigid_matrix_round_trips_rigid_parameters():
    q = np.array([1.0, -2.0, 0.5, 0.02, -0.03, 0.01])
    m = rigid_matrix(q)
    np.testing.assert_allclose(rigid_parameters(m[:3, :3], m[:3, 3]), q, atol=1e-12)
    np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-12)


def test_realign_recovers_known_motion():
    ref = _phantom()
    mask = ref > 200
    centre = (AFFINE @ np.r_[np.argwhere(mask).mean(axis=0), 1.0])[:3]
    rng = np.random.default_rng(5)
    truth = np.c_[rng.uniform(-2, 2, (6, 3)), np.deg2rad(rng.uniform(-2, 2, (6, 3)))]
    truth[0] = 0
    vols = _moved(ref, truth, centre, noise=8.0)
    mats = realign_volumes(ref, vols, ndimage.binary_dilation(mask, iterations=2), AFFINE)
    pts = AFFINE @ np.c_[np.argwhere(mask), np.ones(int(mask.sum()))].T
    for t in range(len(truth)):
        diff = mats[t] @ np.linalg.inv(rigid_matrix(truth[t], centre))
        err = np.linalg.norm(((diff @ pts) - pts)[:3], axis=0).mean()
        assert err < 0.05, (t, err)


def test_motion_correct_writes_ants_transforms_deterministically(tmp_path):
    ref = _phantom(shape=(30, 32, 24))
    mask = ref > 200
    centre = (AFFINE @ np.r_[np.argwhere(mask).mean(axis=0), 1.0])[:3]
    truth = np.array([[0, 0, 0, 0, 0, 0], [0.8, -0.5, 0.3, 0.01, 0.0, -0.015], [1.5, 0.2, -0.4, -0.02, 0.01, 0.0]])
    vols = _moved(ref, truth, centre, noise=4.0)
    nib.save(nib.Nifti1Image(vols.astype(np.float32), AFFINE), tmp_path / "bold.nii.gz")
    nib.save(nib.Nifti1Image(ref.astype(np.float32), AFFINE), tmp_path / "ref.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), tmp_path / "mask.nii.gz")
    args = (tmp_path / "bold.nii.gz", tmp_path / "ref.nii.gz", tmp_path / "mask.nii.gz")
    xfms, params = motion_correct(*args, tmp_path / "a")
    _, params2 = motion_correct(*args, tmp_path / "b")
    np.testing.assert_array_equal(params, params2)
    assert len(xfms) == 3 and all(x.is_file() for x in xfms)
    for t, x in enumerate(xfms):
        # the ANTs .mat (LPS, fixed -> moving) reads back as the same RAS parameters
        np.testing.assert_allclose(transform_parameters(x), params[t], atol=1e-6)
        want = rigid_matrix(truth[t], centre)
        got = rigid_matrix(params[t])
        np.testing.assert_allclose(got[:3, :3], want[:3, :3], atol=2e-3)
        np.testing.assert_allclose(got[:3, 3], want[:3, 3], atol=0.15)
    with pytest.raises(ValueError, match="method"):
        motion_correct(*args, tmp_path / "c", method="mcflirt")
