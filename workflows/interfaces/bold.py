"""nipype interfaces of the BOLD workflow.

Each interface is a thin ``SimpleInterface`` around the functions in
``workflows.ops``: typed traits in, file paths out (nodes never pass arrays),
results written inside the node's working directory. Only
:class:`WriteBoldDerivatives` writes into the output directory, atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

__all__ = [
    "BoldConfounds",
    "BoldReference",
    "DesignRegressor",
    "MotionCorrection",
    "NonSteadyState",
    "ParcellateDenoise",
    "RegisterBoldReference",
    "ResampleBoldToStd",
    "TissueMasks",
    "ValidateBold",
    "WriteBoldDerivatives",
]


def _cwd(name: str) -> str:
    return os.path.join(os.getcwd(), name)


class _ValidateBoldInputSpec(BaseInterfaceInputSpec):
    bold_file = File(exists=True, mandatory=True, desc="raw BOLD run")
    repetition_time = traits.Float(desc="RepetitionTime from the sidecar (s); unset: use the header")
    min_volumes = traits.Int(5, usedefault=True)
    tr_tolerance = traits.Float(0.01, usedefault=True)


class _ValidateBoldOutputSpec(TraitedSpec):
    repetition_time = traits.Float(desc="TR in seconds")
    n_volumes = traits.Int()
    report = File(exists=True, desc="JSON: header/sidecar TR, warnings")


class ValidateBold(SimpleInterface):
    """Check the run is 4-D with enough volumes and settle its TR."""

    input_spec = _ValidateBoldInputSpec
    output_spec = _ValidateBoldOutputSpec

    def _run_interface(self, runtime):
        from workflows.ops.bold import LOG, validate_bold, write_json

        sidecar_tr = self.inputs.repetition_time if isdefined(self.inputs.repetition_time) else None
        result = validate_bold(self.inputs.bold_file, sidecar_tr, self.inputs.min_volumes, self.inputs.tr_tolerance)
        for message in result.warnings:
            LOG.warning("%s: %s", self.inputs.bold_file, message)
        self._results["repetition_time"] = result.repetition_time
        self._results["n_volumes"] = result.n_volumes
        self._results["report"] = str(write_json(_cwd("validation.json"), {
            "RepetitionTime": result.repetition_time,
            "HeaderRepetitionTime": result.header_tr,
            "SidecarRepetitionTime": sidecar_tr,
            "Shape": list(result.shape),
            "Warnings": list(result.warnings),
        }))
        return runtime


class _NonSteadyStateInputSpec(BaseInterfaceInputSpec):
    bold_file = File(exists=True, mandatory=True)
    n_volumes = traits.Int(mandatory=True, desc="volumes in the run (from validation)")
    dummy_scans = traits.Int(-1, usedefault=True, desc="< 0: detect; >= 0: remove exactly this many")
    max_dummy_scans = traits.Int(10, usedefault=True)
    zscore = traits.Float(3.5, usedefault=True)
    min_volumes = traits.Int(5, usedefault=True)


class _NonSteadyStateOutputSpec(TraitedSpec):
    n_dummy = traits.Int(desc="volumes removed")
    out_file = File(exists=True, desc="the run without them, float32")


class NonSteadyState(SimpleInterface):
    """Detect (or take from the config) and remove leading non-steady-state volumes."""

    input_spec = _NonSteadyStateInputSpec
    output_spec = _NonSteadyStateOutputSpec

    def _run_interface(self, runtime):
        from pipeline.core.errors import InputError
        from workflows.ops.bold import detect_nonsteady, drop_volumes

        if self.inputs.dummy_scans >= 0:
            n = self.inputs.dummy_scans
        else:
            n = detect_nonsteady(self.inputs.bold_file, self.inputs.zscore, self.inputs.max_dummy_scans)
        n_vols = self.inputs.n_volumes
        if n_vols - n < self.inputs.min_volumes:
            raise InputError(self.inputs.bold_file,
                             f"only {n_vols - n} volumes left after removing {n} non-steady-state volumes")
        self._results["n_dummy"] = int(n)
        self._results["out_file"] = str(drop_volumes(self.inputs.bold_file, n, _cwd("bold_steady.nii")))
        return runtime


class _BoldReferenceInputSpec(BaseInterfaceInputSpec):
    bold_file = File(exists=True, mandatory=True)
    n_volumes = traits.Int(10, usedefault=True, desc="median of the first n volumes")


class _BoldReferenceOutputSpec(TraitedSpec):
    ref_file = File(exists=True)
    mask_file = File(exists=True)


class BoldReference(SimpleInterface):
    """Median reference volume and its brain mask."""

    input_spec = _BoldReferenceInputSpec
    output_spec = _BoldReferenceOutputSpec

    def _run_interface(self, runtime):
        from workflows.ops.bold import bold_reference

        ref, mask = bold_reference(self.inputs.bold_file, self.inputs.n_volumes,
                                   _cwd("boldref.nii.gz"), _cwd("boldref_mask.nii.gz"))
        self._results.update(ref_file=str(ref), mask_file=str(mask))
        return runtime


class _MotionCorrectionInputSpec(BaseInterfaceInputSpec):
    bold_file = File(exists=True, mandatory=True)
    ref_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    enabled = traits.Bool(True, usedefault=True, desc="False: identity transforms, zero motion")
    method = traits.Enum("gauss_newton", "ants", usedefault=True)
    iterations = traits.List(traits.Int, [20, 4], usedefault=True)
    shrink_factors = traits.List(traits.Int, [3, 1], usedefault=True)
    smoothing_sigmas = traits.List(traits.Float, [1.5, 0.0], usedefault=True)
    sampling_rate = traits.Float(0.3, usedefault=True)
    random_seed = traits.Int(42, usedefault=True)


class _MotionCorrectionOutputSpec(TraitedSpec):
    xfm_files = traits.List(File(exists=True), desc="one ANTs .mat per volume (reference -> volume)")
    motion_file = File(exists=True, desc="TSV of trans_x..rot_z (mm, rad)")


class MotionCorrection(SimpleInterface):
    """Rigid per-volume registration to the reference (Gauss-Newton or antspyx)."""

    input_spec = _MotionCorrectionInputSpec
    output_spec = _MotionCorrectionOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from workflows.ops.bold import identity_transforms, motion_correct
        from workflows.ops.confounds import MOTION_NAMES

        if self.inputs.enabled:
            xfms, params = motion_correct(
                self.inputs.bold_file, self.inputs.ref_file, self.inputs.mask_file, _cwd("xfms"),
                method=self.inputs.method, iterations=tuple(self.inputs.iterations), shrink_factors=tuple(self.inputs.shrink_factors),
                smoothing_sigmas=tuple(self.inputs.smoothing_sigmas), sampling_rate=self.inputs.sampling_rate,
                random_seed=self.inputs.random_seed,
            )
        else:
            n = nib.load(self.inputs.bold_file).shape[3]
            xfms, params = identity_transforms(n, _cwd("xfms")), np.zeros((n, 6))
        motion_file = _cwd("motion_params.tsv")
        np.savetxt(motion_file, params, delimiter="\t", header="\t".join(MOTION_NAMES), comments="", fmt="%.8g")
        self._results.update(xfm_files=[str(x) for x in xfms], motion_file=motion_file)
        return runtime


class _RegisterInputSpec(BaseInterfaceInputSpec):
    ref_file = File(exists=True, mandatory=True, desc="BOLD reference (moving)")
    target_file = File(exists=True, mandatory=True, desc="T1w or EPI template (fixed)")
    target_mask = File(exists=True, desc="brain mask of the target (skull-strips it)")
    transform = traits.Enum("Rigid", "Affine", usedefault=True)
    random_seed = traits.Int(42, usedefault=True)


class _RegisterOutputSpec(TraitedSpec):
    xfm_file = File(exists=True, desc="ANTs .mat: BOLD reference -> target")


class RegisterBoldReference(SimpleInterface):
    """BOLD reference to the subject's T1w or to the EPI template."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        from workflows.ops.bold import register_reference

        mask = self.inputs.target_mask if isdefined(self.inputs.target_mask) else None
        self._results["xfm_file"] = str(register_reference(
            self.inputs.ref_file, self.inputs.target_file, _cwd("bold2target_xfm.mat"),
            transform=self.inputs.transform, target_mask=mask, random_seed=self.inputs.random_seed,
        ))
        return runtime


