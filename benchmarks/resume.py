"""Time to resume vs time to rerun (issue 15): kill -9 a stage halfway, then run the same command again.

For three stages, each run exactly as a user types it (``python -m pipeline.cli ...`` as a subprocess,
interpreter start included):

* ``prep``: one real T1w of ``../shared/data/corpus`` (default ``sub-nichart01``, 2 mm) with the template
  skull strip; killed from outside (kill -9 of the process group) once half of the nipype nodes of an
  uninterrupted run have finished (counted from the result files in the work folder, as the crash harness
  does); the rerun continues from nipype's node cache;
* ``shards``: ABIDE-I CC200 series of ``--subjects`` subjects (NYU and UM_1), imported, curated
  (``neurocurate qc``) and with group gradients (set-up, not timed), written one sample per shard; killed by
  the crash point ``shards.shard_published`` after half of the shards (``NEUROCURATE_CRASH_AT``,
  ``pipeline/core/faults.py``); the rerun writes only the missing shards;
* ``pretrain``: the named ``tiny`` config on those shards with ``--max-steps`` steps and a checkpoint every
  ``--checkpoint-every`` steps; killed by the crash point ``pretrain.step`` at step ``max_steps // 2 + 5``
  (between two checkpoints, as a real crash would be: the steps since the last checkpoint are redone).

For each stage it prints the time of an uninterrupted run from scratch (= the time to rerun everything after
a crash if nothing could be resumed), the time until the kill, the time of the resumed run, their ratio, and
whether the resumed outputs equal the uninterrupted run's (derivatives / shard files byte for byte; the
pretraining run's logged losses and final parameters), and the time of one more rerun on the finished outputs
(the fixed cost of a run that has nothing left to do: interpreter start, imports, checks). The load average is
printed with the figures.

Usage::

    .venv/bin/python benchmarks/resume.py [--workdir /tmp/nc_resume] [--subject sub-nichart01] [--subjects 32] [--max-steps 80]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ENV = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "OMP_NUM_THREADS": "1", "NIPYPE_NO_ET": "1",
       "NEUROCURATE_NO_PROGRESS": "1", "NEUROCURATE_CRASH_AT": ""}


def cli(argv: list, env: dict | None = None) -> tuple[float, int, str]:
    """Run ``neurocurate ARGV``; seconds, exit code and stderr."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, argv)], env=env or ENV, cwd=REPO,
                       capture_output=True, text=True)
    return time.perf_counter() - t0, r.returncode, r.stderr


def must(result: tuple[float, int, str], what: str) -> float:
    seconds, code, err = result
    if code != 0:
        sys.exit(f"{what} failed (exit {code}): {err.strip()[-2000:]}")
    return seconds


def digest(root: Path, under: list[str]) -> dict[str, str]:
    """sha256 of every visible file below ``root/<under>`` (links to published versions followed)."""
    out = {}
    for top in under:
        for dirpath, _, files in os.walk(root / top, followlinks=True):
            for f in files:
                p = Path(dirpath) / f
                rel = p.relative_to(root).as_posix()
                if not any(part.startswith(".") for part in Path(rel).parts):
                    out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- prep


def finished_nodes(work: Path) -> int:
    return sum(1 for _ in work.rglob("result_*.pklz")) if work.is_dir() else 0


def bench_prep(work: Path, subject: str) -> dict:
    bids = work / "bids"
    src = DATA / "corpus" / subject / "anat" / f"{subject}_T1w.nii.gz"
    (bids / subject / "anat").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, bids / subject / "anat" / src.name)
    (bids / "dataset_description.json").write_text('{"Name": "resume benchmark", "BIDSVersion": "1.9.0"}')

    def argv(out: Path) -> list:
        return ["prep", bids, out, "participant", "--nprocs", "1", "--skull-strip", "template",
                "--template-dir", (DATA / "templates").resolve(), "--no-progress"]

    full = must(cli(argv(work / "prep_full")), "prep (uninterrupted)")
    n_nodes = finished_nodes(work / "prep_full" / ".work")
    out = work / "prep_killed"
    half = n_nodes // 2
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, argv(out))], env=ENV, cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while finished_nodes(out / ".work") < half and proc.poll() is None:
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    to_kill = time.perf_counter() - t0
    if not killed:
        sys.exit("prep finished before it could be killed")
    resume = must(cli(argv(out)), "prep (resumed)")
    same = digest(out, [subject]) == digest(work / "prep_full", [subject])
    noop = must(cli(argv(out)), "prep (no-op rerun)")
    return {"stage": f"prep (1 T1w, {subject})", "units": f"{n_nodes} nipype nodes", "killed": f"after {half} nodes",
            "full": full, "to_kill": to_kill, "resume": resume, "same": same, "noop": noop}


# --------------------------------------------------------------------------- shards and pretrain


def prepare_series(work: Path, subjects: int) -> Path:
    import pandas as pd

    abide = DATA / "abide"
    pheno = pd.read_csv(abide / "Phenotypic_V1_0b_preprocessed1.csv")
    per_site = subjects // 2
    ids = pheno[pheno["SITE_ID"].isin(["NYU", "UM_1"])].groupby("SITE_ID").head(per_site)["SUB_ID"]
    out = work / "series"
    must(cli(["import-timeseries", abide / "rois_cc200", "-o", out, "--phenotypes",
              abide / "Phenotypic_V1_0b_preprocessed1.csv", "--participant-label", *[f"{int(i):07d}" for i in ids]]),
         "import-timeseries")
    must(cli(["qc", out]), "qc")
    must(cli(["gradients", out]), "gradients")
    return out


