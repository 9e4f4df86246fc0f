"""Participant-level workflow: one sub-workflow per subject, one per scan inside it."""

from __future__ import annotations

from pathlib import Path

from nipype.pipeline import engine as pe

from pipeline.core.bids import SubjectScans
from pipeline.core.config import Config
from workflows.anatomical import init_anat_preproc_wf

__all__ = ["init_neurocurate_wf", "init_single_subject_wf", "subject_wf_name"]


def _node_name(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def subject_wf_name(label: str) -> str:
    """Name of the sub-workflow of subject ``label`` (without ``sub-``) in :func:`init_neurocurate_wf`."""
    return f"sub_{_node_name(label)}_wf"


def init_single_subject_wf(
    *, subject: SubjectScans, output_dir: str, cfg: Config, name: str | None = None
) -> pe.Workflow:
    """All scans of one subject.

    Every T1w, T2w and FLAIR gets its own anatomical workflow. BOLD runs use
    the subject's first T1w (sorted by path) as their anatomical reference
    and go straight to the EPI template when the subject has none.
    """
    wf = pe.Workflow(name=name or subject_wf_name(subject.subject))
    reference = None
    for scan in subject.anat:
        if scan.suffix not in cfg.anat.modalities:
            continue
        anat_wf = init_anat_preproc_wf(
            in_file=scan.path,
            entities=scan.entities,
            modality=scan.suffix,
            output_dir=output_dir,
            cfg=cfg,
            name=f"anat_{_node_name(scan.label)}_wf",
        )
        wf.add_nodes([anat_wf])
        if reference is None and scan.suffix == "T1w":
            reference = anat_wf
    if subject.bold:
        from workflows.bold import init_bold_preproc_wf

        for scan in subject.bold:
            bold_wf = init_bold_preproc_wf(
                bold_file=scan.path,
                metadata=scan.metadata,
                has_t1w=reference is not None,
                output_dir=output_dir,
                cfg=cfg,
                name=f"bold_{_node_name(scan.label)}_wf",
            )
            if reference is not None:
                wf.connect([
                    (reference, bold_wf, [
                        ("outputnode.preproc", "inputnode.t1w_preproc"),
                        ("outputnode.mask", "inputnode.t1w_mask"),
                        ("outputnode.xfm", "inputnode.anat2std_xfm"),
                    ]),
                ])
            else:
                wf.add_nodes([bold_wf])
    return wf


def init_neurocurate_wf(
    *, subjects: dict[str, SubjectScans], output_dir: str | Path, work_dir: str | Path, cfg: Config,
    name: str = "neurocurate_wf",
) -> pe.Workflow:
    """The whole participant-level graph, rooted in ``work_dir``."""
    wf = pe.Workflow(name=name, base_dir=str(work_dir))
    for sub in sorted(subjects):
        sub_wf = init_single_subject_wf(subject=subjects[sub], output_dir=str(output_dir), cfg=cfg)
        if sub_wf._graph.number_of_nodes():
            wf.add_nodes([sub_wf])
    return wf
