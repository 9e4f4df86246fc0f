"""Property-based fuzzing of the input validation (issue 15).

Random truncations and random corruptions of NIfTI header fields (dims, pixdim, datatype, qform/sform
codes, intent, vox_offset) of a real-shaped image, and random BOLD sidecars. Every case must end in
either a correct result or an :class:`InputError` whose one-line message names the file — never another
exception, a multi-line message or a hang (hypothesis' deadline and pytest-timeout guard that).
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pipeline.core.errors import InputError  # noqa: E402
from workflows.ops.anat import validate_anat_file  # noqa: E402
from workflows.ops.bold import validate_bold  # noqa: E402

# NIfTI-1 header: (byte offset, struct format) of the fields the fuzzer corrupts.
FIELDS = {
    "dim": (40, "<8h"),
    "intent_code": (68, "<h"),
    "datatype": (70, "<h"),
    "bitpix": (72, "<h"),
    "pixdim": (76, "<8f"),
    "vox_offset": (108, "<f"),
    "qform_code": (252, "<h"),
    "sform_code": (254, "<h"),
    "quatern": (256, "<6f"),
    "srow": (280, "<12f"),
}
SETTINGS = settings(max_examples=60, deadline=5000, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _image_bytes(shape=(12, 14, 10), n_vols: int | None = None) -> bytes:
    rng = np.random.default_rng(0)
    full = shape if n_vols is None else (*shape, n_vols)
    data = (rng.random(full) * 100 + 10).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.5, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    if n_vols is not None:
        img.header["pixdim"][4] = 2.0
    return img.to_bytes()


GOOD_ANAT = _image_bytes()
GOOD_BOLD = _image_bytes((8, 8, 6), 12)


def _corrupt(raw: bytes, field: str, values: list[float]) -> bytes:
    offset, fmt = FIELDS[field]
    n = struct.calcsize(fmt)
    count = len(struct.unpack(fmt, raw[offset:offset + n]))
    kind = fmt[-1]
    vals = (values * count)[:count]
    if kind == "h":  # integer fields take integers (a float is truncated, a non-finite one becomes 0)
        vals = [max(-32768, min(32767, int(v) if np.isfinite(v) else 0)) for v in vals]
    else:
        vals = [float(v) for v in vals]
    return raw[:offset] + struct.pack(fmt, *vals) + raw[offset + n:]


def _assert_clean_outcome(call, path: Path) -> str:
    """Run ``call``; return "ok" or "error", failing on anything but a one-line InputError naming ``path``."""
    try:
        call()
    except InputError as exc:
        message = str(exc)
        assert "\n" not in message, message
        assert message.startswith(str(path)), message
        return "error"
    return "ok"


field_values = st.lists(st.one_of(st.integers(-40000, 40000), st.floats(allow_nan=True, allow_infinity=True, width=32)),
                        min_size=1, max_size=12)


@SETTINGS
@given(field=st.sampled_from(sorted(FIELDS)), values=field_values, gz=st.booleans())
def test_anat_header_corruption_is_a_clean_error_or_a_result(tmp_path, field, values, gz):
    raw = _corrupt(GOOD_ANAT, field, values)
    path = tmp_path / ("t1.nii.gz" if gz else "t1.nii")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    outcome = _assert_clean_outcome(lambda: validate_anat_file(str(path), str(tmp_path / "out.nii.gz")), path)
    if outcome == "ok":  # a result must be a readable, finite 3-D image
        out = nib.load(tmp_path / "out.nii.gz")
        assert out.ndim == 3 and np.isfinite(out.affine).all()


@SETTINGS
@given(fraction=st.floats(0.0, 0.999), gz=st.booleans())
def test_anat_truncation_is_a_clean_error(tmp_path, fraction, gz):
    blob = gzip.compress(GOOD_ANAT) if gz else GOOD_ANAT
    path = tmp_path / ("t1.nii.gz" if gz else "t1.nii")
    path.write_bytes(blob[: int(len(blob) * fraction)])
    out = tmp_path / "out.nii.gz"
    if _assert_clean_outcome(lambda: validate_anat_file(str(path), str(out)), path) == "ok":
        # only a gzip stream cut inside its 8-byte trailer still holds every voxel: then the result must be exact
        assert gz and len(blob) - int(len(blob) * fraction) <= 8
        good = tmp_path / "good.nii"
        good.write_bytes(GOOD_ANAT)
        validate_anat_file(str(good), str(tmp_path / "good_out.nii.gz"))
        assert np.array_equal(nib.load(out).get_fdata(), nib.load(tmp_path / "good_out.nii.gz").get_fdata())


@SETTINGS
@given(field=st.sampled_from(["dim", "pixdim", "datatype", "bitpix", "vox_offset", "intent_code"]), values=field_values,
       sidecar_tr=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
def test_bold_corruption_is_a_clean_error_or_a_result(tmp_path, field, values, sidecar_tr):
    path = tmp_path / "bold.nii"
    path.write_bytes(_corrupt(GOOD_BOLD, field, values))
    result = {}

    def call():
        result["v"] = validate_bold(path, sidecar_tr, min_volumes=5)

    if _assert_clean_outcome(call, path) == "ok":
        v = result["v"]
        assert v.n_volumes >= 5 and v.repetition_time > 0 and np.isfinite(v.repetition_time)


sidecar_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)


@SETTINGS
@given(sidecar=st.dictionaries(st.sampled_from(["RepetitionTime", "SliceTiming", "TaskName", "x"]), sidecar_values,
                               max_size=4))
def test_random_bold_sidecars_are_a_clean_error_or_a_result(tmp_path, sidecar):
    from workflows.bold import sidecar_repetition_time

    path = tmp_path / "bold.nii"
    path.write_bytes(GOOD_BOLD)
    (tmp_path / "bold.json").write_text(json.dumps(sidecar))
    result = {}

    def call():
        result["v"] = validate_bold(path, sidecar_repetition_time(sidecar, path), min_volumes=5)

    if _assert_clean_outcome(call, path) == "ok":
        assert result["v"].repetition_time > 0