class _ResampleInputSpec(BaseInterfaceInputSpec):
    bold_file = File(exists=True, mandatory=True)
    ref_file = File(exists=True, mandatory=True)
    ref_mask = File(exists=True, mandatory=True)
    xfm_files = InputMultiObject(File(exists=True), mandatory=True)
    bold2target_xfm = File(exists=True, mandatory=True)
    anat2std_xfm = File(exists=True, desc="T1w -> MNI; unset for runs registered to a template")
    std_reference = File(exists=True, mandatory=True, desc="MNI 2 mm grid")
    std_brain_mask = File(exists=True, mandatory=True, desc="MNI brain mask")


class _ResampleOutputSpec(TraitedSpec):
    bold_std = File(exists=True)
    boldref_std = File(exists=True)
    mask_std = File(exists=True, desc="EPI coverage within the MNI brain mask")


class ResampleBoldToStd(SimpleInterface):
    """One-interpolation resampling of every volume (and the reference) to MNI."""

    input_spec = _ResampleInputSpec
    output_spec = _ResampleOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from workflows.ops.bold import _save_like, resample_bold, resample_image

        anat2std = self.inputs.anat2std_xfm if isdefined(self.inputs.anat2std_xfm) else None
        bold_std = resample_bold(self.inputs.bold_file, list(self.inputs.xfm_files), self.inputs.bold2target_xfm,
                                 self.inputs.std_reference, _cwd("bold_std.nii"), anat2std_xfm=anat2std)
        chain = ([anat2std] if anat2std else []) + [self.inputs.bold2target_xfm]
        boldref = resample_image(self.inputs.ref_file, chain, self.inputs.std_reference, _cwd("boldref_std.nii.gz"))
        coverage = resample_image(self.inputs.ref_mask, chain, self.inputs.std_reference, _cwd("coverage_std.nii.gz"),
                                  interpolator="nearestNeighbor")
        brain = nib.load(self.inputs.std_brain_mask)
        mask = (np.asanyarray(nib.load(str(coverage)).dataobj) > 0) & (np.asanyarray(brain.dataobj) > 0)
        _save_like(mask.astype(np.uint8), brain, _cwd("mask_std.nii.gz"))
        self._results.update(bold_std=str(bold_std), boldref_std=str(boldref), mask_std=_cwd("mask_std.nii.gz"))
        return runtime


