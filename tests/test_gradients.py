"""Gradients: analytic diffusion map, independent eigensolver, conventions, files, ABIDE check."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.sparse.linalg import eigs

from pipeline.core.config import GradientsConfig
from pipeline.core.errors import InputError, NeurocurateError
from pipeline.roi.gradients import (
    affinity_matrix,
    align_gradients,
    diffusion_map,
    group_connectome,
    read_gradients,
    run_correlation,
)
from pipeline.roi.parcellation import write_timeseries
from pipeline.stages.gradients import build_group_gradients


def test_two_block_affinity_matches_closed_form():
    """Two equal blocks, weight a within and b between: P has eigenvalues 1, (a-b)/(a+b), 0..."""
    m, a, b = 6, 0.9, 0.2
    n = 2 * m
    w = np.full((n, n), b)
    w[:m, :m] = a
    w[m:, m:] = a
    for alpha in (0.0, 0.5, 1.0):
        emb = diffusion_map(w, n_components=3, alpha=alpha)
        lam = (a - b) / (a + b)
        np.testing.assert_allclose(emb.raw_eigenvalues[0], lam, atol=1e-12)
        np.testing.assert_allclose(emb.raw_eigenvalues[1:], 0.0, atol=1e-10)
        np.testing.assert_allclose(emb.eigenvalues[0], lam / (1 - lam), atol=1e-12)
        expected = np.r_[np.ones(m), -np.ones(m)] * lam / (1 - lam)  # psi / psi_0 = +-1; first entry positive
        np.testing.assert_allclose(emb.gradients_RK[:, 0], expected, atol=1e-10)
        np.testing.assert_allclose(emb.variance_explained[0], 1.0, atol=1e-10)
    timed = diffusion_map(w, n_components=1, alpha=0.5, diffusion_time=3)
    np.testing.assert_allclose(timed.eigenvalues[0], ((a - b) / (a + b)) ** 3, atol=1e-12)


def _realistic_affinity(n_rois=60, n_vols=150, seed=0):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n_vols, 4))
    loading = rng.standard_normal((4, n_rois)) * np.linspace(0.2, 2.0, n_rois)
    series = latent @ loading + rng.standard_normal((n_vols, n_rois))
    conn, _ = group_connectome([series])
    return affinity_matrix(conn, sparsity=0.8)


def test_matches_independent_nonsymmetric_eigensolver():
    """Re-implementation with ARPACK on the non-symmetric P, as BrainSpace does the embedding."""
    aff = _realistic_affinity()
    k = 5
    emb = diffusion_map(aff, n_components=k, alpha=0.5)
    d = aff.sum(1)
    wa = aff / np.outer(d**0.5, d**0.5)
    p = wa / wa.sum(1, keepdims=True)
    vals, vecs = eigs(p, k=k + 1, which="LR", tol=1e-14, v0=np.ones(len(p)))
    order = np.argsort(-vals.real)
    vals, vecs = vals.real[order], vecs.real[:, order]
    psi = vecs / vecs[:, [0]]
    # eigenvector scale is arbitrary: use the diffusion-map normalisation sum_i pi_i psi_i^2 = 1,
    # pi = stationary distribution of P (proportional to the alpha-normalised degrees)
    pi = wa.sum(1) / wa.sum()
    psi /= np.sqrt((pi[:, None] * psi**2).sum(0))
    lam = vals[1:] / vals[0]
    ref = psi[:, 1:] * (lam / (1 - lam))
    ref *= np.sign(ref[np.abs(ref).argmax(0), np.arange(k)])
    np.testing.assert_allclose(emb.raw_eigenvalues, lam, rtol=1e-8)
    np.testing.assert_allclose(emb.gradients_RK, ref, atol=1e-8)
    # conventions: descending eigenvalues, largest |entry| of each gradient positive
    assert np.all(np.diff(emb.raw_eigenvalues) <= 0)
    g = emb.gradients_RK
    assert np.all(g[np.abs(g).argmax(0), np.arange(k)] > 0)


def test_affinity_top_connections_and_kernel():
    conn = np.array([[1.0, 0.9, 0.1, -0.5], [0.9, 1.0, 0.2, 0.0], [0.1, 0.2, 1.0, 0.8], [-0.5, 0.0, 0.8, 1.0]])
    aff = affinity_matrix(conn, sparsity=0.5)  # keep 2 per row
    sparse = np.array([[1.0, 0.9, 0, 0], [0.9, 1.0, 0, 0], [0, 0, 1.0, 0.8], [0, 0, 0.8, 1.0]])
    unit = sparse / np.linalg.norm(sparse, axis=1, keepdims=True)
    expected = 1 - np.arccos(np.clip(unit @ unit.T, -1, 1)) / np.pi
    np.testing.assert_allclose(aff, expected, atol=1e-12)
    np.testing.assert_allclose(aff[0, 2], 0.5)  # orthogonal rows: angle pi/2
    with pytest.raises(ValueError, match="NaN"):
        affinity_matrix(np.full((3, 3), np.nan))


def test_zero_variance_rois_are_excluded_per_run():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((50, 4))
    b = rng.standard_normal((50, 4))
    b[:, 3] = 7.0  # ROI 3 constant in run b
    corr_b = run_correlation(b)
    assert np.all(np.isnan(corr_b[3])) and np.all(np.isnan(corr_b[:, 3]))
    conn, n_sub = group_connectome([a, b], ["s1", "s2"])
    assert n_sub[0, 3] == 1 and n_sub[0, 1] == 2
    np.testing.assert_allclose(conn[0, 3], run_correlation(a)[0, 3], atol=1e-10)
    za, zb = np.arctanh(run_correlation(a)[0, 1]), np.arctanh(corr_b[0, 1])
    np.testing.assert_allclose(conn[0, 1], np.tanh((za + zb) / 2), atol=1e-10)


def test_procrustes_recovers_rotation_and_sign_flip():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((40, 3))
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    rotated = ref @ q.T
    np.testing.assert_allclose(align_gradients(rotated, ref), ref, atol=1e-10)
    flipped = ref * [1, -1, 1]
    np.testing.assert_allclose(align_gradients(flipped, ref, "sign"), ref)


def _write_dataset(root, n_subjects=4, n_rois=30, seed=0, atlas="Toy"):
    rng = np.random.default_rng(seed)
    names = [f"roi{i}" for i in range(n_rois)]
    # two communities so gradient 1 separates the halves
    comm = np.r_[np.zeros(n_rois // 2), np.ones(n_rois - n_rois // 2)]
    for s in range(n_subjects):
        latent = rng.standard_normal((120, 2))
        series = latent[:, comm.astype(int)] * 1.5 + rng.standard_normal((120, n_rois))
        if s == 0:
            series[:, 5] = 0.0  # an ROI outside this subject's field of view
        out = root / f"sub-{s:02d}" / "func" / f"sub-{s:02d}_task-rest_atlas-{atlas}_timeseries.tsv"
        sidecar = {"RepetitionTime": 2.0, "ROINames": names, "NumberOfVolumes": 120,  # as extract_timeseries writes
                   "ZeroVarianceROIs": [names[5]] if s == 0 else []}
        write_timeseries(out, series, names, sidecar)
    return names, comm


def test_build_group_gradients_files_and_reference(tmp_path):
    names, comm = _write_dataset(tmp_path)
    cfg = GradientsConfig(n_components=4)
    res = build_group_gradients(tmp_path, "Toy", cfg)
    assert res.tsv == tmp_path / "gradients" / "atlas-Toy_gradients.tsv"
    roi, values = read_gradients(res.tsv)
    assert roi == names and values.shape == (30, 4)
    side = json.loads(res.sidecar.read_text())
    assert side["SourceSubjects"] == ["00", "01", "02", "03"]
    assert len(side["Eigenvalues"]) == 4 and side["Eigenvalues"] == sorted(side["Eigenvalues"], reverse=True)
    assert side["DroppedROIs"] == []
    g1 = values[:, 0]
    assert np.all(np.sign(g1[comm == 0]) == -np.sign(g1[comm == 1]))  # halves on opposite sides
    # a flipped copy as reference flips the output back onto it
    ref_path = tmp_path / "ref.tsv"
    flipped = -values
    lines = ["roi\tg1\tg2\tg3\tg4"] + [n + "\t" + "\t".join(f"{v:.10g}" for v in row) for n, row in zip(names, flipped)]
    ref_path.write_text("\n".join(lines) + "\n")
    aligned = build_group_gradients(tmp_path, "Toy", GradientsConfig(n_components=4, reference=str(ref_path)))
    np.testing.assert_allclose(aligned.gradients_RK, flipped, atol=1e-6)
    assert "procrustes" in json.loads(aligned.sidecar.read_text())["SignConvention"]


def test_curation_table_selects_included_runs(tmp_path):
    """The curation table of ``neurocurate qc`` (with a reviewer's exclusions) decides which runs count."""
    from pipeline.cli import main

    _write_dataset(tmp_path, n_subjects=3)
    other = tmp_path / "other"
    _write_dataset(other, n_subjects=8, atlas="Other")
    for sub in ("02", "07"):  # sub-02 has series of both atlases, sub-07 of the other atlas only
        src = other / f"sub-{sub}" / "func"
        dst = tmp_path / f"sub-{sub}" / "func"
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
    assert main(["qc", str(tmp_path)]) == 0
    ratings = {f"sub-{s}/func/sub-{s}_task-rest_atlas-Toy_timeseries.tsv": {"decision": "exclude"} for s in ("01", "02")}
    file = tmp_path.parent / "ratings.json"
    file.write_text(json.dumps({"version": 1, "ratings": ratings}))
    assert main(["qc", "import-ratings", str(tmp_path), str(file)]) == 0
    # sub-01 excluded; sub-02 counts through its included Other-atlas run; sub-07 has no Toy series
    res = build_group_gradients(tmp_path, "Toy", GradientsConfig(n_components=3))
    assert res.subjects == ("00", "02")


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(NeurocurateError, match="no curated ROI series for atlas 'Toy'"):
        build_group_gradients(tmp_path, "Toy", GradientsConfig())
    names, _ = _write_dataset(tmp_path, n_subjects=2)
    odd = tmp_path / "sub-09" / "func" / "sub-09_task-rest_atlas-Toy_timeseries.tsv"
    write_timeseries(odd, np.random.default_rng(0).standard_normal((20, 3)), ["a", "b", "c"], {})
    with pytest.raises(InputError, match=r"sub-09_task-rest_atlas-Toy_timeseries\.tsv: ROI columns differ"):
        build_group_gradients(tmp_path, "Toy", GradientsConfig(n_components=3))
    bad_ref = tmp_path / "bad_ref.tsv"
    bad_ref.write_text("name\tx\nroi0\t1\n")
    with pytest.raises(InputError, match=r"bad_ref\.tsv: expected columns roi, g1"):
        read_gradients(bad_ref)


def test_cli_command(tmp_path, capsys):
    from pipeline.cli import main

    _write_dataset(tmp_path, n_subjects=2)
    assert main(["gradients", str(tmp_path), "--atlas", "Toy", "--n-components", "3"]) == 0
    assert "30 ROIs x 3 gradients from 2 subject(s)" in capsys.readouterr().out


@pytest.mark.integration
def test_abide_dev_gradients_separate_sensory_from_default(shared_data, tmp_path):
    """ABIDE dev subset (NYU + UM_1): the sensory-association axis.

    On these CC200 series g1 is the visual-somatomotor axis and g2 the
    sensory-vs-default axis (the two eigenvalues are close; see
    benchmarks/README.md); the test pins both facts.
    """
    from sklearn.metrics import roc_auc_score

    from pipeline.roi.atlas import majority_networks
    from pipeline.core.config import ImportConfig
    from pipeline.stages.import_series import import_timeseries

    abide = shared_data / "abide"
    report = import_timeseries([abide / "rois_cc200"], tmp_path, ImportConfig(),
                               phenotypes=abide / "Phenotypic_V1_0b_preprocessed1.csv", sites=["NYU", "UM_1"])
    assert len(report.runs) == 281 and report.ok
    res = build_group_gradients(tmp_path, "CC200", GradientsConfig(n_components=10))
    nets = np.array(majority_networks(abide / "CC200_ROIs_3mm.nii.gz", list(range(1, 201))), dtype=object)
    g = res.gradients_RK
    sensory, default = np.isin(nets, ["Vis", "SomMot"]), nets == "Default"
    both = sensory | default
    auc = [roc_auc_score(sensory[both], g[both, k]) for k in range(3)]
    sep = [max(a, 1 - a) for a in auc]
    assert sep[1] > 0.95  # g2: sensory vs default
    vis, som = nets == "Vis", nets == "SomMot"
    auc_vis_som = roc_auc_score(vis[vis | som], g[vis | som, 0])
    assert max(auc_vis_som, 1 - auc_vis_som) > 0.9  # g1: visual vs somatomotor
    assert np.sign(g[sensory, 1].mean()) == -np.sign(g[default, 1].mean())
