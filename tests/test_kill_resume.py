"""`kill -9` at random moments, then the same command again: derivatives are byte-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


def _digest(out):
    files = {}
    for p in sorted(out.rglob("sub-*/**/*")):
        if p.is_file():
            files[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def _cmd(bids, out, template_dir):
    return [sys.executable, "-m", "pipeline.cli", "prep", str(bids), str(out), "participant",
            "--nprocs", "1", "--template-dir", str(template_dir)]


def test_kill_minus_9_then_rerun_is_byte_identical(tmp_path, shared_data):
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    shutil.copyfile(shared_data / "anat" / "niivue_T1w_neck.nii.gz", bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    (bids / "dataset_description.json").write_text('{"Name": "kill test", "BIDSVersion": "1.9.0"}')
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "OMP_NUM_THREADS": "1"}

    reference = tmp_path / "reference"
    t0 = time.monotonic()
    subprocess.run(_cmd(bids, reference, shared_data / "templates"), check=True, env=env, capture_output=True)
    full = time.monotonic() - t0
    expected = _digest(reference)
    assert any(name.endswith("desc-preproc_T1w.nii.gz") for name in expected)

    out = tmp_path / "killed"
    rng = random.Random(20261122)
    for _ in range(3):
        proc = subprocess.Popen(_cmd(bids, out, shared_data / "templates"), env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 0.8) * full)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Whatever was published under a final name before the kill is whole (temporary names start with ".").
        for name, digest in _digest(out).items():
            if not name.split("/")[-1].startswith("."):
                assert digest == expected[name], f"{name} differs after a kill"
    done = subprocess.run(_cmd(bids, out, shared_data / "templates"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _digest(out) == expected, "derivatives differ, or temporary files were left behind"
