"""Execution defaults, --plugin-arg parsing, the parallel map and the progress bar (issue 17)."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from functools import partial
from pathlib import Path

import pytest

from pipeline.commands import prep as prep_command
from pipeline.core.config import DaskConfig, ExecutionConfig, load_config
from pipeline.core.parallel import (
    MapError,
    Star,
    available_cpus,
    parallel_map,
    parse_plugin_value,
    resolve_execution,
)
from pipeline.core.progress import Progress, set_progress
from pipeline.stages.prep import ensure_login_name, nipype_plugin_args


@pytest.mark.parametrize(("text", "value"), [
    ("10", 10), ("-3", -3), ("2.5", 2.5), ("1e3", 1000.0), ("true", True), ("False", False), ("none", None),
    ("-p short -t 60", "-p short -t 60"), ("'10'", "10"), ('"true"', "true"), ("nan", "nan"), ("", ""),
])
def test_plugin_values_are_typed(text, value):
    parsed = parse_plugin_value(text)
    assert parsed == value and type(parsed) is type(value)


def _prep_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    prep_command.add_arguments(parser)
    return parser.parse_args(["bids", "out", "participant", *argv])


def test_plugin_args_reach_nipype_typed():
    args = _prep_args("--plugin", "SLURM", "--plugin-arg", "max_jobs=10", "--plugin-arg", "sbatch_args=-p short -t 60",
                      "--plugin-arg", "retry_timeout=2.5")
    cfg = load_config(None, prep_command._overrides(args))
    plugin_args = nipype_plugin_args(cfg)
    assert plugin_args == {"max_jobs": 10, "sbatch_args": "-p short -t 60", "retry_timeout": 2.5}
    with pytest.raises(Exception, match="KEY=VALUE"):
        prep_command._overrides(_prep_args("--plugin-arg", "max_jobs"))


def test_multiproc_gets_cores_threads_and_memory(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    cfg = load_config(None, prep_command._overrides(_prep_args("--mem-gb", "6")))
    args = nipype_plugin_args(cfg)
    assert args["n_procs"] == available_cpus() and args["memory_gb"] == 6.0
    explicit = load_config(None, prep_command._overrides(_prep_args("--nprocs", "3", "--omp-nthreads", "2")))
    assert nipype_plugin_args(explicit)["n_procs"] == 3
    assert resolve_execution(explicit.execution).omp_nthreads == 2
    with pytest.raises(Exception, match="at least 1"):
        prep_command._overrides(_prep_args("--nprocs", "0"))


def test_defaults_follow_fmriprep_and_allocations(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")
    assert available_cpus() == 1
    ex = resolve_execution(ExecutionConfig())
    assert (ex.nprocs, ex.omp_nthreads) == (1, 1) and ex.mem_gb > 0
    monkeypatch.delenv("SLURM_CPUS_ON_NODE")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(cgroup_root=tmp_path) == 16
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs of quota -> 3 workers
    assert available_cpus(cgroup_root=tmp_path) == 3
    assert available_cpus({"SLURM_CPUS_PER_TASK": "4"}, cgroup_root=tmp_path / "none") == 4
    monkeypatch.setattr("pipeline.core.parallel.available_cpus", lambda *a, **k: 16)
    ex = resolve_execution(ExecutionConfig())
    assert (ex.nprocs, ex.omp_nthreads) == (16, 8)  # fMRIPrep: min(nprocs - 1, 8)


def test_login_name_is_set_when_missing(monkeypatch):
    monkeypatch.delenv("LOGNAME", raising=False)
    ensure_login_name()
    assert os.environ["LOGNAME"]
    monkeypatch.setenv("LOGNAME", "someone")
    ensure_login_name()
    assert os.environ["LOGNAME"] == "someone"


def _square_or_fail(x: int) -> int:
    if x == 3:
        raise ValueError(f"item {x} is bad")
    return x * x


@pytest.mark.parametrize("backend", ["synchronous", "threads", "processes"])
def test_parallel_map_keeps_order_and_catches_item_errors(backend):
    out = parallel_map(_square_or_fail, range(8), workers=2, backend=backend, catch=(ValueError,))
    assert out[:3] == [0, 1, 4] and out[4:] == [16, 25, 36, 49]
    assert out[3] == MapError("item 3 is bad", "ValueError")
    with pytest.raises(ValueError, match="item 3"):
        parallel_map(_square_or_fail, range(8), workers=2, backend=backend)
    assert parallel_map(Star(divmod), [(7, 2), (9, 4)], workers=2, backend=backend) == [(3, 1), (2, 1)]


def test_parallel_map_on_a_local_cluster_equals_threads():
    items = list(range(12))
    func = partial(pow, 3)
    local = parallel_map(func, items, dask=DaskConfig(local_cluster=True, workers=2))
    assert local == parallel_map(func, items, workers=2) == [3**i for i in items]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="neurocurate.user")
    set_progress(None)
    monkeypatch.delenv("NEUROCURATE_NO_PROGRESS", raising=False)
    try:
        tty = _Tty()
        monkeypatch.setattr(sys, "stderr", tty)
        with Progress("prep", total=4, unit="scan", mininterval=0) as bar:
            bar.update(1)
            bar.update(1, failed=True)
        drawn = tty.getvalue()
        assert "prep" in drawn and "2/4" in drawn and "1 failed" in drawn and "<" in drawn  # elapsed<ETA

        pipe = io.StringIO()  # not a terminal: no bar
        monkeypatch.setattr(sys, "stderr", pipe)
        with Progress("qc", total=2, unit="scan") as bar:
            bar.update(2)
        assert pipe.getvalue() == ""

        monkeypatch.setattr(sys, "stderr", tty := _Tty())
        set_progress(False)  # --no-progress
        with Progress("shards", total=3, unit="shard") as bar:
            bar.update(3)
        assert tty.getvalue() == ""
    finally:
        set_progress(None)
    summaries = [r.getMessage() for r in caplog.records if r.name == "neurocurate.user"]
    assert summaries[0].startswith("prep: 2/4 scan(s) in ") and summaries[0].endswith("1 failed")
    assert summaries[1].startswith("qc: 2/2 scan(s)") and summaries[2].startswith("shards: 3/3 shard(s)")


def test_participant_index_picks_one_subject(tmp_path):
    for label in ("b", "a", "c"):
        (tmp_path / f"sub-{label}").mkdir()
    (tmp_path / "sub-x.txt").write_text("")
    assert prep_command.participant_at(str(tmp_path), 0) == "a"
    assert prep_command.participant_at(str(tmp_path), 2) == "c"
    assert prep_command.participant_at(str(tmp_path), 1, ["sub-z", "y"]) == "y"
    with pytest.raises(Exception, match="out of range: 3 subject"):
        prep_command.participant_at(str(tmp_path), 3)


def test_scale_dataset_copies_real_scans_in_new_poses(tmp_path, shared_data):
    """benchmarks/scale.py dataset: each subject is a real corpus T1w moved by the rigid pose it records."""
    import nibabel as nib
    import numpy as np
    import pandas as pd
    from scipy.ndimage import center_of_mass
    from scipy.spatial.transform import Rotation

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import scale

    bids = scale.write_dataset(tmp_path / "bids", 2, seed=3, corpus=shared_data / "corpus")
    poses = pd.read_csv(bids / "participants.tsv", sep="\t").set_index("participant_id")
    assert list(poses.index) == ["sub-syn000", "sub-syn001"]
    for sub, pose in poses.iterrows():
        moved = nib.load(bids / sub / "anat" / f"{sub}_T1w.nii.gz")
        src = nib.load(shared_data / "corpus" / pose["source"] / "anat" / f"{pose['source']}_T1w.nii.gz")
        a = np.asanyarray(src.dataobj).astype(np.float32).reshape(src.shape[:3])
        b = np.asanyarray(moved.dataobj).astype(np.float32)
        assert np.allclose(moved.header.get_zooms()[:3], src.header.get_zooms()[:3])
        assert abs(b.sum() / a.sum() - 1) < 0.02  # rigid: the head keeps its intensity mass
        world = lambda img, data: (img.affine @ np.r_[center_of_mass(data), 1.0])[:3]
        centre = (src.affine @ np.r_[(np.array(a.shape) - 1) / 2.0, 1.0])[:3]
        rot = Rotation.from_euler("xyz", pose[["rot_x", "rot_y", "rot_z"]].to_numpy(float), degrees=True).as_matrix()
        expected = rot @ (world(src, a) - centre) + centre + pose[["shift_x", "shift_y", "shift_z"]].to_numpy(float)
        assert np.linalg.norm(world(moved, b) - expected) < 2.0  # mm
        assert np.linalg.norm(world(moved, b) - world(src, a)) > 3.0  # it did move


def test_prep_progress_counts_scans_done_and_failed(caplog):
    """The nipype status callback of prep: a scan is done when all its (non-identity) nodes ended."""
    import networkx as nx
    from nipype.interfaces.utility import Function, IdentityInterface
    from nipype.pipeline.engine import Node

    from pipeline.stages.prep import _ScanProgress

    def _node(name: str, hierarchy: str, identity: bool = False):
        iface = IdentityInterface(fields=["x"]) if identity else Function(function=_square_or_fail)
        node = Node(iface, name=name)
        node._hierarchy = hierarchy
        return node

    scans = {f"neurocurate_wf.sub_{s}_wf.{kind}_wf": [] for s in ("01", "02") for kind in ("anat_T1w", "bold_rest")}
    graph = nx.DiGraph()
    for key, nodes in scans.items():
        nodes.extend([_node("inputnode", key, identity=True), _node("validate", key), _node("n4", key)])
        graph.add_nodes_from(nodes)

    class _Wf:
        def _create_flat_graph(self):
            return graph

    caplog.set_level(logging.INFO, logger="neurocurate.user")
    progress = _ScanProgress(_Wf(), n_scans=4)
    assert progress.bar.total == 4
    a, b, c, _ = scans.values()
    for node in a[1:]:
        progress(node, "start")
        progress(node, "end")
    progress(b[1], "end")
    progress(c[1], "exception")
    progress(c[2], "end")  # after a failure the scan stays failed
    assert (progress.bar.done, progress.bar.failed) == (2, 1)
    progress.bar.close()
    assert caplog.records[-1].getMessage().startswith("prep: 2/4 scan(s) in ")