class _TissueInputSpec(BaseInterfaceInputSpec):
    std_t1w = File(exists=True, mandatory=True, desc="MNI brain T1w template")
    std_brain_mask = File(exists=True, mandatory=True)
    t1w_file = File(exists=True, desc="subject T1w (native); unset: classify the template")
    t1w_mask = File(exists=True, desc="subject brain mask (native); intersected with the template mask")
    anat2std_xfm = File(exists=True)
    wm_erosion = traits.Int(2, usedefault=True)
    csf_erosion = traits.Int(1, usedefault=True)


class _TissueOutputSpec(TraitedSpec):
    wm_mask = File(exists=True)
    csf_mask = File(exists=True)


class TissueMasks(SimpleInterface):
    """WM and CSF masks in MNI space, from the subject's T1w when there is one."""

    input_spec = _TissueInputSpec
    output_spec = _TissueOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from workflows.ops.bold import _save_like, resample_image, tissue_masks

        t1, mask = self.inputs.std_t1w, self.inputs.std_brain_mask
        if isdefined(self.inputs.t1w_file) and isdefined(self.inputs.anat2std_xfm):
            xfm = [self.inputs.anat2std_xfm]
            t1 = str(resample_image(self.inputs.t1w_file, xfm, self.inputs.std_t1w, _cwd("t1w_std.nii.gz")))
            if isdefined(self.inputs.t1w_mask):
                # The T1w keeps its skull: only the subject's own brain mask
                # keeps bright scalp out of the white-matter class.
                own = resample_image(self.inputs.t1w_mask, xfm, self.inputs.std_t1w, _cwd("t1w_mask_std.nii.gz"),
                                     interpolator="nearestNeighbor")
                tpl = nib.load(self.inputs.std_brain_mask)
                both = (np.asanyarray(tpl.dataobj) > 0) & (np.asanyarray(nib.load(str(own)).dataobj) > 0)
                mask = _cwd("brain_mask_std.nii.gz")
                _save_like(both.astype(np.uint8), tpl, mask)
        wm, csf = tissue_masks(t1, mask, _cwd("wm_mask.nii.gz"), _cwd("csf_mask.nii.gz"),
                               self.inputs.wm_erosion, self.inputs.csf_erosion)
        self._results.update(wm_mask=str(wm), csf_mask=str(csf))
        return runtime


