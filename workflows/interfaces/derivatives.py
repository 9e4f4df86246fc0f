"""Sinks that publish workflow results into the BIDS-Derivatives tree."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits

from pipeline.core.derivatives import SPACE, anat_outputs, raw_source_uri
from pipeline.core.provenance import SIDECAR_DISTRIBUTIONS, software_versions
from workflows.ops.sink import publish_file, publish_json

__all__ = ["WriteAnatDerivatives"]


class _AnatSinkInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    source_file = traits.Str(mandatory=True, desc="raw BIDS image these derivatives come from")
    entities = traits.Dict(mandatory=True)
    modality = traits.Enum("T1w", "T2w", "FLAIR", mandatory=True)
    resolution = traits.Int(2, usedefault=True)
    skull_strip = traits.Str(mandatory=True)
    template = traits.Str(mandatory=True, desc="template image the scan was registered to")
    parameters = traits.Dict(desc="resolved anat config")
    preproc = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    biasfield = File(exists=True, mandatory=True)
    xfm = File(exists=True, mandatory=True)
    warp = File(exists=True, desc="affine + SyN composite (.h5), when registration is syn")
    fixes_file = File(exists=True, mandatory=True)


class _AnatSinkOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str)
    n_written = traits.Int(desc="files whose content changed")


class WriteAnatDerivatives(SimpleInterface):
    """Copy one scan's MNI outputs to their BIDS-Derivatives names, with a JSON sidecar."""

    input_spec = _AnatSinkInputSpec
    output_spec = _AnatSinkOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        out = anat_outputs(i.output_dir, i.entities, i.modality, i.resolution)
        fixes = json.loads(Path(i.fixes_file).read_text())
        source = Path(i.source_file)
        sidecar = {
            "Sources": [raw_source_uri(_relative_to_dataset(source))],
            "SpatialReference": {"Space": SPACE, "Resolution": i.resolution, "Template": Path(i.template).name},
            "SkullStripped": False,
            "SkullStripMethod": i.skull_strip,
            "RegistrationMetric": i.parameters.get("registration_metric", "mattes") if i.parameters else "mattes",
            "Transform": out.warp.name if isdefined(i.warp) else out.xfm.name,
            "AffineTransform": out.xfm.name,
            "BrainMask": out.mask.name,
            "BiasField": out.biasfield.name,
            "ValidationFixes": fixes,
            "SoftwareVersions": software_versions(SIDECAR_DISTRIBUTIONS),
            "Parameters": dict(i.parameters) if i.parameters else {},
        }
        written = 0
        for src, dst in (
            (i.preproc, out.preproc),
            (i.mask, out.mask),
            (i.biasfield, out.biasfield),
            (i.xfm, out.xfm),
        ):
            written += publish_file(src, dst)
        published = [out.preproc, out.mask, out.biasfield, out.xfm, out.sidecar]
        if isdefined(i.warp):
            written += publish_file(i.warp, out.warp)
            published.append(out.warp)
        elif out.warp.is_file():
            out.warp.unlink()  # a warp of an earlier syn run no longer describes these outputs
        written += publish_json(sidecar, out.sidecar)
        self._results["out_files"] = [str(p) for p in published]
        self._results["n_written"] = written
        return runtime


def _relative_to_dataset(path: Path) -> str:
    """``sub-01/anat/sub-01_T1w.nii.gz`` for a file inside a BIDS dataset."""
    parts = path.parts
    for idx, part in enumerate(parts):
        if part.startswith("sub-"):
            return "/".join(parts[idx:])
    return path.name
