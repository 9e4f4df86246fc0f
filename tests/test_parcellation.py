"""Parcellation: atlas loading/validation and equality with nilearn's NiftiLabelsMasker."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest

from pipeline.roi.atlas import DEFAULT_ATLAS, load_atlas, load_labels_array, read_label_table, schaefer_network
from pipeline.core.errors import InputError
from pipeline.roi.parcellation import extract_timeseries, parcellate_img, signals_from_labels


def _masker_signals(img, labels_img):
    from nilearn.maskers import NiftiLabelsMasker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masker = NiftiLabelsMasker(labels_img, strategy="mean")
        signals = masker.fit_transform(img)
    ids = [v for k, v in masker.region_ids_.items() if k != "background"]
    return signals, ids


@pytest.fixture(scope="module")
def small_atlas(shared_data, tmp_path_factory):
    """The 116-ROI Schaefer-100 + Tian S1 atlas from the shared data."""
    root = shared_data / "atlases"
    return load_atlas(
        root / "Schaefer2018_100Parcels_7Networks_order_Tian_Subcortex_S1_MNI152NLin6Asym_2mm.nii.gz",
        root / "Schaefer2018_100Parcels_7Networks_order_Tian_Subcortex_S1_label.txt",
        name="Schaefer100Tian1",
    )


def test_bundled_default_atlas():
    atlas = load_atlas()
    assert atlas.name == DEFAULT_ATLAS
    assert atlas.n_rois == 450
    assert atlas.label_ids == tuple(range(1, 451))
    assert atlas.roi_names[0] == "HIP-head-m-rh"
    assert atlas.roi_names[50] == "7Networks_LH_Vis_1"
    labels, affine = load_labels_array(atlas.labels_img)
    assert labels.shape == (91, 109, 91)
    assert np.issubdtype(labels.dtype, np.integer)
    assert affine[0, 0] == -2.0
    assert schaefer_network(atlas.roi_names[-1]) == "Default"
    assert schaefer_network(atlas.roi_names[0]) is None


def test_bundled_atlas_equals_source_float_atlas(shared_data):
    src = nib.load(shared_data / "atlases" / "Schaefer2018_400Parcels_7Networks_order_Tian_Subcortex_S3_MNI152NLin6Asym_2mm.nii.gz")
    labels, affine = load_labels_array(load_atlas().labels_img)
    np.testing.assert_array_equal(labels, np.asarray(src.dataobj))
    np.testing.assert_allclose(affine, src.affine)


def test_label_table_formats(tmp_path):
    tsv = tmp_path / "dseg.tsv"
    tsv.write_text("index\tname\n1\tA\n2\tB\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("# comment\n1 A\n2 B b\n")
    assert read_label_table(tsv) == {1: "A", 2: "B"}
    assert read_label_table(plain) == {1: "A", 2: "B b"}
    dup = tmp_path / "dup.txt"
    dup.write_text("1 A\n1 B\n")
    with pytest.raises(InputError, match=r"dup\.txt: label 1 is listed twice"):
        read_label_table(dup)


def _write_labels(path, data):
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def test_label_table_mismatch_names_the_table(tmp_path):
    data = np.zeros((4, 4, 4), dtype=np.int16)
    data[:2] = 1
    data[2:] = 3
    img = _write_labels(tmp_path / "atl.nii.gz", data)
    table = tmp_path / "atl_labels.tsv"
    table.write_text("index\tname\n1\tA\n2\tB\n")
    with pytest.raises(InputError, match=r"atl_labels\.tsv: label table does not match.*\[3\].*not in the table.*\[2\]"):
        load_atlas(img, table)
    atlas = load_atlas(img)  # without a table the ROIs are named after the labels
    assert atlas.roi_names == ("roi-1", "roi-3")
    assert atlas.name == "atl"


def test_non_integer_atlas_rejected(tmp_path):
    data = np.zeros((3, 3, 3), dtype=np.float32)
    data[0, 0, 0] = 1.5
    img = _write_labels(tmp_path / "prob.nii.gz", data)
    with pytest.raises(InputError, match=r"prob\.nii\.gz: .*non-integer"):
        load_atlas(img)
    with pytest.raises(InputError, match="neither a bundled atlas"):
        load_atlas("NoSuchAtlas")


def test_signals_from_labels_tiny_known_values():
    labels = np.array([[[1, 2], [1, 2]], [[3, 3], [0, 0]]], dtype=np.int16)
    data = np.zeros((2, 2, 2, 2), dtype=np.float32)
    data[..., 0] = [[[0.3, 0.1], [-0.3, 1.9]], [[2.0, 2.0], [9.0, 9.0]]]
    data[..., 1] = [[[np.nan, 4.0], [2.0, 0.0]], [[1.0, 3.0], [9.0, 9.0]]]
    signals_TR, counts_R = signals_from_labels(data, labels, [3, 1, 2, 7])
    np.testing.assert_allclose(signals_TR, [[2.0, 0.0, 1.0, 0.0], [2.0, 1.0, 2.0, 0.0]], atol=1e-7)
    np.testing.assert_array_equal(counts_R, [2, 2, 2, 0])
    # C-ordered input gives the same answer as Fortran-ordered input
    signals_c, _ = signals_from_labels(np.ascontiguousarray(data), labels, [3, 1, 2, 7])
    signals_f, _ = signals_from_labels(np.asfortranarray(data), labels, [3, 1, 2, 7])
    np.testing.assert_array_equal(signals_c, signals_f)


def test_equals_nilearn_same_grid(small_atlas):
    labels, affine = load_labels_array(small_atlas.labels_img)
    rng = np.random.default_rng(0)
    data = (1000 + 50 * rng.standard_normal(labels.shape + (12,))).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    ours = parcellate_img(img, small_atlas)
    ref, ids = _masker_signals(img, str(small_atlas.labels_img))
    assert ids == list(small_atlas.label_ids)
    np.testing.assert_allclose(ours.signals_TR, ref, rtol=1e-4)
    assert ours.empty_rois == ()


def test_equals_nilearn_on_real_bold_with_resampling(shared_data, small_atlas):
    """The real BOLD run is in scanner space at 3 mm: the atlas is resampled onto it."""
    src = nib.load(shared_data / "func" / "sub-02_task-oneback_run-1_bold.nii.gz")
    img = nib.Nifti1Image(np.asanyarray(src.dataobj)[..., :20], src.affine, src.header)
    ours = parcellate_img(img, small_atlas)
    ref, ids = _masker_signals(img, str(small_atlas.labels_img))
    present = [small_atlas.label_ids.index(i) for i in ids]
    np.testing.assert_allclose(ours.signals_TR[:, present], ref, rtol=1e-4)


def test_extract_timeseries_writes_contract(tmp_path, small_atlas):
    labels, affine = load_labels_array(small_atlas.labels_img)
    data = np.zeros(labels.shape + (5,), dtype=np.float32)
    data[..., :] = np.arange(5, dtype=np.float32)
    data[labels == 1] = 0.0  # a constant ROI
    data[labels == 2] = 0.0
    bold = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), bold)
    out = tmp_path / "sub-01" / "func" / "sub-01_task-rest_atlas-Schaefer100Tian1_timeseries.tsv"
    assert extract_timeseries(str(bold), small_atlas, out, repetition_time=2.0) == out
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["RepetitionTime"] == 2.0
    assert side["AtlasName"] == "Schaefer100Tian1"
    assert side["NumberOfVolumes"] == 5
    assert side["Source"] == "preprocessed"
    assert side["ROINames"] == list(small_atlas.roi_names)
    assert side["ZeroVarianceROIs"] == list(small_atlas.roi_names[:2])
    assert side["EmptyROIs"] == []
    rows = out.read_text().splitlines()
    assert rows[0].split("\t") == list(small_atlas.roi_names)
    values = np.array([r.split("\t") for r in rows[1:]], dtype=float)
    np.testing.assert_allclose(values[:, 5], np.arange(5))


def test_partial_field_of_view_reports_empty_rois(tmp_path, small_atlas):
    labels, affine = load_labels_array(small_atlas.labels_img)
    z0 = 50  # keep only the top of the brain: subcortical ROIs fall outside
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ [0, 0, z0] + affine[:3, 3]
    rng = np.random.default_rng(1)
    data = rng.standard_normal(labels[:, :, z0:].shape + (4,)).astype(np.float32)
    img = nib.Nifti1Image(data, shifted)
    ours = parcellate_img(img, small_atlas)
    assert "HIP-rh" in ours.empty_rois
    assert set(ours.empty_rois) <= set(ours.zero_variance_rois)
    empty_cols = [small_atlas.roi_names.index(n) for n in ours.empty_rois]
    assert np.all(ours.signals_TR[:, empty_cols] == 0.0)
    ref, ids = _masker_signals(img, str(small_atlas.labels_img))
    present = [small_atlas.label_ids.index(i) for i in ids]
    assert len(present) + len(ours.empty_rois) == small_atlas.n_rois
    np.testing.assert_allclose(ours.signals_TR[:, present], ref, rtol=1e-4)


def test_extract_timeseries_bad_input(tmp_path, small_atlas):
    bad = tmp_path / "bad_bold.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(InputError, match=r"bad_bold\.nii\.gz: cannot read BOLD"):
        extract_timeseries(str(bad), small_atlas, tmp_path / "x_timeseries.tsv", 2.0)
    three_d = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)), three_d)
    with pytest.raises(InputError, match=r"vol\.nii\.gz: BOLD image must be 4-D"):
        extract_timeseries(str(three_d), small_atlas, tmp_path / "x_timeseries.tsv", 2.0)