class _ConfoundsInputSpec(BaseInterfaceInputSpec):
    bold_std = File(exists=True, mandatory=True)
    mask_std = File(exists=True, mandatory=True)
    wm_mask = File(exists=True, mandatory=True)
    csf_mask = File(exists=True, mandatory=True)
    motion_file = File(exists=True, mandatory=True)
    fd_radius_mm = traits.Float(50.0, usedefault=True)
    repetition_time = traits.Float(mandatory=True)
    high_pass = traits.Float(0.008, usedefault=True, desc="cosine drift terms below this (Hz); 0: none")
    compcor_components = traits.Int(5, usedefault=True)
    design_file = File(exists=True, desc="HRF-convolved design TSV (task runs): correlations go in the JSON")


class _ConfoundsOutputSpec(TraitedSpec):
    confounds_file = File(exists=True)
    confounds_json = File(exists=True)


_CONFOUND_DESCRIPTIONS = {
    **{f"trans_{a}": f"Translation along {a} (mm, RAS) of the rigid fit of each volume to the BOLD reference"
       for a in "xyz"},
    **{f"rot_{a}": f"Rotation about {a} (radians, R = Rz Ry Rx) of the rigid fit to the BOLD reference"
       for a in "xyz"},
    "framewise_displacement": "Power et al. (2012) FD (mm), sphere radius bold.fd_radius_mm",
    "dvars": "RMS over brain voxels of the temporal difference, intensities scaled to median 1000",
    "std_dvars": "DVARS divided by its expected value under stationarity (Nichols 2013)",
    "global_signal": "Mean over the brain mask (MNI)",
    "white_matter": "Mean over the eroded white-matter mask (MNI)",
    "csf": "Mean over the eroded ventricular CSF mask (MNI)",
    "cosine": "DCT basis function of the high-pass filter (bold.high_pass Hz), as fMRIPrep's cosine regressors",
    "a_comp_cor": "Anatomical CompCor component of the combined eroded WM + CSF mask, after the cosine high-pass",
}


