"""Crash harness (issue 15): kill -9 every stage at asserted moments of its own progress, rerun, compare.

Each stage runs as a subprocess (``python -m pipeline.cli ...``) on a copy of the state the stage starts
from. ``NEUROCURATE_CRASH_AT=<point>:<k>`` makes the process SIGKILL itself the k-th time it reaches a
crash point (:mod:`pipeline.core.faults`): the kill happens at a known step and the test asserts it did
(exit status -9, i.e. before completion). The same command is then run again, and its outputs must equal
an uninterrupted run's byte for byte, with no temporary, ``.link-`` or unpublished ``.v-`` entry left.
Preprocessing (nipype runs nodes in worker processes) is killed from outside after k finished nodes,
counted from nipype's result files in the work folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.faults import CRASH_ENV
from pipeline.core.layout import OutputLayout

pytestmark = pytest.mark.integration

ENV = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "OMP_NUM_THREADS": "1", "NIPYPE_NO_ET": "1"}


def _cli(*argv: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, argv)], env=env or ENV,
                          capture_output=True, text=True, **kw)


def _digest(root: Path, under: list[str]) -> dict[str, str]:
    """sha256 of every visible file below ``root/<under>`` (links to published versions followed)."""
    out = {}
    for top in under:
        base = root / top
        paths = [base] if base.is_file() else []
        for dirpath, _, filenames in os.walk(base, followlinks=True):  # published versions sit behind links
            paths.extend(Path(dirpath) / f for f in filenames)
        for p in sorted(paths):
            rel = p.relative_to(root).as_posix()
            if not any(part.startswith(".") for part in Path(rel).parts):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _leftovers(root: Path) -> list[str]:
    """Temporary files, dangling links and unpublished versions anywhere below ``root`` (work dirs aside)."""
    bad = []
    for p in root.rglob(".*"):
        rel = p.relative_to(root).as_posix()
        if rel.startswith((".work", ".manifests")) or "/.work/" in rel:
            continue
        name = p.name
        if ".tmp" in name or ".link-" in name or ".old-" in name:  # (SHARDS_DIR/.lock is the writers' lock file)
            bad.append(rel)
        elif ".v-" in name:
            target = p.parent / name.split(".v-")[0].lstrip(".")
            if not (target.is_symlink() and (p.parent / os.readlink(target)).resolve() == p.resolve()):
                bad.append(rel)
    return sorted(bad)


@pytest.fixture(scope="module")
def chain(shared_data, tmp_path_factory):
    """The uninterrupted reference: ABIDE series of 8 subjects through import, qc, gradients and shards."""
    root = tmp_path_factory.mktemp("crash_ref")
    (root / "toy_pretrain.toml").write_text(TOY_PRETRAIN)
    (root / "toy_evaluate.toml").write_text(TOY_EVALUATE)
    abide = shared_data / "abide"
    pheno = pd.read_csv(abide / "Phenotypic_V1_0b_preprocessed1.csv")
    ids = pheno[pheno["SITE_ID"].isin(["NYU", "UM_1"])].groupby(["SITE_ID", "DX_GROUP"]).head(2)["SUB_ID"]
    states = {}
    out = root / "out"
    r = _cli("import-timeseries", abide / "rois_cc200", "-o", out, "--phenotypes",
             abide / "Phenotypic_V1_0b_preprocessed1.csv", "--participant-label", *[f"{int(i):07d}" for i in ids])
    assert r.returncode == 0, r.stderr
    for stage, argv in STAGES:
        states[stage] = root / f"before-{stage}"
        shutil.copytree(out, states[stage], symlinks=True)
        r = _cli(*argv(out))
        assert r.returncode == 0, r.stdout + r.stderr
    return {"states": states, "final": out}


TOY_PRETRAIN = ("[model]\ndim = 16\ndepth = 2\nheads = 2\npred_dim = 8\npred_depth = 1\npred_heads = 2\n"
                "[fmri]\nnum_frames = 64\n[moe]\nnum_experts = 4\nexpert_hidden = 16\n"
                "[train]\nbatch_size = 2\nmax_steps = 8\nwarmup_steps = 1\ncheckpoint_every = 3\nlog_every = 1\n")
TOY_EVALUATE = '[evaluate]\nbaselines = ["fc_pearson", "random_encoder"]\nattentive_probe = false\ninner_folds = 2\n'
STAGES = [
    ("qc", lambda out: ["qc", out]),
    ("gradients", lambda out: ["gradients", out]),
    ("shards", lambda out: ["shards", out, "--samples-per-shard", "2"]),
    ("pretrain", lambda out: ["pretrain", out / "shards", "--config", out.parent / "toy_pretrain.toml",
                              "--out", out / "run", "--no-progress"]),
    ("evaluate", lambda out: ["evaluate", out / "run", "--shards", out / "shards", "--target", "diagnosis",
                              "--split", "site", "--config", out.parent / "toy_evaluate.toml", "--bootstrap", "20",
                              "--permutations", "10"]),
]
OUTPUTS = {"qc": ["curation", "reports"], "gradients": ["gradients"], "shards": ["shards"],
           "evaluate": ["run/evaluation"]}
CRASH_POINTS = {
    "qc": [("qc.scan_recorded", 1), ("qc.scan_recorded", 5), ("qc.table_written", 1),
           ("qc.subject_report_written", 1), ("qc.subject_report_written", 6)],
    "gradients": [("gradients.run_read", 1), ("gradients.run_read", 3), ("gradients.run_read", 6),
                  ("gradients.run_read", 8), ("gradients.sidecar_written", 1)],
    "evaluate": [("evaluate.model_done", 1), ("evaluate.model_done", 2), ("evaluate.model_done", 3),
                 ("evaluate.model_done", 4), ("evaluate.before_report", 1)],
    "shards": [("shards.shard_published", 1), ("shards.shard_published", 2), ("shards.shard_published", 4),
               ("shards.catalog_published", 1), ("shards.norm_written", 1)],
}


@pytest.mark.parametrize("stage", sorted(CRASH_POINTS))
def test_kill_minus_9_at_five_points_then_rerun_is_byte_identical(chain, stage, tmp_path):
    for name in ("toy_pretrain.toml", "toy_evaluate.toml"):
        shutil.copyfile(chain["final"].parent / name, tmp_path / name)
    argv = dict(STAGES)[stage]
    expected = _digest(chain["final"], OUTPUTS[stage])
    assert expected
    for point, k in CRASH_POINTS[stage]:
        out = tmp_path / f"{point}-{k}"
        shutil.copytree(chain["states"][stage], out, symlinks=True)
        killed = _cli(*argv(out), env={**ENV, CRASH_ENV: f"{point}:{k}"})
        assert killed.returncode == -signal.SIGKILL, f"{point}:{k} was not reached: {killed.stdout}{killed.stderr}"
        done = _cli(*argv(out))
        assert done.returncode == 0, done.stdout + done.stderr
        if stage == "evaluate":  # the numbers, not where they were run or how long they took
            assert _evaluation(out) == _evaluation(chain["final"]), f"results differ after a kill at {point}:{k}"
        else:
            assert _digest(out, OUTPUTS[stage]) == expected, f"outputs differ after a kill at {point}:{k}"
        assert _leftovers(out) == [], f"leftovers after a kill at {point}:{k}"
        shutil.rmtree(out)


def test_sigterm_stops_cleanly_with_a_message(chain, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(chain["states"]["shards"], out, symlinks=True)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "shards", str(out), "--samples-per-shard", "1"],
                            env={**ENV, CRASH_ENV: ""}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = out / "shards" / "fmri-CC200" / "shards"
    deadline = time.monotonic() + 120
    while not (store.is_dir() and any(p.name.startswith("shard-") for p in store.iterdir())):
        assert proc.poll() is None, "finished before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the stage finished between the check and the signal")
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and err.strip().count("\n") == 0
    assert _leftovers(out) == []
    assert _cli("shards", out, "--samples-per-shard", "1").returncode == 0


def _finished_nodes(work: Path) -> int:
    return sum(1 for _ in work.rglob("result_*.pklz")) if work.is_dir() else 0


def test_prep_killed_after_k_finished_nodes_then_rerun_is_byte_identical(shared_data, tmp_path):
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    shutil.copyfile(shared_data / "anat" / "niivue_T1w_neck.nii.gz", bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    (bids / "dataset_description.json").write_text('{"Name": "crash test", "BIDSVersion": "1.9.0"}')
    argv = ["prep", bids, None, "participant", "--nprocs", "1", "--skull-strip", "template",
            "--template-dir", shared_data / "templates"]
    reference = tmp_path / "reference"
    r = _cli(*[reference if a is None else a for a in argv])
    assert r.returncode == 0, r.stdout + r.stderr
    n_nodes = _finished_nodes(OutputLayout(reference).default_work_dir)
    expected = _digest(reference, ["sub-01"])
    assert any(k.endswith("desc-preproc_T1w.nii.gz") for k in expected) and n_nodes >= 6

    out = tmp_path / "killed"
    work = OutputLayout(out).default_work_dir
    kills = 0
    for k in (1, 2, 3, 4, 5):  # after k more finished nodes than the previous run left
        start = _finished_nodes(work)
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, [out if a is None else a for a in argv])],
                                env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while _finished_nodes(work) < start + 1 and proc.poll() is None:
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        for name, digest in _digest(out, ["sub-01"]).items():  # whatever is published is whole
            assert digest == expected[name], f"{name} differs after a kill"
    assert kills >= 5, f"only {kills} of 5 runs were killed before they finished"
    done = _cli(*[out if a is None else a for a in argv])
    assert done.returncode == 0, done.stdout + done.stderr
    assert _digest(out, ["sub-01"]) == expected
    assert _leftovers(out) == []


def _evaluation(root: Path) -> tuple[dict, str]:
    """results.json without timings and absolute paths, and predictions.tsv, of the evaluation report."""
    import json

    report = root / "run" / "evaluation" / "diagnosis_site"

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("seconds", "run_dir", "shards_dir", "checkpoint")}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.loads((report / "results.json").read_text())), (report / "predictions.tsv").read_text()


def _training(run: Path) -> tuple[list[dict], dict]:
    """The logged steps (timing left out) and the model and optimizer tensors of the newest checkpoint."""
    import json

    import torch

    from pipeline.core.layout import RunLayout

    layout = RunLayout(run)
    steps = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
             for line in layout.metrics.read_text().splitlines()]
    payload = torch.load(layout.checkpoints()[-1], map_location="cpu", weights_only=False)
    return steps, {"step": payload["step"], "model": payload["model"], "optimizer": payload["optimizer"]}


def test_pretraining_killed_at_five_steps_resumes_equal_to_an_uninterrupted_run(chain, tmp_path):
    import torch

    shutil.copyfile(chain["final"].parent / "toy_pretrain.toml", tmp_path / "toy_pretrain.toml")
    argv = dict(STAGES)["pretrain"]
    ref_steps, ref_state = _training(chain["final"] / "run")
    assert [s["step"] for s in ref_steps] == list(range(1, 9))
    for point, k in [("pretrain.step", 1), ("pretrain.step", 4), ("pretrain.checkpoint_saved", 1),
                     ("pretrain.step", 5), ("pretrain.step", 8)]:
        out = tmp_path / f"{point}-{k}"
        shutil.copytree(chain["states"]["pretrain"], out, symlinks=True)
        killed = _cli(*argv(out), env={**ENV, CRASH_ENV: f"{point}:{k}"})
        assert killed.returncode == -signal.SIGKILL, f"{point}:{k} was not reached: {killed.stderr}"
        done = _cli(*argv(out))
        assert done.returncode == 0, done.stdout + done.stderr
        steps, state = _training(out / "run")
        assert steps == ref_steps, f"logged steps differ after a kill at {point}:{k}"
        assert state["step"] == ref_state["step"]
        for name, tensor in ref_state["model"].items():
            assert torch.equal(state["model"][name], tensor), f"{name} differs after a kill at {point}:{k}"
        assert _leftovers(out) == []
        shutil.rmtree(out)
