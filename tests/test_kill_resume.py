"""`kill -9` during pretraining with every MoE router, then the same command: equal to an uninterrupted run.

``neurocurate pretrain`` runs as a subprocess; ``NEUROCURATE_CRASH_AT=<point>:<k>`` makes it SIGKILL itself
the k-th time it reaches a crash point (:mod:`pipeline.core.faults`), and the test asserts that it did. The
rerun resumes from the newest checkpoint and must log the same loss at every step and end with the same
parameters and optimizer state as a run that was never interrupted. The ``state_experts`` router takes its
states from the index (three tasks in the training split, a fourth only in the validation split).
(Preprocessing and the other stages are killed at asserted points in ``tests/test_crash_harness.py``.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.faults import CRASH_ENV
from pipeline.core.layout import RunLayout

pytestmark = pytest.mark.integration

ENV = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: ""}
TOY = ("[model]\ndim = 16\ndepth = 2\nheads = 2\npred_dim = 8\npred_depth = 1\npred_heads = 2\n"
       "[fmri]\nnum_frames = 64\ngradient_dim = 3\n[moe]\nnum_experts = 4\nexpert_hidden = 16\n{moe}"
       "[train]\nbatch_size = 2\nmax_steps = 8\nwarmup_steps = 1\ncheckpoint_every = 3\nlog_every = 1\n")
ROUTERS = {
    "topk": "",
    "subject_prior": 'router = "subject_prior"\n',
    "expert_choice": 'router = "expert_choice"\ncapacity_factor = 1.0\n',
    "state_experts": 'router = "state_experts"\ntop_k = 2\n',
}
KILLS = {"topk": [("pretrain.step", 5)], "subject_prior": [("pretrain.step", 4)],
         "expert_choice": [("pretrain.checkpoint_saved", 1)],
         "state_experts": [("pretrain.step", 1), ("pretrain.step", 5), ("pretrain.checkpoint_saved", 2)]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from pipeline.core.config import ShardsConfig
    from pipeline.store.write import write_shards

    root = tmp_path_factory.mktemp("kill_resume") / "shards"
    R, n = 10, 12
    rng = np.random.default_rng(0)
    arrays = {f"s{i}": rng.standard_normal((90, R)).astype(np.float32) for i in range(n)}
    tasks = ["rest", "nback", "motor", "rest", "nback", "motor", "rest", "nback", "motor", "rest", "nback", "gambling"]
    table = pd.DataFrame({"sample_id": list(arrays), "subject": [f"sub-{i}" for i in range(n)], "store": "fmri-toy",
                          "kind": "fmri", "atlas": "toy", "modality": "timeseries", "site": "A", "task": tasks,
                          "split": ["train"] * 11 + ["val"]})
    names = [f"roi{r}" for r in range(R)]
    grads = {"fmri-toy": pd.DataFrame({"roi": names, **{f"g{k}": np.cos(np.arange(R) * (k + 1)) for k in range(3)}})}
    write_shards(table, root, ShardsConfig(samples_per_shard=3), gradients=grads,
                 read_sample=lambda row: {"x_TR": arrays[row["sample_id"]], "roi_names": names})
    return root


def _pretrain(shards: Path, run: Path, config: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "pretrain", str(shards), "--config", str(config),
                           "--out", str(run), "--no-progress"], env=env or ENV, capture_output=True, text=True)


def _training(run: Path) -> tuple[list[dict], dict]:
    """Logged steps (timing aside) and the newest checkpoint's step, model and optimizer state."""
    import torch

    layout = RunLayout(run)
    steps = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
             for line in layout.metrics.read_text().splitlines()]
    payload = torch.load(layout.checkpoints()[-1], map_location="cpu", weights_only=False)
    return steps, payload


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_killed_pretraining_resumes_equal_to_an_uninterrupted_run(shards, tmp_path, router):
    config = tmp_path / "toy.toml"
    config.write_text(TOY.format(moe=ROUTERS[router]))
    ref = _pretrain(shards, tmp_path / "reference", config)
    assert ref.returncode == 0, ref.stderr
    ref_steps, ref_state = _training(tmp_path / "reference")
    assert [s["step"] for s in ref_steps] == list(range(1, 9))
    if router == "state_experts":  # the tasks of the training split, not a config default
        assert ref_state["config"]["moe"]["states"] == ["motor", "nback", "rest"]
    for point, k in KILLS[router]:
        run = tmp_path / f"{point}-{k}"
        killed = _pretrain(shards, run, config, env={**ENV, CRASH_ENV: f"{point}:{k}"})
        assert killed.returncode == -signal.SIGKILL, f"{point}:{k} was not reached: {killed.stderr}"
        done = _pretrain(shards, run, config)
        assert done.returncode == 0, done.stderr
        steps, state = _training(run)
        assert steps == ref_steps, f"logged steps (loss, lr, routing statistics) differ after a kill at {point}:{k}"
        assert state["step"] == ref_state["step"] == 8
        for part in ("model", "optimizer", "scheduler"):
            assert _equal(state[part], ref_state[part]), f"{part} differs after a kill at {point}:{k}"
        assert not [p for p in run.rglob(".*")], "temporary files left behind"
        shutil.rmtree(run)
