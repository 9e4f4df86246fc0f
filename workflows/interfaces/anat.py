"""nipype interfaces for anatomical preprocessing: thin glue over :mod:`workflows.ops.anat`.

Every input and output is a file path or a scalar, never an array, so nipype
hashes real content and never reuses a stale result.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from workflows.ops import anat as ops
from workflows.ops.itk_threads import call_with_threads

__all__ = [
    "ValidateAnat",
    "N4Correct",
    "RegisterAffine",
    "RegisterSyN",
    "DeepBetMask",
    "TemplateMaskToNative",
    "ResampleToTemplate",
]

LOG = logging.getLogger(__name__)


def _out(runtime, name: str) -> str:
    return str(Path(runtime.cwd) / name)


# ITK fixes its thread count when antspyx is first imported in a process; every ANTs call goes through
# call_with_threads so a node gets the threads it is given (a fresh interpreter on a mismatch).


class _ValidateInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw structural image")
    qform_sform_tolerance_mm = traits.Float(1.0, usedefault=True)


class _ValidateOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="validated image, RAS, float32")
    fixes_file = File(exists=True, desc="JSON list of the fixes applied")


class ValidateAnat(SimpleInterface):
    """Validate a structural image, fix what fMRIPrep fixes, reorient to RAS."""

    input_spec = _ValidateInputSpec
    output_spec = _ValidateOutputSpec

    def _run_interface(self, runtime):
        # Native intermediates stay uncompressed: gzip of a 1 mm volume costs about 0.6 s per write.
        out = _out(runtime, "validated_RAS.nii")
        fixes = ops.validate_anat_file(
            self.inputs.in_file, out, qform_sform_tolerance_mm=self.inputs.qform_sform_tolerance_mm
        )
        for fix in fixes:
            # One line per repair naming the file, as the BOLD validation does; reorienting is routine.
            level = logging.INFO if fix.startswith("reoriented") else logging.WARNING
            LOG.log(level, "%s: %s", self.inputs.in_file, fix)
        fixes_file = _out(runtime, "validation_fixes.json")
        Path(fixes_file).write_text(json.dumps(fixes))
        self._results.update(out_file=out, fixes_file=fixes_file)
        return runtime


class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    shrink_factor = traits.Int(4, usedefault=True)
    iterations = traits.List(traits.Int, [50, 50, 50, 50], usedefault=True)
    convergence = traits.Float(1e-7, usedefault=True)
    working_resolution_mm = traits.Float(0.0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads (not hashed)")


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected image")
    bias_field = File(exists=True, desc="estimated multiplicative bias field")


class N4Correct(SimpleInterface):
    """N4 bias-field correction (antspyx)."""

    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        out, bias = _out(runtime, "n4.nii"), _out(runtime, "biasfield.nii")
        call_with_threads(
            self.inputs.num_threads,
            ops.n4_correct,
            self.inputs.in_file,
            out,
            bias,
            shrink_factor=self.inputs.shrink_factor,
            iterations=self.inputs.iterations,
            convergence=self.inputs.convergence,
            working_resolution_mm=self.inputs.working_resolution_mm,
        )
        self._results.update(out_file=out, bias_field=bias)
        return runtime


class _RegisterInputSpec(BaseInterfaceInputSpec):
    moving = File(exists=True, mandatory=True)
    template = File(exists=True, mandatory=True)
    moving_mask = File(exists=True, desc="restrict the metric to this native mask")
    metric = traits.Enum("mattes", "GC", "meansquares", usedefault=True)
    iterations = traits.List(traits.Int, mandatory=True)
    shrink_factors = traits.List(traits.Int, mandatory=True)
    smoothing_sigmas = traits.List(traits.Float, mandatory=True)
    sampling_rate = traits.Float(0.2, usedefault=True)
    moving_resolution_mm = traits.Float(0.0, usedefault=True)
    init_arc_deg = traits.Float(27.0, usedefault=True, desc="rotation search half-arc (0 = centres of mass)")
    init_step_deg = traits.Float(15.0, usedefault=True)
    seed = traits.Int(13, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads (not hashed)")


class _RegisterOutputSpec(TraitedSpec):
    xfm = File(exists=True, desc="ITK affine, template -> subject points (forward transform)")


class RegisterAffine(SimpleInterface):
    """12-dof affine registration to a template (antspyx)."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        xfm = _out(runtime, "to_template_affine.mat")
        call_with_threads(
            self.inputs.num_threads,
            ops.register_affine,
            self.inputs.moving,
            self.inputs.template,
            xfm,
            moving_mask=self.inputs.moving_mask if isdefined(self.inputs.moving_mask) else None,
            metric=self.inputs.metric,
            iterations=self.inputs.iterations,
            shrink_factors=self.inputs.shrink_factors,
            smoothing_sigmas=self.inputs.smoothing_sigmas,
            sampling_rate=self.inputs.sampling_rate,
            moving_resolution_mm=self.inputs.moving_resolution_mm,
            init_arc_deg=self.inputs.init_arc_deg,
            init_step_deg=self.inputs.init_step_deg,
            seed=self.inputs.seed,
        )
        self._results["xfm"] = xfm
        return runtime


