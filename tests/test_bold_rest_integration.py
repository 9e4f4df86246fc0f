"""The Philips resting run through the CLI: T1w -> BOLD -> MNI on real data (issue 12).

``neurocurate prep ../shared/data/corpus OUT participant --participant-label philipsA``
must produce the run's 450-ROI series, denoised with the resting default
(``simple``), registered through the subject's own T1w, with the canonical
network structure: within-network correlation above between-network
correlation for every Yeo-7 network of the Schaefer-400 ROIs.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.core.derivatives import func_outputs, timeseries_output
from pipeline.roi.atlas import schaefer_network

pytestmark = pytest.mark.integration

ENTITIES = {"sub": "philipsA", "task": "rest"}
YEO7 = ("Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default")


@pytest.fixture(scope="module")
def philips(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("philips") / "out"
    code = main(["prep", str(shared_data / "corpus"), str(out), "participant", "--participant-label", "philipsA",
                 "--nprocs", "2", "--template-dir", str(shared_data / "templates")])
    return out, code


def test_philips_rest_run_reaches_mni_through_its_t1w(philips):
    out, code = philips
    assert code == 0
    paths = func_outputs(out, ENTITIES)
    for p in (paths.preproc, paths.confounds, paths.confounds_json, paths.sidecar, paths.mask):
        assert p.is_file(), p
    sidecar = json.loads(paths.sidecar.read_text())
    assert sidecar["RegistrationTarget"] == "T1w" and sidecar["RepetitionTime"] == pytest.approx(1.259, abs=1e-3)
    conf = pd.read_csv(paths.confounds, sep="\t", na_values="n/a")
    assert {"a_comp_cor_00", "cosine00", "std_dvars"} <= set(conf.columns)
    assert conf["framewise_displacement"].mean() < 0.5
    meta = json.loads(paths.confounds_json.read_text())
    assert "DesignCorrelation" not in meta["trans_x"]  # a resting run has no design


def test_philips_rest_series_show_network_structure(philips):
    out, _ = philips
    ts_path = timeseries_output(out, ENTITIES, "Schaefer400Tian3")
    ts = pd.read_csv(ts_path, sep="\t")
    meta = json.loads(ts_path.with_suffix(".json").read_text())
    assert meta["DenoisingPreset"] == "simple" and ts.shape[1] == 450 and 60 <= len(ts) <= 75
    nets = np.array([schaefer_network(c) for c in ts.columns])
    x = ts.to_numpy(dtype=float)
    keep = np.isin(nets, YEO7) & (x.std(axis=0) > 0)
    c = np.corrcoef(x[:, keep].T)
    nets = nets[keep]
    for net in YEO7:
        inside = nets == net
        within = c[np.ix_(inside, inside)][~np.eye(int(inside.sum()), dtype=bool)].mean()
        between = c[np.ix_(inside, ~inside)].mean()
        assert within > between, (net, within, between)
