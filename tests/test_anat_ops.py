"""Unit tests for the pure anatomical operations on tiny synthetic images."""

from __future__ import annotations

import gzip
import nibabel as nib
import numpy as np
import pytest

from pipeline.core.errors import InputError
from workflows.ops.anat import load_nifti, resample_to_template, validate_anat_file, validate_anat_image


def _blob(shape=(24, 28, 20)):
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    return (100 * np.exp(-(zz**2 + yy**2 + xx**2) * 3)).astype(np.float32)


def _img(data=None, affine=None):
    data = _blob() if data is None else data
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def test_clean_image_passes_unchanged():
    out, fixes = validate_anat_image(_img(), "x.nii.gz")
    assert fixes == []
    assert np.array_equal(out.get_fdata(), _blob())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (np.zeros((24, 28, 20, 3), np.float32), r"x\.nii\.gz: expected a 3D structural image"),
        (np.zeros((24, 28, 20), np.float32), r"x\.nii\.gz: image is all zeros"),
        (np.full((24, 28, 20), 7, np.float32), "constant"),
    ],
)
def test_rejects_with_reason(data, match):
    with pytest.raises(InputError, match=match):
        validate_anat_image(_img(data), "x.nii.gz")


def test_rejects_non_finite_voxels():
    data = _blob()
    data[3, 3, 3] = np.nan
    data[4, 4, 4] = np.inf
    with pytest.raises(InputError, match="contains 2 NaN/Inf voxels"):
        validate_anat_image(_img(data), "x.nii.gz")


def test_rejects_degenerate_affine(tmp_path):
    hdr = _img().header.copy()
    hdr["qform_code"] = 0
    hdr["srow_y"] = [0.0, 0.0, 0.0, 0.0]  # singular voxel-to-world mapping
    path = tmp_path / "degenerate.nii.gz"
    nib.Nifti1Image(_blob(), None, hdr).to_filename(path)
    with pytest.raises(InputError, match=r"degenerate\.nii\.gz: degenerate affine"):
        validate_anat_image(nib.load(path), path)


def test_squeezes_singleton_fourth_dimension():
    out, fixes = validate_anat_image(_img(_blob()[..., None]), "x.nii.gz")
    assert out.shape == _blob().shape
    assert fixes == ["squeezed a singleton 4th dimension"]


def test_qform_sform_disagreement_keeps_sform():
    img = _img()
    shifted = img.affine.copy()
    shifted[:3, 3] += [10, 0, 0]
    img.set_qform(shifted, code=1)
    out, fixes = validate_anat_image(img, "x.nii.gz", qform_sform_tolerance_mm=1.0)
    assert np.allclose(out.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert np.allclose(out.get_qform(), out.get_sform())
    assert len(fixes) == 1 and "disagreed by up to 10.0 mm" in fixes[0]


def test_missing_qform_is_filled_from_sform():
    img = _img()
    img.set_qform(None, code=0)
    _, fixes = validate_anat_image(img, "x.nii.gz")
    assert fixes == ["qform was missing: copied the sform into it"]


def test_validate_file_reorients_to_ras(tmp_path):
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    src = tmp_path / "in.nii.gz"
    nib.save(_img(affine=las), src)
    out = tmp_path / "out.nii.gz"
    fixes = validate_anat_file(str(src), str(out))
    img = nib.load(out)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert fixes == ["reoriented LAS to RAS"]
    # Same world coordinates: voxel (0,0,0) of the output is the input's last x voxel.
    assert np.array_equal(img.get_fdata()[0], _blob()[-1])


def test_unreadable_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.nii\.gz: file is empty"):
        load_nifti(empty)
    good = tmp_path / "good.nii.gz"
    nib.save(_img(), good)
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match=r"trunc\.nii\.gz: cannot be read as NIfTI"):
        load_nifti(truncated)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(InputError, match=r"garbage\.nii\.gz: cannot be read"):
        load_nifti(garbage)
    with pytest.raises(InputError, match="does not exist"):
        load_nifti(tmp_path / "missing.nii.gz")


def test_resample_identity_transform_lands_on_grid(tmp_path):
    """An identity affine resamples a template-grid image onto itself."""
    import ants

    grid = _img()
    src, tpl, xfm = tmp_path / "src.nii.gz", tmp_path / "grid.nii.gz", tmp_path / "id.mat"
    nib.save(grid, src)
    nib.save(grid, tpl)
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(xfm))
    out = tmp_path / "out.nii.gz"
    resample_to_template(str(src), str(tpl), str(xfm), str(out), kind="field")
    res = nib.load(out)
    assert np.allclose(res.affine, grid.affine)
    assert np.allclose(res.get_fdata(), _blob(), atol=1e-3)
    resample_to_template(str(src), str(tpl), str(xfm), str(out), kind="mask")
    assert set(np.unique(nib.load(out).get_fdata())) <= {0.0, 1.0}
