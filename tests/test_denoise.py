"""Denoising presets (workflows.ops.denoise) on planted-signal synthetic runs, and aCompCor."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from workflows.ops.confounds import (
    MOTION_NAMES,
    dvars,
    expand_regressors,
    framewise_displacement,
)
from workflows.ops.denoise import (
    DENOISE_PRESETS,
    acompcor,
    clean_series,
    cosine_drift,
    design_regressor,
    events_file_for,
    load_preset_confounds,
    preset_parameters,
    resolve_preset,
)

TR = 2.0
N = 160


def _block_design(n: int = N) -> np.ndarray:
    """HRF-convolved 20 s on / 20 s off blocks (nilearn's Glover HRF)."""
    from nilearn.glm.first_level import compute_regressor

    onsets = np.arange(10.0, n * TR - 20, 40.0)
    cond = np.vstack([onsets, np.full(onsets.size, 20.0), np.ones(onsets.size)])
    return compute_regressor(cond, "glover", np.arange(n) * TR, oversampling=16)[0][:, 0]


def _synthetic_run(tmp_path, *, spikes=(), stimulus_locked_motion: float = 0.0, seed: int = 0):
    """Planted-signal ROI series with an fMRIPrep-style confounds TSV + JSON.

    ROI 0 carries the block design; every ROI carries a slow drift, a
    motion-locked artefact, a WM/CSF-shared fluctuation and white noise. At
    the ``spikes`` volumes the head jumps (FD > 1 mm) and the data get a
    large artefact.
    """
    rng = np.random.default_rng(seed)
    design = _block_design()
    t = np.arange(N) * TR
    motion = np.cumsum(rng.normal(0, 0.02, (N, 6)), axis=0)
    motion[:, 3:] *= 0.01
    motion[:, 2] += stimulus_locked_motion * design
    for s in spikes:
        motion[s:, 0] += 1.5  # a jump: FD > 1 mm at volume s
    tissue = rng.normal(size=(N, 2)).cumsum(axis=0) * 0.2
    drift = 3.0 * np.cos(np.pi * t / t[-1]) + 0.01 * t
    n_roi = 6
    x = rng.normal(0, 0.5, (N, n_roi)) + drift[:, None] + 10.0 * motion[:, :1] + 6.0 * tissue[:, :1]
    x[:, 0] += 3.0 * design
    for s in spikes:
        x[s] += 25.0
    x += 100.0
    mot, mot_names = expand_regressors(motion, MOTION_NAMES)
    glob = x.mean(axis=1)
    tis, tis_names = expand_regressors(np.column_stack([glob, tissue]), ["global_signal", "white_matter", "csf"])
    fd = framewise_displacement(motion)
    fd[0] = np.nan
    data_VT = np.repeat(x.T, 20, axis=0) + rng.normal(0, 0.5, (20 * n_roi, N))
    dv, std_dv = dvars(data_VT)
    cos = cosine_drift(N, TR, 0.008)
    noise_VT = np.repeat(tissue.T, 10, axis=0) + rng.normal(0, 0.3, (20, N))
    comps, var = acompcor(noise_VT.reshape(20, 1, 1, N), np.ones((20, 1, 1)), 5, TR, 0.008)
    table = pd.DataFrame(np.column_stack([mot, fd, dv, std_dv, tis, cos, comps]),
                         columns=mot_names + ["framewise_displacement", "dvars", "std_dvars"] + tis_names
                         + [f"cosine{k:02d}" for k in range(cos.shape[1])] + [f"a_comp_cor_{k:02d}" for k in range(5)])
    tsv = tmp_path / "confounds.tsv"
    table.to_csv(tsv, sep="\t", index=False, na_rep="n/a")
    meta = {c: {"Description": c} for c in table.columns}
    for k in range(5):
        meta[f"a_comp_cor_{k:02d}"].update(Method="aCompCor", Mask="combined", Retained=True,
                                           VarianceExplained=float(var[k]))
    js = tmp_path / "confounds.json"
    js.write_text(json.dumps(meta))
    return x, design, tsv, js


def _r(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_block_signal_survives_simple(tmp_path):
    x, design, tsv, js = _synthetic_run(tmp_path)
    conf, mask, info = load_preset_confounds("simple", tsv, js, tmp_path)
    assert mask is None and info["preset"] == "simple"
    # nilearn's simple: cosine high-pass, 24 motion terms, WM and CSF means.
    assert {"trans_x_derivative1_power2", "white_matter", "csf", "cosine00"} <= set(conf.columns)
    assert "global_signal" not in conf.columns and not any(c.startswith("a_comp_cor") for c in conf.columns)
    clean = clean_series(x, conf, mask, TR)
    raw_r = _r(x[:, 0], design)
    assert raw_r < 0.5  # drift and motion swamp the raw series
    # 24 smooth motion terms absorb a little of a block design, never most of it
    assert _r(clean[:, 0], design) > max(0.7, raw_r + 0.2)
    # ROIs without the block stay uncorrelated with it
    assert max(abs(_r(clean[:, k], design)) for k in range(1, x.shape[1])) < 0.25


def test_scrubbing_censors_high_motion_volumes(tmp_path):
    spikes = (40, 100)
    x, design, tsv, js = _synthetic_run(tmp_path, spikes=spikes)
    conf, mask, _ = load_preset_confounds("scrubbing", tsv, js, tmp_path)
    assert mask is not None
    for s in spikes:
        assert s not in mask
    assert len(mask) >= N - 2 * 11  # the spikes and the too-short segments around them, not more
    clean = clean_series(x, conf, mask, TR)
    assert clean.shape == (len(mask), x.shape[1])
    assert np.abs(clean).max() < 15  # the planted 25-unit artefacts are gone with their volumes
    assert _r(clean[:, 0], design[mask]) > 0.7
    # simple censors nothing
    assert load_preset_confounds("simple", tsv, js, tmp_path / "s")[1] is None


def test_task_preset_drops_design_correlated_regressors(tmp_path):
    x, design, tsv, js = _synthetic_run(tmp_path, stimulus_locked_motion=0.5)
    conf, mask, info = load_preset_confounds("task", tsv, js, tmp_path, design_T=design, task_max_design_r=0.1)
    assert "trans_z" in info["dropped_for_design_correlation"]
    assert abs(info["dropped_for_design_correlation"]["trans_z"]) > 0.5
    kept = [c for c in conf.columns if not c.startswith("cosine")]
    assert "trans_z" not in kept and kept
    assert set(kept) | set(info["dropped_for_design_correlation"]) == set(MOTION_NAMES) | {"white_matter", "csf"}
    assert all(abs(r) > 0.1 for r in info["dropped_for_design_correlation"].values())
    clean = clean_series(x, conf, mask, TR)
    assert _r(clean[:, 0], design) > 0.8
    with pytest.raises(ValueError, match="needs the run's design"):
        load_preset_confounds("task", tsv, js, tmp_path / "b")


def test_presets_select_their_regressors(tmp_path):
    _, _, tsv, js = _synthetic_run(tmp_path)
    cols = {}
    for preset in DENOISE_PRESETS:
        if preset == "task":
            continue
        conf, _, _ = load_preset_confounds(preset, tsv, js, tmp_path / preset)
        cols[preset] = set(conf.columns)
    assert all(c.startswith("cosine") for c in cols["none"]) and cols["none"]
    assert "global_signal" in cols["simple_gsr"] and "global_signal" in cols["scrubbing_gsr"]
    assert "global_signal" in cols["compcor_gsr"] and "global_signal" not in cols["compcor"]
    assert {f"a_comp_cor_{k:02d}" for k in range(5)} <= cols["compcor"]
    assert "white_matter" not in cols["compcor"]
    params = preset_parameters("simple", motion_regressors=6, high_pass=0.0)
    assert params["motion"] == "basic" and "high_pass" not in params["strategy"]


def test_resolve_preset_and_config_validation(tmp_path):
    from pipeline.core.config import ConfigError, load_config

    assert resolve_preset("auto", True) == "task" and resolve_preset("auto", False) == "simple"
    assert resolve_preset("compcor", True) == "compcor"
    with pytest.raises(ValueError, match="unknown denoising preset 'aroma'"):
        resolve_preset("aroma", False)
    toml = tmp_path / "c.toml"
    toml.write_text('[bold]\ndenoise = "aroma"\n')
    with pytest.raises(ConfigError, match="bold.denoise: 'aroma' is not one of"):
        load_config(toml)
    toml.write_text('[bold]\ndenoise = "scrubbing_gsr"\nscrub_fd_threshold = 0.2\n')
    cfg = load_config(toml)
    assert cfg.bold.denoise == "scrubbing_gsr" and cfg.bold.scrub_fd_threshold == 0.2


def test_events_and_design(tmp_path):
    bold = tmp_path / "sub-01_task-x_run-1_bold.nii.gz"
    assert events_file_for(bold) is None
    ev = tmp_path / "sub-01_task-x_run-1_events.tsv"
    ev.write_text("onset\tduration\ttrial_type\n10\t20\ta\n50\t20\ta\n")
    assert events_file_for(bold) == ev
    reg = design_regressor(ev, 40, 2.0, n_dummy=2)
    assert reg.shape == (40,) and reg.max() > 0
    # the dummy offset shifts the design by that many volumes
    np.testing.assert_allclose(reg, design_regressor(ev, 42, 2.0)[2:], atol=0.05 * reg.max())
    bad = tmp_path / "bad_events.tsv"
    bad.write_text("start\tlength\n1\t2\n")
    from pipeline.core.errors import InputError

    with pytest.raises(InputError, match="lacks column"):
        design_regressor(bad, 10, 2.0)


def test_acompcor_matches_independent_svd(tmp_path):
    """The confounds table's a_comp_cor columns against a hand computation on the same masks."""
    from workflows.ops.bold import confounds_table

    rng = np.random.default_rng(3)
    shape, n = (12, 12, 10), 60
    data = 1000 + rng.normal(0, 5, shape + (n,))
    slow = np.sin(2 * np.pi * 0.05 * 2.0 * np.arange(n))
    data[:4] += 20 * slow  # a shared noise signal in the "WM" slab
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), tmp_path / "bold.nii.gz")
    brain = np.ones(shape, np.uint8)
    wm = np.zeros(shape, np.uint8)
    wm[:4, 2:10, 2:8] = 1
    csf = np.zeros(shape, np.uint8)
    csf[8:11, 3:9, 3:7] = 1
    for name, m in (("brain", brain), ("wm", wm), ("csf", csf)):
        nib.save(nib.Nifti1Image(m, affine), tmp_path / f"{name}.nii.gz")
    table, meta = confounds_table(tmp_path / "bold.nii.gz", tmp_path / "brain.nii.gz", tmp_path / "wm.nii.gz",
                                  tmp_path / "csf.nii.gz", np.zeros((n, 6)), repetition_time=2.0, high_pass=0.01,
                                  compcor_components=4)
    comps = table[[f"a_comp_cor_{k:02d}" for k in range(4)]].to_numpy()
    assert meta["a_comp_cor_00"]["Mask"] == "combined" and meta["a_comp_cor_00"]["Method"] == "aCompCor"

    # Independent: the same voxels read back with nibabel, fMRIPrep's DCT pre-filter written out by
    # hand (sqrt(2/T) cos(pi (2t+1) k / 2T), k = 1 .. floor(2 T TR high_pass) - 1, plus a constant),
    # then eigenvectors of the T x T covariance of the variance-normalised voxels.
    vox = np.asarray(nib.load(tmp_path / "bold.nii.gz").dataobj, dtype=np.float32)[(wm + csf) > 0].astype(np.float64).T
    tt = np.arange(n)
    n_cos = int(np.floor(2 * n * 2.0 * 0.01))
    basis = np.column_stack([np.ones(n)] + [np.sqrt(2.0 / n) * np.cos(np.pi * (2 * tt + 1) * k / (2 * n))
                                            for k in range(1, n_cos)])
    # the TSV's cosine regressors are nilearn's (one more term at the cut-off)
    assert sum(c.startswith("cosine") for c in table.columns) == n_cos
    resid = vox - basis @ np.linalg.pinv(basis) @ vox
    resid /= resid.std(axis=0)
    w, v = np.linalg.eigh(resid @ resid.T)
    ref = v[:, np.argsort(w)[::-1][:4]]
    for k in range(4):
        sign = np.sign(ref[np.abs(ref[:, k]).argmax(), k])
        np.testing.assert_allclose(comps[:, k], sign * ref[:, k], atol=1e-6)
    # the planted slab signal is the first component
    assert abs(_r(comps[:, 0], slow)) > 0.9