class BoldConfounds(SimpleInterface):
    """Confounds TSV (BIDS names) and its JSON description."""

    input_spec = _ConfoundsInputSpec
    output_spec = _ConfoundsOutputSpec

    def _run_interface(self, runtime):
        from workflows.ops.bold import confounds_table, write_json
        from workflows.ops.denoise import design_correlations, read_design

        params = np.loadtxt(self.inputs.motion_file, delimiter="\t", skiprows=1, ndmin=2)
        table, compcor_meta = confounds_table(
            self.inputs.bold_std, self.inputs.mask_std, self.inputs.wm_mask, self.inputs.csf_mask, params,
            self.inputs.fd_radius_mm, repetition_time=self.inputs.repetition_time,
            high_pass=self.inputs.high_pass, compcor_components=self.inputs.compcor_components)
        out = _cwd("confounds.tsv")
        table.to_csv(out, sep="\t", index=False, na_rep="n/a", float_format="%.10g")
        cosine = [c for c in table.columns if c.startswith("cosine")]
        corr = {}
        if isdefined(self.inputs.design_file):
            drift = table[cosine].to_numpy(dtype=float) if cosine else None
            corr = design_correlations(table.drop(columns=cosine), read_design(self.inputs.design_file), drift)
        desc = {}
        for col in table.columns:
            if col.startswith(("cosine", "a_comp_cor")):
                base = col.rstrip("0123456789").rstrip("_")
            else:
                base = col.split("_derivative1")[0].split("_power2")[0]
            text = _CONFOUND_DESCRIPTIONS[base]
            if col != base and not col.startswith(("cosine", "a_comp_cor")):
                text = f"{text}; {col[len(base) + 1:].replace('_', ', ')}"
            desc[col] = {"Description": text, **compcor_meta.get(col, {})}
            if col in corr:
                # Pearson r with the HRF-convolved events, both high-passed (cosine terms).
                desc[col]["DesignCorrelation"] = round(corr[col], 4)
        self._results.update(confounds_file=out, confounds_json=str(write_json(_cwd("confounds.json"), desc)))
        return runtime


class _DesignInputSpec(BaseInterfaceInputSpec):
    events_file = File(exists=True, mandatory=True, desc="BIDS events.tsv of the run")
    n_volumes = traits.Int(mandatory=True, desc="volumes in the raw run")
    n_dummy = traits.Int(mandatory=True, desc="leading volumes removed")
    repetition_time = traits.Float(mandatory=True)


class _DesignOutputSpec(TraitedSpec):
    design_file = File(exists=True, desc="one-column TSV: HRF-convolved events at the kept volumes")


class DesignRegressor(SimpleInterface):
    """The task design (all events, Glover HRF) at the run's kept volumes."""

    input_spec = _DesignInputSpec
    output_spec = _DesignOutputSpec

    def _run_interface(self, runtime):
        from workflows.ops.denoise import design_regressor, write_design

        n_kept = self.inputs.n_volumes - self.inputs.n_dummy
        design = design_regressor(self.inputs.events_file, n_kept, self.inputs.repetition_time, self.inputs.n_dummy)
        self._results["design_file"] = str(write_design(_cwd("design.tsv"), design))
        return runtime


class _ParcellateInputSpec(BaseInterfaceInputSpec):
    bold_std = File(exists=True, mandatory=True)
    confounds_file = File(exists=True, mandatory=True)
    confounds_json = File(exists=True, mandatory=True)
    repetition_time = traits.Float(mandatory=True)
    preset = traits.Enum("none", "task", "simple", "simple_gsr", "scrubbing", "scrubbing_gsr", "compcor",
                         "compcor_gsr", mandatory=True, desc="denoising preset (resolved, not auto)")
    design_file = File(exists=True, desc="HRF-convolved design (the task preset needs it)")
    atlas = traits.Str("", usedefault=True, desc="bundled atlas name or labels NIfTI; empty: default")
    label_table = traits.Str("", usedefault=True)
    detrend = traits.Bool(True, usedefault=True)
    high_pass = traits.Float(0.008, usedefault=True)
    low_pass = traits.Float(0.0, usedefault=True)
    motion_regressors = traits.Enum(24, 0, 6, 12, usedefault=True)
    task_max_design_r = traits.Float(0.1, usedefault=True)
    scrub_fd_threshold = traits.Float(0.5, usedefault=True)
    scrub_dvars_threshold = traits.Float(1.5, usedefault=True)
    scrub_min_segment = traits.Int(5, usedefault=True)
    compcor_components = traits.Int(5, usedefault=True)
    standardize = traits.Bool(False, usedefault=True)


