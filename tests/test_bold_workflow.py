"""The BOLD workflow end to end on the real studyforrest run (no T1w).

The run has an ``events.tsv``, so the default config (``denoise = "auto"``)
denoises it with the task-safe ``task`` preset. Its block design must show in
the ROI series at least as well as in a crude pipeline without motion
correction or denoising (benchmarks/bold.py: Vis 0.262, best ROI 0.827): the
visual network's mean r with the HRF-convolved events >= 0.24, its best ROI
>= 0.76, and the visual network >= 2x every other network.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import load_config
from pipeline.core.derivatives import func_outputs, timeseries_output
from pipeline.roi.atlas import schaefer_network

ENTITIES = {"sub": "02", "task": "oneback", "run": "1"}


def _stimulus_regressor(events_tsv, n_volumes: int, tr: float, n_dummy: int) -> np.ndarray:
    from nilearn.glm.first_level import compute_regressor

    ev = pd.read_csv(events_tsv, sep="\t")
    cond = np.vstack([ev["onset"], ev["duration"], np.ones(len(ev))])
    reg, _ = compute_regressor(cond, "glover", (np.arange(n_volumes) + n_dummy) * tr, oversampling=16)
    return reg[:, 0]


@pytest.fixture(scope="module")
def bold_run(shared_data, tmp_path_factory):
    from workflows.bold import init_bold_preproc_wf

    work = tmp_path_factory.mktemp("bold")
    bold = shared_data / "func" / "sub-02_task-oneback_run-1_bold.nii.gz"
    metadata = json.loads(bold.with_name(bold.name.replace(".nii.gz", ".json")).read_text())
    cfg = load_config(overrides={"templates": {"template_dir": str(shared_data / "templates")}})
    wf = init_bold_preproc_wf(bold_file=str(bold), metadata=metadata, has_t1w=False,
                              output_dir=str(work / "out"), cfg=cfg)
    wf.base_dir = str(work / "wf")
    wf.config["execution"].update({"poll_sleep_duration": 0.01, "crashdump_dir": str(work / "crash")})
    graph = wf.run(plugin="Linear")
    nodes = {n.name: n for n in graph.nodes()}
    return work / "out", nodes, shared_data


@pytest.mark.integration
def test_real_run_outputs(bold_run):
    out, nodes, _ = bold_run
    paths = func_outputs(out, ENTITIES)
    for p in (paths.preproc, paths.sidecar, paths.mask, paths.boldref, paths.confounds, paths.confounds_json):
        assert p.is_file(), p
    import nibabel as nib

    img = nib.load(paths.preproc)
    n_dummy = nodes["nonsteady"].result.outputs.n_dummy
    assert img.shape == (91, 109, 91, 156 - n_dummy)
    sidecar = json.loads(paths.sidecar.read_text())
    assert sidecar["RepetitionTime"] == 2.0 and sidecar["RegistrationTarget"].endswith("SPM_OldNorm_EPI_2mm.nii.gz")
    conf = pd.read_csv(paths.confounds, sep="\t", na_values="n/a")
    for col in ("trans_x", "rot_z_derivative1_power2", "framewise_displacement", "dvars", "global_signal",
                "white_matter", "csf", "cosine00", "a_comp_cor_04"):
        assert col in conf.columns
    assert len(conf) == img.shape[3]
    meta = json.loads(paths.confounds_json.read_text())
    # task run: every confound's correlation with the design is reported
    assert all(-1 <= meta[c]["DesignCorrelation"] <= 1 for c in ("trans_x", "white_matter", "a_comp_cor_00"))
    assert meta["a_comp_cor_00"]["Method"] == "aCompCor" and "DesignCorrelation" not in meta["cosine00"]
    # a cooperative subject: sub-millimetre motion, but not zero (motion correction ran)
    assert 0.01 < conf["framewise_displacement"].mean() < 0.5


@pytest.mark.integration
def test_real_run_block_design_in_visual_network(bold_run):
    out, nodes, shared_data = bold_run
    ts_path = timeseries_output(out, ENTITIES, "Schaefer400Tian3")
    ts = pd.read_csv(ts_path, sep="\t")
    meta = json.loads(ts_path.with_suffix(".json").read_text())
    assert ts.shape[1] == 450 and meta["ROINames"] == list(ts.columns)
    assert meta["NumberOfVolumes"] == len(ts) and meta["Source"] == "preprocessed"
    assert np.isfinite(ts.to_numpy()).all()
    assert meta["DenoisingPreset"] == "task" and meta["Denoising"]["low_pass"] == 0.0
    dropped = meta["Denoising"]["dropped_for_design_correlation"]
    assert all(abs(r) > 0.1 for r in dropped.values())
    assert not set(dropped) & set(meta["Denoising"]["regressors"])

    n_dummy = nodes["nonsteady"].result.outputs.n_dummy
    reg = _stimulus_regressor(shared_data / "func" / "sub-02_task-oneback_run-1_events.tsv", len(ts), 2.0, n_dummy)
    x = ts.to_numpy() - ts.to_numpy().mean(axis=0)
    r = reg - reg.mean()
    norm = np.linalg.norm(x, axis=0) * np.linalg.norm(r)
    corr = np.divide(x.T @ r, norm, out=np.zeros(x.shape[1]), where=norm > 0)
    nets: dict[str, list[float]] = {}
    for name, c in zip(ts.columns, corr):
        nets.setdefault(schaefer_network(name) or "Subcortex", []).append(c)
    means = {k: float(np.mean(v)) for k, v in nets.items()}
    others = max(v for k, v in means.items() if k != "Vis")
    assert max(means, key=means.get) == "Vis", means
    assert means["Vis"] >= 0.24, means
    assert means["Vis"] >= 2 * others, means
    assert max(nets["Vis"]) >= 0.76, max(nets["Vis"])


def _edges(wf):
    return {(u.name, v.name, src, dst) for u, v, d in wf._graph.edges(data=True) for src, dst in d["connect"]}


def test_workflow_wiring_with_and_without_t1w(tmp_path, template_dir, shared_data):
    from workflows.bold import init_bold_preproc_wf

    bold = str(shared_data / "func" / "sub-02_task-oneback_run-1_bold.nii.gz")
    cfg = load_config(overrides={"templates": {"template_dir": str(template_dir)}})
    wf = init_bold_preproc_wf(bold_file=bold, metadata={"RepetitionTime": 2.0}, has_t1w=True,
                              output_dir=str(tmp_path), cfg=cfg)
    edges = _edges(wf)
    assert ("inputnode", "register", "t1w_preproc", "target_file") in edges
    assert ("inputnode", "resample_std", "anat2std_xfm", "anat2std_xfm") in edges
    assert ("validate", "nonsteady", "n_volumes", "n_volumes") in edges
    assert wf.get_node("register").inputs.transform == "Rigid"
    assert wf.get_node("validate").inputs.repetition_time == 2.0

    wf = init_bold_preproc_wf(bold_file=bold, metadata=2.5, has_t1w=False, output_dir=str(tmp_path), cfg=cfg)
    assert not any(e[0] == "inputnode" and e[2] == "t1w_preproc" for e in _edges(wf))
    assert wf.get_node("register").inputs.target_file.endswith("SPM_OldNorm_EPI_2mm.nii.gz")
    assert wf.get_node("validate").inputs.repetition_time == 2.5


def test_workflow_rejects_missing_epi_template(tmp_path, shared_data):
    from pipeline.core.errors import InputError
    from workflows.bold import init_bold_preproc_wf

    cfg = load_config(overrides={"bold": {"epi_template": str(tmp_path / "nope.nii.gz")}})
    with pytest.raises(InputError, match="epi_template does not exist"):
        init_bold_preproc_wf(bold_file=str(shared_data / "func" / "sub-02_task-oneback_run-1_bold.nii.gz"),
                             metadata={}, has_t1w=False, output_dir=str(tmp_path), cfg=cfg)


def test_workflow_denoise_preset_follows_events(tmp_path, template_dir, shared_data):
    from pipeline.core.errors import InputError
    from workflows.bold import init_bold_preproc_wf

    bold = shared_data / "func" / "sub-02_task-oneback_run-1_bold.nii.gz"
    cfg = load_config(overrides={"templates": {"template_dir": str(template_dir)}})
    wf = init_bold_preproc_wf(bold_file=str(bold), metadata=2.0, has_t1w=False, output_dir=str(tmp_path), cfg=cfg)
    assert wf.get_node("parcellate_denoise").inputs.preset == "task"
    assert ("design", "parcellate_denoise", "design_file", "design_file") in _edges(wf)
    assert ("design", "confounds", "design_file", "design_file") in _edges(wf)

    # the same run without its events.tsv is a resting run: the resting default, no design node
    rest = tmp_path / "sub-02_task-rest_bold.nii.gz"
    rest.symlink_to(bold)
    wf = init_bold_preproc_wf(bold_file=str(rest), metadata=2.0, has_t1w=False, output_dir=str(tmp_path), cfg=cfg)
    assert wf.get_node("parcellate_denoise").inputs.preset == "simple" and wf.get_node("design") is None
    forced = load_config(overrides={"bold": {"denoise": "task"}, "templates": {"template_dir": str(template_dir)}})
    with pytest.raises(InputError, match="needs the run's events.tsv"):
        init_bold_preproc_wf(bold_file=str(rest), metadata=2.0, has_t1w=False, output_dir=str(tmp_path), cfg=forced)
