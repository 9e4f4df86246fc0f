"""BOLD preprocessing workflow (nipype, nipreps style).

::

    validate -> non-steady-state removal -> reference + mask -> motion correction
             -> reference to T1w (rigid) [-> MNI via the anatomical transform]
                or reference to the EPI template (no T1w)
             -> one-interpolation resampling to MNI 2 mm
             -> confounds (24 motion, FD, DVARS, global/WM/CSF, cosine, aCompCor;
                correlations with the task design when the run has an events.tsv)
             -> ROI series (atlas) -> denoising preset -> derivatives (atomic)

The ``desc-preproc_bold`` output is motion corrected and in MNI space but not
denoised; the ROI series are denoised with the preset ``bold.denoise`` names
(``auto``: ``bold.denoise_task`` for runs with an events.tsv, else
``bold.denoise_rest``; see ``workflows.ops.denoise``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from pipeline.core.config import Config, config_to_dict
from pipeline.core.errors import InputError

__all__ = ["init_bold_preproc_wf", "sidecar_repetition_time"]

LOG = logging.getLogger(__name__)

INPUT_FIELDS = ["bold_file", "t1w_preproc", "t1w_mask", "anat2std_xfm"]
OUTPUT_FIELDS = [
    "bold_std", "boldref", "mask", "confounds", "timeseries", "sidecar",
    "motion_params", "n_dummy", "repetition_time", "raw_timeseries", "denoise_preset",
]


def sidecar_repetition_time(metadata: Mapping | float | None, source: str | Path = "sidecar") -> float | None:
    """The ``RepetitionTime`` in a sidecar mapping, or the number itself (None when absent).

    Raises
    ------
    InputError
        Naming ``source``, when the value is not a number (a string, a list, a boolean, ...).
    """
    if metadata is None:
        return None
    value = metadata.get("RepetitionTime") if isinstance(metadata, Mapping) else metadata
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(source, f"sidecar RepetitionTime {value!r} is not a number")
    return float(value)


def init_bold_preproc_wf(
    *,
    bold_file: str,
    metadata: Mapping | float | None,
    has_t1w: bool,
    output_dir: str,
    cfg: Config,
    name: str = "bold_preproc_wf",
):
    """Build the workflow that preprocesses one BOLD run.

    Parameters
    ----------
    bold_file : str
        Raw BIDS BOLD run; its entities name the derivatives.
    metadata : mapping or float
        The run's sidecar (``RepetitionTime`` is used) or the TR in seconds;
        ``None`` or a sidecar without it falls back to the NIfTI header.
    has_t1w : bool
        True: connect ``inputnode.t1w_preproc``, ``t1w_mask`` and
        ``anat2std_xfm``; the run is registered rigidly to the T1w and reaches
        MNI through the anatomical transform. False: registered to the EPI
        template (``bold.epi_template``).
    output_dir : str
        Derivatives root.
    cfg : Config
        Resolved configuration (``bold``, ``templates``, ``parcellation``).
    name : str
        Workflow name.

    Returns
    -------
    nipype.pipeline.engine.Workflow
        With ``inputnode`` (``bold_file``, ``t1w_preproc``, ``t1w_mask``,
        ``anat2std_xfm``) and ``outputnode`` (``bold_std``, ``boldref``,
        ``mask``, ``confounds``, ``timeseries``, ``sidecar``, ``motion_params``,
        ``n_dummy``, ``repetition_time``, ``raw_timeseries`` (ROI means before
        denoising, in the work folder), ``denoise_preset``), the derivatives
        pointing at the written files.
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from pipeline.core.templates import get_template
    from workflows.interfaces import bold as ifc
    from workflows.ops.bold import find_epi_template
    from workflows.ops.denoise import events_file_for, resolve_preset

    bc = cfg.bold
    events_file = events_file_for(bold_file)
    preset = resolve_preset(bc.denoise, events_file is not None, bc.denoise_task, bc.denoise_rest)
    if preset == "task" and events_file is None:
        from pipeline.core.errors import InputError

        raise InputError(bold_file, "bold denoising preset 'task' needs the run's events.tsv, which is missing")
    LOG.info("%s: denoising preset %r", bold_file, preset)
    template_dir = cfg.templates.template_dir or None
    std_t1w = str(get_template(2, "T1w", template_dir=template_dir))
    std_brain_t1w = str(get_template(2, "T1w", desc="brain", template_dir=template_dir))
    std_mask = str(get_template(2, "mask", desc="brain", template_dir=template_dir))
    if has_t1w:
        target_label = "T1w"
    else:
        epi_template, warning = find_epi_template(bc.epi_template, cfg.templates.template_dir)
        if warning:
            LOG.warning(warning)
        target_label = str(epi_template)

    wf = pe.Workflow(name=name)
    # nipype's default 2 s poll dominates a graph of short nodes.
    wf.config["execution"]["poll_sleep_duration"] = cfg.execution.poll_sleep_duration
    inputnode = pe.Node(niu.IdentityInterface(fields=INPUT_FIELDS), name="inputnode")
    inputnode.inputs.bold_file = str(bold_file)
    outputnode = pe.Node(niu.IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")
    outputnode.inputs.denoise_preset = preset

    validate = pe.Node(ifc.ValidateBold(min_volumes=bc.min_volumes, tr_tolerance=bc.tr_tolerance), name="validate")
    try:
        tr = sidecar_repetition_time(metadata, bold_file)
    except InputError as exc:
        # Fail this run's validation node (one run, not the whole graph), after saying what was wrong.
        LOG.error("%s", exc)
        tr = float("nan")
    if tr is not None:
        validate.inputs.repetition_time = tr
    dummies = pe.Node(ifc.NonSteadyState(dummy_scans=bc.dummy_scans, max_dummy_scans=bc.max_dummy_scans,
                                         zscore=bc.dummy_zscore, min_volumes=bc.min_volumes), name="nonsteady")
    reference = pe.Node(ifc.BoldReference(n_volumes=bc.reference_volumes), name="boldref")
    moco = pe.Node(ifc.MotionCorrection(
        enabled=bc.motion_correction, method=bc.moco_method, iterations=list(bc.moco_iterations),
        shrink_factors=list(bc.moco_shrink_factors), smoothing_sigmas=list(bc.moco_smoothing_sigmas),
        sampling_rate=bc.moco_sampling_rate, random_seed=bc.random_seed), name="motion_correction")
    register = pe.Node(ifc.RegisterBoldReference(transform="Rigid" if has_t1w else bc.template_transform,
                                                 random_seed=bc.random_seed), name="register")
    resample = pe.Node(ifc.ResampleBoldToStd(std_reference=std_t1w, std_brain_mask=std_mask), name="resample_std")
    tissues = pe.Node(ifc.TissueMasks(std_t1w=std_brain_t1w, std_brain_mask=std_mask,
                                      wm_erosion=bc.wm_erosion, csf_erosion=bc.csf_erosion), name="tissue_masks")
    confounds = pe.Node(ifc.BoldConfounds(fd_radius_mm=bc.fd_radius_mm, high_pass=bc.high_pass,
                                          compcor_components=bc.compcor_components), name="confounds")
    parcellate = pe.Node(ifc.ParcellateDenoise(
        atlas=cfg.parcellation.atlas, label_table=cfg.parcellation.label_table, preset=preset,
        detrend=bc.detrend, high_pass=bc.high_pass, low_pass=bc.low_pass,
        motion_regressors=bc.motion_regressors, task_max_design_r=bc.task_max_design_r,
        scrub_fd_threshold=bc.scrub_fd_threshold, scrub_dvars_threshold=bc.scrub_dvars_threshold,
        scrub_min_segment=bc.scrub_min_segment, compcor_components=bc.compcor_components,
        standardize=bc.standardize), name="parcellate_denoise")
    write = pe.Node(ifc.WriteBoldDerivatives(
        output_dir=str(output_dir), source_file=str(bold_file), registration_target=target_label,
        parameters=config_to_dict(bc)), name="ds_bold")

    wf.connect([
        (inputnode, validate, [("bold_file", "bold_file")]),
        (inputnode, dummies, [("bold_file", "bold_file")]),
        # n_volumes also orders validation first: a bad file fails before any heavy node.
        (validate, dummies, [("n_volumes", "n_volumes")]),
        (validate, write, [("report", "validation"), ("repetition_time", "repetition_time")]),
        (validate, parcellate, [("repetition_time", "repetition_time")]),
        (validate, confounds, [("repetition_time", "repetition_time")]),
        (dummies, reference, [("out_file", "bold_file")]),
        (dummies, moco, [("out_file", "bold_file")]),
        (reference, moco, [("ref_file", "ref_file"), ("mask_file", "mask_file")]),
        (reference, register, [("ref_file", "ref_file")]),
        (dummies, resample, [("out_file", "bold_file")]),
        (reference, resample, [("ref_file", "ref_file"), ("mask_file", "ref_mask")]),
        (moco, resample, [("xfm_files", "xfm_files")]),
        (register, resample, [("xfm_file", "bold2target_xfm")]),
        (resample, confounds, [("bold_std", "bold_std"), ("mask_std", "mask_std")]),
        (tissues, confounds, [("wm_mask", "wm_mask"), ("csf_mask", "csf_mask")]),
        (moco, confounds, [("motion_file", "motion_file")]),
        (resample, parcellate, [("bold_std", "bold_std")]),
        (confounds, parcellate, [("confounds_file", "confounds_file"), ("confounds_json", "confounds_json")]),
        (resample, write, [("bold_std", "bold_std"), ("boldref_std", "boldref_std"), ("mask_std", "mask_std")]),
        (confounds, write, [("confounds_file", "confounds_file"), ("confounds_json", "confounds_json")]),
        (parcellate, write, [("timeseries", "timeseries"), ("timeseries_json", "timeseries_json"),
                             ("atlas_name", "atlas_name")]),
        (dummies, write, [("n_dummy", "n_dummy")]),
        (write, outputnode, [("bold_std", "bold_std"), ("boldref", "boldref"), ("mask", "mask"),
                             ("confounds", "confounds"), ("timeseries", "timeseries"), ("sidecar", "sidecar")]),
        (moco, outputnode, [("motion_file", "motion_params")]),
        (parcellate, outputnode, [("raw_timeseries", "raw_timeseries")]),
        (dummies, outputnode, [("n_dummy", "n_dummy")]),
        (validate, outputnode, [("repetition_time", "repetition_time")]),
    ])
    if events_file is not None:
        design = pe.Node(ifc.DesignRegressor(events_file=str(events_file)), name="design")
        wf.connect([
            (validate, design, [("n_volumes", "n_volumes"), ("repetition_time", "repetition_time")]),
            (dummies, design, [("n_dummy", "n_dummy")]),
            (design, confounds, [("design_file", "design_file")]),
            (design, parcellate, [("design_file", "design_file")]),
        ])
    if has_t1w:
        wf.connect([
            (inputnode, register, [("t1w_preproc", "target_file"), ("t1w_mask", "target_mask")]),
            (inputnode, resample, [("anat2std_xfm", "anat2std_xfm")]),
            (inputnode, tissues, [("t1w_preproc", "t1w_file"), ("t1w_mask", "t1w_mask"),
                                  ("anat2std_xfm", "anat2std_xfm")]),
        ])
    else:
        register.inputs.target_file = target_label
    return wf