class _SyNInputSpec(BaseInterfaceInputSpec):
    moving = File(exists=True, mandatory=True)
    template = File(exists=True, mandatory=True)
    affine_xfm = File(exists=True, mandatory=True, desc="affine to start from (RegisterAffine.xfm)")
    moving_mask = File(exists=True, desc="restrict the metric to this native mask")
    metric = traits.Enum("mattes", "CC", "meansquares", usedefault=True)
    iterations = traits.List(traits.Int, mandatory=True)
    moving_resolution_mm = traits.Float(0.0, usedefault=True)
    seed = traits.Int(13, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads (not hashed)")


class _SyNOutputSpec(TraitedSpec):
    xfm = File(exists=True, desc="ITK composite (affine + warp, .h5), template -> subject points")


class RegisterSyN(SimpleInterface):
    """SyN after the affine (antspyx); one composite transform to the template."""

    input_spec = _SyNInputSpec
    output_spec = _SyNOutputSpec

    def _run_interface(self, runtime):
        xfm = _out(runtime, "to_template_composite.h5")
        call_with_threads(
            self.inputs.num_threads,
            ops.register_syn,
            self.inputs.moving,
            self.inputs.template,
            self.inputs.affine_xfm,
            xfm,
            moving_mask=self.inputs.moving_mask if isdefined(self.inputs.moving_mask) else None,
            metric=self.inputs.metric,
            iterations=self.inputs.iterations,
            moving_resolution_mm=self.inputs.moving_resolution_mm,
            seed=self.inputs.seed,
        )
        self._results["xfm"] = xfm
        return runtime


class _DeepBetInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    threshold = traits.Float(0.5, usedefault=True)
    model_shape = traits.Int(192, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads (not hashed)")


class _MaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True)


class DeepBetMask(SimpleInterface):
    """Native-space brain mask with deepbet."""

    input_spec = _DeepBetInputSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        import torch

        torch.set_num_threads(max(1, self.inputs.num_threads))
        out = _out(runtime, "brain_mask.nii")
        ops.deepbet_mask(
            self.inputs.in_file, out, threshold=self.inputs.threshold, model_shape=self.inputs.model_shape
        )
        self._results["out_mask"] = out
        return runtime


class _TemplateMaskInputSpec(BaseInterfaceInputSpec):
    native = File(exists=True, mandatory=True)
    template_mask = File(exists=True, mandatory=True)
    xfm = File(exists=True, mandatory=True)
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads (not hashed)")


class TemplateMaskToNative(SimpleInterface):
    """Carry the template brain mask into native space (the ``template`` skull strip)."""

    input_spec = _TemplateMaskInputSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        out = _out(runtime, "brain_mask.nii")
        call_with_threads(self.inputs.num_threads, ops.template_mask_to_native, self.inputs.native,
                          self.inputs.template_mask, self.inputs.xfm, out)
        self._results["out_mask"] = out
        return runtime


class _ResampleInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    template = File(exists=True, mandatory=True, desc="target grid")
    xfm = File(exists=True, mandatory=True)
    kind = traits.Enum("image", "mask", "field", usedefault=True)
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads (not hashed)")


class _ResampleOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class ResampleToTemplate(SimpleInterface):
    """Resample onto the template grid with one interpolation."""

    input_spec = _ResampleInputSpec
    output_spec = _ResampleOutputSpec

    def _run_interface(self, runtime):
        out = _out(runtime, f"resampled_{self.inputs.kind}.nii.gz")
        call_with_threads(self.inputs.num_threads, ops.resample_to_template, self.inputs.in_file,
                          self.inputs.template, self.inputs.xfm, out, kind=self.inputs.kind)
        self._results["out_file"] = out
        return runtime
