"""Anatomical preprocessing workflow: validate → RAS → N4 → affine to MNI → skull strip → resample.

T1w scans register to the T1 template; T2w and FLAIR to the T2 template.
With ``skull_strip="deepbet"`` a T1w scan is skull-stripped natively first
and its brain alone registers to the template brain (the skull and neck no
longer pull the fit); ``"template"`` registers the head to the head template
and carries the template brain mask back through the inverse affine.
deepbet is trained on T1w images, so T2w and FLAIR always use ``template``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from pipeline.core.config import Config, config_to_dict
from pipeline.core.templates import get_template
from workflows.interfaces.anat import (
    DeepBetMask,
    N4Correct,
    RegisterAffine,
    RegisterSyN,
    ResampleToTemplate,
    TemplateMaskToNative,
    ValidateAnat,
)
from workflows.interfaces.derivatives import WriteAnatDerivatives

__all__ = ["init_anat_preproc_wf", "registration_template"]


def registration_template(modality: str, brain: bool, cfg: Config) -> Path:
    """The template a scan registers to (T1 for T1w, T2 for T2w and FLAIR)."""
    res = cfg.anat.registration_resolution
    tdir = cfg.templates.template_dir or None
    if modality == "T1w":
        return get_template(res, "T1w", "brain" if brain else None, tdir)
    return get_template(res, "T2w", None, tdir)


def init_anat_preproc_wf(
    *,
    in_file: str,
    entities: Mapping[str, str],
    modality: str,
    output_dir: str,
    cfg: Config,
    name: str = "anat_preproc_wf",
) -> pe.Workflow:
    """Build the workflow for one structural scan.

    Parameters
    ----------
    in_file : str
        Raw BIDS image.
    entities : mapping
        Its BIDS entities (sub, ses, acq, run, ...), kept in output names.
    modality : {"T1w", "T2w", "FLAIR"}
    output_dir : str
        BIDS-Derivatives root.
    cfg : Config
        Resolved configuration (``anat``, ``templates``, ``execution`` used).
    name : str
        Workflow name.

    Returns
    -------
    nipype Workflow
        ``inputnode.in_file``; ``outputnode``: ``preproc`` (N4-corrected,
        native RAS), ``mask`` (native brain mask), ``xfm`` (affine to MNI,
        forward transform for ants.apply_transforms), ``std_preproc`` and
        ``std_mask`` (MNI at the first output resolution).
    """
    a = cfg.anat
    threads = cfg.execution.omp_nthreads
    use_deepbet = a.skull_strip == "deepbet" and modality == "T1w"
    tdir = cfg.templates.template_dir or None
    reg_template = str(registration_template(modality, use_deepbet, cfg))

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["in_file"]), name="inputnode")
    inputnode.inputs.in_file = in_file
    outputnode = pe.Node(
        IdentityInterface(fields=["preproc", "mask", "xfm", "std_preproc", "std_mask"]), name="outputnode"
    )

    validate = pe.Node(ValidateAnat(qform_sform_tolerance_mm=a.qform_sform_tolerance_mm), name="validate")
    n4 = pe.Node(
        N4Correct(
            shrink_factor=a.n4_shrink_factor,
            iterations=list(a.n4_iterations),
            convergence=a.n4_convergence,
            working_resolution_mm=a.n4_working_resolution_mm,
            num_threads=threads,
        ),
        name="n4",
        n_procs=threads,
    )
    register = pe.Node(
        RegisterAffine(template=reg_template, **a.affine_kwargs(), num_threads=threads),
        name="register",
        n_procs=threads,
    )
    wf.connect([
        (inputnode, validate, [("in_file", "in_file")]),
        (validate, n4, [("out_file", "in_file")]),
        (n4, register, [("out_file", "moving")]),
    ])

    if use_deepbet:
        strip = pe.Node(
            DeepBetMask(threshold=a.deepbet_threshold, model_shape=a.deepbet_shape, num_threads=threads),
            name="skullstrip_deepbet",
            n_procs=threads,
        )
        wf.connect([
            (n4, strip, [("out_file", "in_file")]),
            (strip, register, [("out_mask", "moving_mask")]),
        ])
    else:
        strip = pe.Node(
            TemplateMaskToNative(template_mask=str(get_template(a.registration_resolution, "mask", "brain", tdir)),
                                 num_threads=threads),
            name="skullstrip_template",
            n_procs=threads,
        )
        wf.connect([
            (n4, strip, [("out_file", "native")]),
            (register, strip, [("xfm", "xfm")]),
        ])

    # ``to_std`` gives the transform every MNI output goes through: the affine, or with
    # ``registration = "syn"`` the composite of the affine and the SyN warp (the template-mask skull strip
    # above always uses the affine: a displacement field is not inverted by a flag).
    to_std = register
    if a.registration == "syn":
        to_std = pe.Node(
            RegisterSyN(
                template=reg_template,
                metric=a.syn_metric,
                iterations=list(a.syn_iterations),
                moving_resolution_mm=a.registration_moving_resolution_mm,
                seed=a.registration_seed,
                num_threads=threads,
            ),
            name="register_syn",
            n_procs=threads,
        )
        wf.connect([
            (n4, to_std, [("out_file", "moving")]),
            (register, to_std, [("xfm", "affine_xfm")]),
        ])
        if use_deepbet:
            wf.connect(strip, "out_mask", to_std, "moving_mask")

    wf.connect([
        (n4, outputnode, [("out_file", "preproc")]),
        (strip, outputnode, [("out_mask", "mask")]),
        (to_std, outputnode, [("xfm", "xfm")]),
    ])

    params = config_to_dict(a)
    for i, res in enumerate(a.output_resolutions):
        grid = str(get_template(res, "mask", "brain", tdir))
        rs_img, rs_mask, rs_bias = (
            pe.Node(ResampleToTemplate(template=grid, kind=kind, num_threads=threads),
                    name=f"resample_{label}_res{res}", n_procs=threads)
            for kind, label in (("image", "preproc"), ("mask", "mask"), ("field", "biasfield"))
        )
        sink = pe.Node(
            WriteAnatDerivatives(
                output_dir=output_dir,
                source_file=in_file,
                entities=dict(entities),
                modality=modality,
                resolution=res,
                skull_strip="deepbet" if use_deepbet else "template",
                template=reg_template,
                parameters=params,
            ),
            name=f"ds_anat_res{res}",
            run_without_submitting=True,
        )
        # Always re-check the published files: cheap (it only copies what changed)
        # and it restores derivatives deleted from OUTPUT_DIR since the last run.
        sink.overwrite = True
        wf.connect([
            (n4, rs_img, [("out_file", "in_file")]),
            (strip, rs_mask, [("out_mask", "in_file")]),
            (n4, rs_bias, [("bias_field", "in_file")]),
            (to_std, rs_img, [("xfm", "xfm")]),
            (to_std, rs_mask, [("xfm", "xfm")]),
            (to_std, rs_bias, [("xfm", "xfm")]),
            (rs_img, sink, [("out_file", "preproc")]),
            (rs_mask, sink, [("out_file", "mask")]),
            (rs_bias, sink, [("out_file", "biasfield")]),
            (register, sink, [("xfm", "xfm")]),
            (validate, sink, [("fixes_file", "fixes_file")]),
        ])
        if to_std is not register:
            wf.connect(to_std, "xfm", sink, "warp")
        if i == 0:
            wf.connect([
                (rs_img, outputnode, [("out_file", "std_preproc")]),
                (rs_mask, outputnode, [("out_file", "std_mask")]),
            ])
    return wf
