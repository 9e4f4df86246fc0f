"""The demo: every stage on the small real dataset bundled in the package (``neurocurate demo``).

The bundled dataset (``pipeline/data/demo/bids``) holds licence-compatible
real scans only: the Colin27 T1w (BSD-3), the niivue T1w and T2w (BSD-2) and
four 30-volume segments of one studyforrest BOLD run (PDDL), each segment
given to its own pseudo-subject. :func:`build_demo_dataset` rebuilds it from
``../shared/data``; ``pipeline/data/demo/SOURCES.md`` says where each file
comes from. With four pseudo-subjects cut from one person's run, the
pretraining and evaluation numbers are a smoke run of the machinery, not a
result, and the command says so.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import Config, load_config
from pipeline.core.errors import InputError

__all__ = ["DEMO_NOTE", "DEMO_SUBJECTS", "build_demo_dataset", "demo_inputs", "demo_root"]

DEMO_NOTE = ("note: the demo's 4 pseudo-subjects are segments of ONE person's BOLD run; the pretraining loss and the "
             "evaluation scores are a smoke run of the pipeline, not a scientific result.")

# Pseudo-subject -> (anatomical sources, BOLD segment index); the run's half is
# the evaluation target because it is the one label that is true for them.
DEMO_SUBJECTS: dict[str, tuple[tuple[tuple[str, str], ...], int]] = {
    "01": ((("colin27_T1w.nii.gz", "T1w"),), 0),
    "02": ((("niivue_T1w_neck.nii.gz", "T1w"),), 1),
    "03": ((("niivue_T2w.nii.gz", "T2w"),), 2),
    "04": ((), 3),
}
SEGMENT_VOLUMES = 30
# In-plane crop of the studyforrest run (voxels): its brain lies inside, and
# the crop keeps the package under 30 MB.
BOLD_CROP = (slice(8, 72), slice(2, 76))
DEMO_TARGET = "run_half"


def demo_root() -> Path:
    """Folder of the bundled demo data (``bids/`` and ``demo_config.toml``)."""
    return Path(__file__).resolve().parents[1] / "data" / "demo"


def build_demo_dataset(shared_data: str | Path, dest: str | Path) -> Path:
    """Rebuild the bundled BIDS demo dataset from the shared real data.

    Parameters
    ----------
    shared_data : path-like
        The ``shared/data`` folder (``anat/`` and ``func/``).
    dest : path-like
        Target BIDS root; created (files are overwritten atomically).

    Returns
    -------
    Path
        ``dest``.
    """
    import json
    import shutil

    import nibabel as nib
    import numpy as np

    from pipeline.core.atomic import atomic_copy, atomic_path, atomic_write_text
    from pipeline.core.errors import InputError

    shared_data, dest = Path(shared_data), Path(dest)
    bold_src = shared_data / "func" / "sub-02_task-oneback_run-1_bold.nii.gz"
    if not bold_src.is_file():
        raise InputError(bold_src, "the studyforrest BOLD run is missing from the shared data")
    bold = nib.load(bold_src)
    # Unscaled ints keep the file int16; the header keeps the Philips slope.
    raw = np.asarray(bold.dataobj.get_unscaled())
    sidecar = json.loads(bold_src.with_name(bold_src.name.replace(".nii.gz", ".json")).read_text())
    keep = ("RepetitionTime", "EchoTime", "FlipAngle", "MagneticFieldStrength", "Manufacturer",
            "ManufacturersModelName", "PhaseEncodingAxis", "EstimatedTotalReadoutTime")
    bold_meta = {k: sidecar[k] for k in keep if k in sidecar}
    bold_meta["TaskName"] = "oneback"

    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest / "dataset_description.json", json.dumps({
        "Name": "neurocurate demo (Colin27, niivue, studyforrest segments)",
        "BIDSVersion": "1.9.0",
        "License": "mixed: BSD-3 (Colin27), BSD-2 (niivue), PDDL (studyforrest); see SOURCES.md",
    }, indent=2) + "\n")
    rows = ["participant_id\trun_half\tsource_volumes"]
    for sub, (anats, segment) in DEMO_SUBJECTS.items():
        for src_name, suffix in anats:
            target = dest / f"sub-{sub}" / "anat" / f"sub-{sub}_{suffix}.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(shared_data / "anat" / src_name, target)
        start = segment * SEGMENT_VOLUMES
        part = raw[BOLD_CROP[0], BOLD_CROP[1], :, start:start + SEGMENT_VOLUMES]
        # Shift the affine's origin so the cropped voxels keep their world position.
        affine = bold.affine.copy()
        affine[:3, 3] = bold.affine[:3, :3] @ np.array([BOLD_CROP[0].start, BOLD_CROP[1].start, 0]) + bold.affine[:3, 3]
        header = bold.header.copy()
        img = nib.Nifti1Image(part, affine, header)
        img.header.set_data_dtype(np.int16)
        img.set_sform(affine, code=int(bold.header["sform_code"]))
        img.set_qform(affine, code=int(bold.header["qform_code"]))
        slope, inter = bold.dataobj.slope, bold.dataobj.inter
        img.header.set_slope_inter(slope, inter)
        func = dest / f"sub-{sub}" / "func" / f"sub-{sub}_task-oneback_bold.nii.gz"
        func.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(func) as tmp:
            nib.save(img, tmp)
        atomic_write_text(func.with_name(func.name.replace(".nii.gz", ".json")), json.dumps(bold_meta, indent=2) + "\n")
        half = "early" if start + SEGMENT_VOLUMES <= raw.shape[-1] // 2 else "late"
        rows.append(f"sub-{sub}\t{half}\t{start}-{start + SEGMENT_VOLUMES - 1}")
    atomic_write_text(dest / "participants.tsv", "\n".join(rows) + "\n")
    for licence in ("anat/LICENSE-colin27-mricron-data.txt", "anat/LICENSE-niivue-demo-images.txt",
                    "func/LICENSE-studyforrest-PDDL.txt"):
        shutil.copyfile(shared_data / licence, dest.parent / Path(licence).name)
    return dest


def demo_inputs(*, nprocs: int = 2) -> tuple[Path, Config]:
    """The bundled demo dataset and its config, for a :class:`pipeline.runner.StageRunner` of every stage."""
    root = demo_root()
    bids_dir = root / "bids"
    if not (bids_dir / "dataset_description.json").is_file():
        raise InputError(bids_dir, "the bundled demo dataset is missing from this installation")
    return bids_dir, load_config(root / "demo_config.toml", {"execution": {"nprocs": nprocs}})
