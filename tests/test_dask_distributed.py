"""Dask distributed for real: a `dask scheduler` and two `dask worker` processes on 127.0.0.1.

The group QC metrics, the group connectome (`gradients`) and shard writing of real ABIDE CC200 series run once
in this process (one worker) and once on the cluster (`[dask] scheduler`); the curation table, the gradients
and every shard file must be equal, and the cluster must have run the tasks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.core.layout import OutputLayout

pytestmark = pytest.mark.integration

DASK = str(Path(sys.executable).parent / "dask")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = []

    def spawn(argv: list[str], log: str) -> None:
        with open(root / log, "wb") as out:
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env))

    try:
        spawn([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], "scheduler.log")
        for i in range(2):
            spawn([DASK, "worker", address, "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                   "--local-directory", str(root / f"w{i}"), "--name", f"w{i}"], f"worker{i}.log")
        from distributed import Client

        deadline = time.monotonic() + 90
        with Client(address, timeout="60s") as client:
            while len(client.scheduler_info()["workers"]) < 2:
                assert time.monotonic() < deadline, (root / "scheduler.log").read_text()
                assert all(p.poll() is None for p in procs), "a dask process exited"
                time.sleep(0.5)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _run_group_stages(shared_data: Path, out: Path, config: Path) -> None:
    abide = shared_data / "abide"
    pheno_csv = abide / "Phenotypic_V1_0b_preprocessed1.csv"
    pheno = pd.read_csv(pheno_csv)
    ids = pheno[pheno["SITE_ID"].isin(["NYU", "UM_1"])].groupby(["SITE_ID", "DX_GROUP"]).head(4)["SUB_ID"]
    labels = [f"{int(i):07d}" for i in ids]
    assert main(["import-timeseries", str(abide / "rois_cc200"), "-o", str(out), "--phenotypes", str(pheno_csv),
                 "--participant-label", *labels]) == 0
    assert main(["qc", str(out), "--config", str(config)]) == 0
    assert main(["gradients", str(out), "--n-components", "5", "--config", str(config)]) == 0
    assert main(["shards", str(out), "--config", str(config)]) == 0


def _files(root: Path) -> dict[str, bytes]:
    """Every published file by its logical path (links followed; hidden versioned folders have random names)."""
    out = {}
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(folder) / name
            if "neurocurate_config" not in name and path.suffix not in (".parquet", ".html") and name != ".lock":
                out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def test_group_stages_on_dask_cluster_equal_single_process(cluster, shared_data, tmp_path):
    from distributed import Client

    single_cfg = tmp_path / "single.toml"
    single_cfg.write_text("[dask]\nworkers = 1\n[shards]\nsamples_per_shard = 4\nworkers = 1\n")
    dist_cfg = tmp_path / "dist.toml"
    dist_cfg.write_text(f'[dask]\nscheduler = "{cluster}"\n[shards]\nsamples_per_shard = 4\n')

    single, dist = tmp_path / "single", tmp_path / "dist"
    _run_group_stages(shared_data, single, single_cfg)
    _run_group_stages(shared_data, dist, dist_cfg)

    with Client(cluster) as client:
        done = client.run_on_scheduler(
            lambda dask_scheduler: {name: tp.state_counts["memory"] for name, tp in dask_scheduler.task_prefixes.items()})
        per_worker = client.run(lambda: os.getpid())
    assert len(set(per_worker.values())) == 2
    # one task per scan (QC), per run (connectome) and per shard ran on the cluster
    for name in ("neurocurate_scan_record", "neurocurate__run_z", "neurocurate__write_shard"):
        assert done.get(name, 0) >= 3, done

    a, b = OutputLayout(single), OutputLayout(dist)
    pd.testing.assert_frame_equal(pd.read_parquet(a.curation_table), pd.read_parquet(b.curation_table))
    assert a.gradients_tsv("CC200").read_bytes() == b.gradients_tsv("CC200").read_bytes()
    assert a.gradients_json("CC200").read_bytes() == b.gradients_json("CC200").read_bytes()
    shards_a, shards_b = _files(a.default_shards_dir), _files(b.default_shards_dir)
    assert len([k for k in shards_a if "shard-" in k]) >= 3
    assert shards_a == shards_b
    for parquet in sorted(a.default_shards_dir.rglob("*.parquet")):
        other = b.default_shards_dir / parquet.relative_to(a.default_shards_dir)
        pd.testing.assert_frame_equal(pd.read_parquet(parquet), pd.read_parquet(other))
