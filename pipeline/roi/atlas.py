"""Integer-label atlases: the bundled Schaefer-400 + Tian S3 atlas or any labelled NIfTI.

An :class:`Atlas` is a labels image (one integer per voxel, 0 = background)
plus a label table giving every label id its ROI name. The label table may be

* the Schaefer/Tian ``*_label.txt`` format: a name line followed by an
  ``index R G B A`` line, for every label;
* a BIDS ``dseg.tsv`` (tab separated, columns ``index`` and ``name``);
* a plain text file with one ``index name`` pair per line.

The image and the table must describe the same labels; a mismatch is an
:class:`~pipeline.core.errors.InputError` naming the file, because a silently
shifted label table assigns every signal to the wrong ROI name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from pipeline.core.errors import InputError

__all__ = [
    "DEFAULT_ATLAS",
    "Atlas",
    "atlas_from_config",
    "bundled_atlases",
    "resample_labels",
    "load_atlas",
    "load_labels_array",
    "majority_networks",
    "read_label_table",
    "schaefer_network",
]

DEFAULT_ATLAS = "Schaefer400Tian3"

# name -> (labels image, label table) inside pipeline/data/atlases
_BUNDLED: dict[str, tuple[str, str]] = {
    "Schaefer400Tian3": (
        "atlas-Schaefer400Tian3_space-MNI152NLin6Asym_res-2_dseg.nii.gz",
        "atlas-Schaefer400Tian3_labels.txt",
    ),
}
_NAME_RE = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class Atlas:
    """An integer-label atlas.

    Attributes
    ----------
    name : str
        Alphanumeric atlas name, used in the ``atlas-<name>`` BIDS entity.
    labels_img : Path
        Labels NIfTI (3-D, integer values, 0 = background).
    label_ids : tuple of int
        The label ids, in ROI (column) order.
    roi_names : tuple of str
        One name per label id, same order.
    label_table : Path or None
        The table the names were read from.
    """

    name: str
    labels_img: Path
    label_ids: tuple[int, ...]
    roi_names: tuple[str, ...]
    label_table: Path | None = None

    @property
    def n_rois(self) -> int:
        """Number of ROIs."""
        return len(self.label_ids)


def bundled_atlases() -> tuple[str, ...]:
    """Names of the atlases shipped inside the package."""
    return tuple(_BUNDLED)


def _data_dir() -> Path:
    return Path(str(resources.files("pipeline") / "data" / "atlases"))


def read_label_table(path: str | Path) -> dict[int, str]:
    """Read a label table into ``{label id: ROI name}``.

    Parameters
    ----------
    path : path-like
        A Schaefer/Tian ``_label.txt``, a BIDS ``dseg.tsv`` or an ``index name`` text file.

    Raises
    ------
    InputError
        When the file is missing, empty, or in none of the known formats, or
        lists a label twice.
    """
    path = Path(path)
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    except FileNotFoundError:
        raise InputError(path, "label table does not exist") from None
    except UnicodeDecodeError:
        raise InputError(path, "label table is not a text file") from None
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise InputError(path, "label table is empty")

    pairs: list[tuple[int, str]] = []
    header = re.split(r"\t|,", lines[0].lower())
    if "index" in header and "name" in header:
        sep = "\t" if "\t" in lines[0] else ","
        i_col, n_col = header.index("index"), header.index("name")
        for k, ln in enumerate(lines[1:], start=2):
            cells = ln.split(sep)
            try:
                pairs.append((int(cells[i_col]), cells[n_col].strip()))
            except (ValueError, IndexError):
                raise InputError(path, f"line {k}: expected an integer index and a name, got {ln!r}") from None
    elif _is_rgba_line(lines[1] if len(lines) > 1 else ""):
        # Schaefer/Tian: name line, then "index R G B A".
        if len(lines) % 2:
            raise InputError(path, "label table has an odd number of lines (expected name / 'index R G B A' pairs)")
        for k in range(0, len(lines), 2):
            if not _is_rgba_line(lines[k + 1]):
                raise InputError(path, f"line {k + 2}: expected 'index R G B A', got {lines[k + 1]!r}")
            pairs.append((int(lines[k + 1].split()[0]), lines[k]))
    else:
        for k, ln in enumerate(lines, start=1):
            cells = ln.split(None, 1)
            try:
                pairs.append((int(cells[0]), cells[1].strip()))
            except (ValueError, IndexError):
                raise InputError(path, f"line {k}: expected 'index name', got {ln!r}") from None

    table: dict[int, str] = {}
    for idx, name in pairs:
        if idx in table:
            raise InputError(path, f"label {idx} is listed twice")
        if not name:
            raise InputError(path, f"label {idx} has an empty name")
        table[idx] = name
    table.pop(0, None)  # background may be listed; it is never an ROI
    if not table:
        raise InputError(path, "label table lists no labels")
    return table


def _is_rgba_line(line: str) -> bool:
    cells = line.split()
    return len(cells) == 5 and all(c.lstrip("-").isdigit() for c in cells)


def load_labels_array(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a labels NIfTI as an integer array; returns ``(labels_XYZ, affine)``.

    Float-stored labels (as the Tian/Schaefer release) are accepted when every
    value is integral.

    Raises
    ------
    InputError
        When the file cannot be read, is not 3-D, or holds non-integer values.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except FileNotFoundError:
        raise InputError(path, "atlas labels image does not exist") from None
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise InputError(path, f"cannot read atlas labels image ({exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"atlas labels image must be 3-D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)):
            raise InputError(path, "atlas labels image holds NaN or infinite values")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise InputError(path, "atlas labels image holds non-integer values (is it a probabilistic atlas?)")
        data = rounded
    if data.min() < 0:
        raise InputError(path, "atlas labels image holds negative labels")
    return data.astype(np.int32, copy=False), img.affine


def _sanitize_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", text)


def load_atlas(name_or_path: str | Path | None = None, label_table: str | Path | None = None, name: str | None = None) -> Atlas:
    """Load a bundled atlas by name, or any integer-label NIfTI with its label table.

    Parameters
    ----------
    name_or_path : str or path-like, optional
        A bundled atlas name (``Schaefer400Tian3``, the default) or the path to
        a labels NIfTI.
    label_table : path-like, optional
        Label table for a NIfTI path. Without one, ROIs are named ``roi-<id>``
        after the labels found in the image.
    name : str, optional
        Atlas name for a NIfTI path; defaults to the file name without
        extension, made alphanumeric.

    Returns
    -------
    Atlas

    Raises
    ------
    InputError
        When the image or table cannot be read, or they disagree on the labels.
    """
    if name_or_path is None or name_or_path == "":
        name_or_path = DEFAULT_ATLAS
    if isinstance(name_or_path, str) and name_or_path in _BUNDLED:
        img_name, table_name = _BUNDLED[name_or_path]
        img_path = _data_dir() / img_name
        table_path = Path(label_table) if label_table is not None else _data_dir() / table_name
        atlas_name = name or name_or_path
    else:
        img_path = Path(name_or_path)
        if not img_path.exists():
            known = ", ".join(_BUNDLED)
            raise InputError(img_path, f"atlas is neither a bundled atlas ({known}) nor an existing labels image")
        table_path = Path(label_table) if label_table is not None else None
        stem = img_path.name.split(".")[0]
        atlas_name = name or _sanitize_name(stem.removeprefix("atlas-").split("_")[0]) or "custom"
    if not _NAME_RE.match(atlas_name):
        raise InputError(img_path, f"atlas name {atlas_name!r} must be alphanumeric (it becomes a BIDS entity)")

    labels, _ = load_labels_array(img_path)
    present = np.unique(labels)
    present = present[present != 0]
    if present.size == 0:
        raise InputError(img_path, "atlas labels image holds no labels (all background)")
    if table_path is None:
        ids = tuple(int(i) for i in present)
        names = tuple(f"roi-{i}" for i in ids)
    else:
        table = read_label_table(table_path)
        in_image_only = sorted(set(present.tolist()) - set(table))
        in_table_only = sorted(set(table) - set(present.tolist()))
        if in_image_only or in_table_only:
            problems = []
            if in_image_only:
                problems.append(f"labels {_short(in_image_only)} are in {img_path.name} but not in the table")
            if in_table_only:
                problems.append(f"labels {_short(in_table_only)} are in the table but not in {img_path.name}")
            raise InputError(table_path, "label table does not match the atlas image: " + "; ".join(problems))
        ids = tuple(sorted(table))
        names = tuple(table[i] for i in ids)
        if len(set(names)) != len(names):
            raise InputError(table_path, "ROI names in the label table are not unique")
    return Atlas(name=atlas_name, labels_img=img_path, label_ids=ids, roi_names=names, label_table=table_path)


def atlas_from_config(cfg) -> Atlas:
    """The atlas of a :class:`~pipeline.core.config.ParcellationConfig` (``atlas``, ``label_table``)."""
    return load_atlas(cfg.atlas or None, cfg.label_table or None)


def _short(values: list[int], n: int = 8) -> str:
    text = ", ".join(str(v) for v in values[:n])
    return f"[{text}{', ...' if len(values) > n else ''}] ({len(values)})"


_SCHAEFER_NET_RE = re.compile(r"^\d+Networks_[LR]H_([A-Za-z]+)_")


def schaefer_network(roi_name: str) -> str | None:
    """Network of a Schaefer ROI name (``7Networks_LH_Vis_1`` -> ``Vis``); ``None`` otherwise."""
    m = _SCHAEFER_NET_RE.match(roi_name)
    return m.group(1) if m else None


def majority_networks(labels_img: str | Path, label_ids: tuple[int, ...] | list[int], reference: Atlas | None = None) -> list[str | None]:
    """Assign every ROI of an atlas the majority network of a Schaefer atlas.

    The atlas is resampled (nearest neighbour) onto the reference grid; each
    ROI takes the most frequent network among its voxels that fall in a
    reference label (``Vis``, ``SomMot``, ..., ``Default``; Tian subcortical
    labels count as ``Subcortex``). Used to name the networks of atlases
    without network names (CC200) for the sensory-vs-association check.

    Parameters
    ----------
    labels_img : path-like
        Integer-label NIfTI of the atlas to annotate.
    label_ids : sequence of int
        Its ROI label ids, in output order.
    reference : Atlas, optional
        A Schaefer(+Tian) atlas; the bundled default when omitted.

    Returns
    -------
    list of str or None
        Network per ROI; ``None`` when no voxel overlaps the reference.
    """
    reference = reference or load_atlas()
    ref_labels, ref_affine = load_labels_array(reference.labels_img)
    labels, affine = load_labels_array(labels_img)
    on_ref = resample_labels(labels, affine, ref_affine, ref_labels.shape)
    ref_net = {lid: (schaefer_network(n) or "Subcortex") for lid, n in zip(reference.label_ids, reference.roi_names)}
    nets = sorted(set(ref_net.values()))
    net_code = np.zeros(int(ref_labels.max()) + 1, dtype=np.int64)  # 0 = background
    for lid, net in ref_net.items():
        net_code[lid] = nets.index(net) + 1
    codes = net_code[ref_labels]
    ids = np.asarray(label_ids, dtype=np.int64)
    lut = np.full(int(max(on_ref.max(), ids.max())) + 1, -1, dtype=np.int64)
    lut[ids] = np.arange(ids.size)
    roi = lut[on_ref]
    sel = (roi >= 0) & (codes > 0)
    counts = np.zeros((ids.size, len(nets) + 1), dtype=np.int64)
    np.add.at(counts, (roi[sel], codes[sel]), 1)
    return [nets[int(c.argmax()) - 1] if c.sum() else None for c in counts]


def resample_labels(labels: np.ndarray, labels_affine: np.ndarray, target_affine: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of a labels array onto another grid.

    Uses the same :func:`scipy.ndimage.affine_transform` (order 0, zero
    padding) that nilearn's ``resample_img`` uses, so the resampled labels,
    and therefore the ROI means, are the ones ``NiftiLabelsMasker`` produces
    with ``resampling_target="data"``.
    """
    from scipy import ndimage

    target_shape = tuple(int(s) for s in target_shape[:3])
    if np.allclose(labels_affine, target_affine) and labels.shape == target_shape:
        return labels
    # voxel index in the target grid -> voxel index in the labels grid
    transform = np.linalg.inv(labels_affine) @ target_affine
    out = ndimage.affine_transform(
        labels.astype(np.float32),
        transform[:3, :3],
        offset=transform[:3, 3],
        output_shape=target_shape,
        order=0,
        mode="constant",
        cval=0.0,
    )
    return np.rint(out).astype(np.int32)