def bench_shards(work: Path, series: Path) -> dict:
    def fresh(name: str) -> Path:
        out = work / name
        shutil.copytree(series, out, symlinks=True)
        return out

    argv = ["shards", None, "--samples-per-shard", "1", "--workers", "1"]
    full_out = fresh("shards_full")
    full = must(cli([full_out if a is None else a for a in argv]), "shards (uninterrupted)")
    n_shards = sum(1 for _ in (full_out / "shards").glob("fmri-*/shards/shard-*"))
    half = n_shards // 2
    out = fresh("shards_killed")
    to_kill, code, err = cli([out if a is None else a for a in argv],
                             env={**ENV, "NEUROCURATE_CRASH_AT": f"shards.shard_published:{half}"})
    if code != -signal.SIGKILL:
        sys.exit(f"shards was not killed at shard {half} (exit {code}): {err[-500:]}")
    resume = must(cli([out if a is None else a for a in argv]), "shards (resumed)")
    same = digest(out, ["shards"]) == digest(full_out, ["shards"])
    noop = must(cli([out if a is None else a for a in argv]), "shards (no-op rerun)")
    return {"noop": noop, "stage": f"shards ({n_shards} ABIDE runs, 1 per shard)", "units": f"{n_shards} shards",
            "killed": f"after shard {half}", "full": full, "to_kill": to_kill, "resume": resume, "same": same,
            "shards_dir": full_out / "shards"}


def training(run: Path) -> tuple[list, dict]:
    import torch

    from pipeline.core.layout import RunLayout

    layout = RunLayout(run)
    steps = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
             for line in layout.metrics.read_text().splitlines()]
    return steps, torch.load(layout.checkpoints()[-1], map_location="cpu", weights_only=False)["model"]


def bench_pretrain(work: Path, shards: Path, max_steps: int, every: int) -> dict:
    import torch

    config = work / "pretrain.toml"
    text = (REPO / "pipeline" / "configs" / "pretrain_tiny.toml").read_text()
    text = (text.replace("checkpoint_every = 25", f"checkpoint_every = {every}").replace("log_every = 5", "log_every = 1")
            .replace("max_steps = 50", f"max_steps = {max_steps}"))
    config.write_text(text)

    def argv(run: Path) -> list:
        return ["pretrain", shards, "--config", config, "--out", run, "--max-steps", max_steps, "--no-progress"]

    full = must(cli(argv(work / "run_full")), "pretrain (uninterrupted)")
    kill_at = max_steps // 2 + min(5, every - 1)
    to_kill, code, err = cli(argv(work / "run_killed"), env={**ENV, "NEUROCURATE_CRASH_AT": f"pretrain.step:{kill_at}"})
    if code != -signal.SIGKILL:
        sys.exit(f"pretrain was not killed at step {kill_at} (exit {code}): {err[-500:]}")
    resume = must(cli(argv(work / "run_killed")), "pretrain (resumed)")
    (a_steps, a_model), (b_steps, b_model) = training(work / "run_full"), training(work / "run_killed")
    same = a_steps == b_steps and all(torch.equal(a_model[k], b_model[k]) for k in a_model)
    noop = must(cli(argv(work / "run_killed")), "pretrain (no-op rerun)")
    last = (kill_at // every) * every
    return {"stage": f"pretrain (tiny, {max_steps} steps, checkpoint every {every})", "units": f"{max_steps} steps",
            "killed": f"at step {kill_at} (resumes from {last})", "full": full, "to_kill": to_kill, "resume": resume,
            "same": same, "noop": noop}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nc_resume"))
    ap.add_argument("--subject", default="sub-nichart01", help="corpus subject whose T1w is preprocessed")
    ap.add_argument("--subjects", type=int, default=32, help="ABIDE subjects for shards and pretraining (even)")
    ap.add_argument("--max-steps", type=int, default=80)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    args = ap.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"start: {load()}", flush=True)
    rows = [bench_prep(work, args.subject)]
    print(f"prep done: {load()}", flush=True)
    series = prepare_series(work, args.subjects)
    rows.append(bench_shards(work, series))
    print(f"shards done: {load()}", flush=True)
    rows.append(bench_pretrain(work, rows[-1].pop("shards_dir"), args.max_steps, args.checkpoint_every))
    print(f"pretrain done: {load()}", flush=True)
    print()
    print("| stage | work | killed | uninterrupted run = rerun from scratch (s) | run until the kill (s) "
          "| resumed run (s) | resume / rerun | no-op rerun of finished outputs (s) | resumed outputs equal uninterrupted |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['units']} | {r['killed']} | {r['full']:.1f} | {r['to_kill']:.1f} | "
              f"{r['resume']:.1f} | {r['resume'] / r['full']:.2f} | {r['noop']:.1f} | {'yes' if r['same'] else 'NO'} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; end: {load()}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
