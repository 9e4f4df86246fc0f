"""A real one-node SLURM cluster on localhost: `neurocurate prep --plugin SLURM` and the per-subject array job.

The fixture starts munged, slurmctld and slurmd (tests/slurm_cluster.py) and stops exactly those processes.
Two real T1w scans (corpus) are preprocessed with MultiProc, with the SLURM plugin (every node an sbatch job,
LOGNAME unset, ``max_jobs`` given as ``--plugin-arg``), and one of them by the README's array-job script; the
derivatives must be byte-identical.
"""

from __future__ import annotations

import subprocess

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import LocalSlurm, missing_binaries

from pipeline.cli import main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ("nichart01", "nichart02")
CONFIG = '[anat]\nskull_strip = "template"\n[execution]\nomp_nthreads = 1\n'


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed here (missing {', '.join(missing)}); "
                    "`apt-get install slurm-wlm munge` (as .ci/run does) enables these tests")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("slurm_prep")
    bids = root / "bids"
    for sub in SUBJECTS:
        src = shared_data / "corpus" / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"
        (bids / f"sub-{sub}" / "anat").mkdir(parents=True)
        shutil.copyfile(src, bids / f"sub-{sub}" / "anat" / src.name)
    (bids / "dataset_description.json").write_text('{"Name": "slurm test", "BIDSVersion": "1.9.0"}')
    config = root / "prep.toml"
    config.write_text(CONFIG)
    out = root / "multiproc"
    # a fresh process, as a user's command (ANTs fixes its thread count when first used in a process)
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "prep", str(bids), str(out), "participant",
                          "--config", str(config), "--nprocs", "2", "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    return {"root": root, "bids": bids, "config": config, "multiproc": out}


def _derivatives(out: Path, subject: str) -> dict[str, bytes]:
    files = sorted(p for p in (out / f"sub-{subject}").rglob("*") if p.is_file())
    assert files, f"no derivatives for sub-{subject} in {out}"
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


def test_srun_answers(slurm):
    assert slurm.run(["srun", "hostname"], timeout=30).stdout.strip()


def test_prep_on_slurm_matches_multiproc(slurm, dataset, monkeypatch, capsys):
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LOGNAME", raising=False)  # nipype's plugin used to die with KeyError: 'LOGNAME'
    before = {job["JobId"] for job in slurm.jobs()}
    out = dataset["root"] / "slurm"
    code = main(["prep", str(dataset["bids"]), str(out), "participant", "--config", str(dataset["config"]),
                 "--plugin", "SLURM", "--plugin-arg", "max_jobs=2", "--plugin-arg", "sbatch_args=--time=30",
                 "--work-dir", str(dataset["root"] / "slurm_work"), "--no-progress"])
    assert code == 0, slurm.logs()
    assert "prep: 2/2 scan(s) in" in capsys.readouterr().out  # the one-line summary of the progress counter
    jobs = [job for job in slurm.jobs() if job["JobId"] not in before]
    # Every non-identity node of both subjects ran as its own sbatch job (named node.workflow...), all completed.
    for sub in SUBJECTS:
        mine = [job for job in jobs if f".sub_{sub}_wf." in job["Name"]]
        assert {job["Name"].split(".")[0] for job in mine} >= {"validate", "n4", "register"}, [j["Name"] for j in jobs]
        assert {job["JobState"] for job in mine} == {"COMPLETED"}
    for sub in SUBJECTS:
        assert _derivatives(out, sub) == _derivatives(dataset["multiproc"], sub)


def _readme_array_script() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- sbatch-array-example -->\s*```bash\n(.*?)```", text, re.DOTALL)
    assert match, "README.md lost its sbatch array-job example"
    return match.group(1)


def test_readme_array_job_script_runs_one_subject(slurm, dataset, tmp_path):
    script = tmp_path / "prep_array.sbatch"
    script.write_text(_readme_array_script())
    out = dataset["root"] / "array"
    env = {"BIDS": str(dataset["bids"]), "OUT": str(out), "CONFIG": str(dataset["config"]),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    # Command-line options override the script's #SBATCH lines: one task (index 1 = the second subject), one CPU.
    result = slurm.run(["sbatch", "--wait", "--array=1", "--cpus-per-task=1", f"--chdir={tmp_path}",
                        f"--output={tmp_path}/task-%a.out", str(script)], env=env, timeout=900)
    log = (tmp_path / "task-1.out").read_text() if (tmp_path / "task-1.out").is_file() else ""
    assert result.returncode == 0, f"{result.stderr}\n{log}\n{slurm.logs()}"
    assert "1 subject(s)" in log
    assert not (out / f"sub-{SUBJECTS[0]}").exists()
    assert _derivatives(out, SUBJECTS[1]) == _derivatives(dataset["multiproc"], SUBJECTS[1])