class _ParcellateOutputSpec(TraitedSpec):
    timeseries = File(exists=True, desc="denoised ROI series TSV (JSON sidecar next to it)")
    timeseries_json = File(exists=True)
    raw_timeseries = File(exists=True, desc="ROI means before denoising (node working directory)")
    atlas_name = traits.Str()


class ParcellateDenoise(SimpleInterface):
    """ROI means of the MNI BOLD run, then the denoising preset on those series."""

    input_spec = _ParcellateInputSpec
    output_spec = _ParcellateOutputSpec

    def _run_interface(self, runtime):
        import pandas as pd

        from pipeline.roi.atlas import load_atlas
        from pipeline.roi.parcellation import (
            extract_timeseries,
            write_timeseries,
            zero_variance_columns,
        )
        from workflows.ops.denoise import (
            clean_series,
            load_preset_confounds,
            read_design,
        )

        atlas = load_atlas(self.inputs.atlas or None, label_table=self.inputs.label_table or None)
        raw = extract_timeseries(self.inputs.bold_std, atlas, Path(_cwd("raw_timeseries.tsv")),
                                 self.inputs.repetition_time, source="preprocessed")
        raw_meta = json.loads(raw.with_suffix(".json").read_text())
        signals_TR = pd.read_csv(raw, sep="\t").to_numpy(dtype=np.float64)
        design = read_design(self.inputs.design_file) if isdefined(self.inputs.design_file) else None
        preset = self.inputs.preset
        confounds, sample_mask, info = load_preset_confounds(
            preset, self.inputs.confounds_file, self.inputs.confounds_json, os.getcwd(), design_T=design,
            task_max_design_r=self.inputs.task_max_design_r, motion_regressors=int(self.inputs.motion_regressors),
            high_pass=self.inputs.high_pass, scrub_fd_threshold=self.inputs.scrub_fd_threshold,
            scrub_dvars_threshold=self.inputs.scrub_dvars_threshold, scrub_min_segment=self.inputs.scrub_min_segment,
            compcor_components=self.inputs.compcor_components,
        )
        low_pass = self.inputs.low_pass if preset not in ("none", "task") else 0.0
        clean_TR = clean_series(signals_TR, confounds, sample_mask, self.inputs.repetition_time,
                                detrend=self.inputs.detrend, standardize=self.inputs.standardize, low_pass=low_pass)
        kept = np.arange(signals_TR.shape[0]) if sample_mask is None else np.asarray(sample_mask)
        empty = set(raw_meta["EmptyROIs"])
        zero_var = [n for n, z in zip(atlas.roi_names, zero_variance_columns(clean_TR)) if z or n in empty]
        meta = {
            **raw_meta,
            "NumberOfVolumes": int(clean_TR.shape[0]),
            "ZeroVarianceROIs": zero_var,
            "DenoisingPreset": preset,
            "Denoising": {**info, "method": "nilearn.interfaces.fmriprep.load_confounds + nilearn.signal.clean",
                          "detrend": self.inputs.detrend, "standardize": self.inputs.standardize,
                          "high_pass": self.inputs.high_pass, "low_pass": low_pass},
            "CensoredVolumes": [int(i) for i in np.setdiff1d(np.arange(signals_TR.shape[0]), kept)],
        }
        out = write_timeseries(Path(_cwd(f"atlas-{atlas.name}_timeseries.tsv")), clean_TR, atlas.roi_names, meta)
        self._results.update(timeseries=str(out), timeseries_json=str(out.with_suffix(".json")),
                             raw_timeseries=str(raw), atlas_name=atlas.name)
        return runtime


class _WriteInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    source_file = traits.Str(mandatory=True, desc="raw BOLD path (entities and Sources)")
    bold_std = File(exists=True, mandatory=True)
    boldref_std = File(exists=True, mandatory=True)
    mask_std = File(exists=True, mandatory=True)
    confounds_file = File(exists=True, mandatory=True)
    confounds_json = File(exists=True, mandatory=True)
    timeseries = File(exists=True, mandatory=True)
    timeseries_json = File(exists=True, mandatory=True)
    atlas_name = traits.Str(mandatory=True)
    validation = File(exists=True, mandatory=True)
    repetition_time = traits.Float(mandatory=True)
    n_dummy = traits.Int(mandatory=True)
    registration_target = traits.Str(mandatory=True)
    parameters = traits.Dict(desc="the bold config section, recorded in the sidecar")


class _WriteOutputSpec(TraitedSpec):
    bold_std = File(exists=True)
    boldref = File(exists=True)
    mask = File(exists=True)
    confounds = File(exists=True)
    timeseries = File(exists=True)
    sidecar = File(exists=True)


class WriteBoldDerivatives(SimpleInterface):
    """Copy the run's results to their BIDS-Derivatives names, atomically."""

    input_spec = _WriteInputSpec
    output_spec = _WriteOutputSpec

    def _run_interface(self, runtime):
        import ants
        import nibabel as nib
        import nilearn

        from pipeline import __version__
        from pipeline.core.atomic import atomic_copy, atomic_path, atomic_write_text
        from pipeline.core.derivatives import (
            func_outputs,
            parse_name,
            timeseries_output,
        )

        entities, _, _ = parse_name(self.inputs.source_file)
        outs = func_outputs(self.inputs.output_dir, entities)
        ts_out = timeseries_output(self.inputs.output_dir, entities, self.inputs.atlas_name)
        # float32 with a fast gzip: the MNI run is ~0.5 GB raw.
        with atomic_path(outs.preproc) as tmp:
            img = nib.load(self.inputs.bold_std)
            nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj, dtype=np.float32), img.affine, img.header), str(tmp))
        atomic_copy(self.inputs.boldref_std, outs.boldref)
        atomic_copy(self.inputs.mask_std, outs.mask)
        atomic_copy(self.inputs.confounds_json, outs.confounds_json)
        atomic_copy(self.inputs.confounds_file, outs.confounds)
        ts_meta = json.loads(Path(self.inputs.timeseries_json).read_text())
        ts_meta["Sources"] = [str(outs.preproc.relative_to(self.inputs.output_dir))]
        atomic_write_text(ts_out.with_suffix(".json"), json.dumps(ts_meta, indent=2) + "\n")
        atomic_copy(self.inputs.timeseries, ts_out)
        validation = json.loads(Path(self.inputs.validation).read_text())
        sidecar = {
            "RepetitionTime": self.inputs.repetition_time,
            "SkullStripped": False,
            "NonSteadyStateVolumesRemoved": self.inputs.n_dummy,
            "RegistrationTarget": self.inputs.registration_target,
            "Validation": validation,
            "Sources": [str(self.inputs.source_file)],
            "SoftwareVersions": {"neurocurate": __version__, "antspyx": ants.__version__,
                                 "nilearn": nilearn.__version__, "nibabel": nib.__version__},
            "Parameters": dict(self.inputs.parameters) if isdefined(self.inputs.parameters) else {},
        }
        atomic_write_text(outs.sidecar, json.dumps(sidecar, indent=2, default=str) + "\n")
        self._results.update(bold_std=str(outs.preproc), boldref=str(outs.boldref), mask=str(outs.mask),
                             confounds=str(outs.confounds), timeseries=str(ts_out), sidecar=str(outs.sidecar))
        return runtime
