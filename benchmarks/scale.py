"""Scale-out figures (issue 17): subjects per hour, workers, MultiProc vs SLURM, Dask vs threads, peak memory.

Every figure comes from the command line a user types (``neurocurate run``/``prep``/``import-timeseries``/
``qc``/``shards``) run as a subprocess, and is printed with the machine's load average. Sub-commands::

    python benchmarks/scale.py dataset BIDS --subjects 100       # the synthetic 100-subject BIDS dataset
    python benchmarks/scale.py throughput --subjects 10 100      # subjects/hour on --nprocs 2 + peak memory
    python benchmarks/scale.py workers --subjects 4              # prep with 1 and 2 workers
    python benchmarks/scale.py slurm --subjects 4                # MultiProc vs a local SLURM cluster
    python benchmarks/scale.py shards --runs 10000               # shards: dask LocalCluster vs threads
    python benchmarks/scale.py all --quick                       # every figure at small counts

The dataset: real T1w scans of ``../shared/data/corpus`` (cycled), each copy moved by a random rigid
transform (rotations up to +-15 degrees, translations up to +-15 mm, trilinear, same voxels on a grid grown
by 25 mm per side so the head stays in view), written as BIDS
with the pose in ``participants.tsv``. Nothing here is tuned on these scans: the pipeline's defaults are used
(``--skull-strip template`` by default to keep the figures short; ``--skull-strip deepbet`` for the default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "corpus"
NEUROCURATE = str(Path(sys.executable).parent / "neurocurate")


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- dataset


def corpus_t1w(corpus: Path = CORPUS) -> list[Path]:
    """The real T1w scans of the corpus, smallest first (they dominate the subject cost)."""
    files = sorted(corpus.glob("sub-*/anat/sub-*_T1w.nii.gz"), key=lambda p: (p.stat().st_size, p.name))
    if not files:
        raise SystemExit(f"{corpus}: no sub-*/anat/*_T1w.nii.gz")
    return files


def rigid_copy(src: Path, dst: Path, rng: np.random.Generator, max_deg: float = 15.0, max_mm: float = 15.0,
               margin_mm: float = 25.0) -> dict:
    """Write ``src`` moved by a random rigid transform about its centre (same voxel size and orientation, the grid
    grown by ``margin_mm`` per side); return the pose."""
    import nibabel as nib
    from scipy.ndimage import affine_transform
    from scipy.spatial.transform import Rotation

    img = nib.load(src)
    data = np.asanyarray(img.dataobj)
    data = data.reshape(data.shape[:3]).astype(np.float32)
    affine = img.affine
    angles = rng.uniform(-max_deg, max_deg, 3)
    shift = rng.uniform(-max_mm, max_mm, 3)
    centre = affine @ np.r_[(np.array(data.shape) - 1) / 2.0, 1.0]
    world = np.eye(4)
    world[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    world[:3, 3] = centre[:3] - world[:3, :3] @ centre[:3] + shift
    # The grid grows by margin_mm on every side so that the moved head stays inside the field of view.
    pad = np.ceil(margin_mm / np.sqrt((affine[:3, :3] ** 2).sum(axis=0))).astype(int)
    out_affine = affine.copy()
    out_affine[:3, 3] = (affine @ np.r_[-pad, 1.0])[:3]
    # output voxel -> world -> (inverse pose) -> source world -> source voxel
    m = np.linalg.inv(affine) @ np.linalg.inv(world) @ out_affine
    moved = affine_transform(data, m[:3, :3], offset=m[:3, 3], output_shape=tuple(np.array(data.shape) + 2 * pad),
                             order=1, mode="constant", cval=0.0)
    header = img.header.copy()
    out = nib.Nifti1Image(np.clip(moved, 0, None).astype(np.float32), out_affine, header)
    out.set_qform(out_affine, code=1)
    out.set_sform(out_affine, code=1)
    out.set_data_dtype(np.float32)
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.to_filename(dst)
    return {"rot_x": angles[0], "rot_y": angles[1], "rot_z": angles[2], "shift_x": shift[0], "shift_y": shift[1],
            "shift_z": shift[2]}


def write_dataset(bids: Path, n_subjects: int, seed: int = 0, corpus: Path = CORPUS) -> Path:
    """A BIDS dataset of ``n_subjects`` synthetic subjects (one T1w each); existing subjects are kept."""
    sources = corpus_t1w(corpus)
    rng = np.random.default_rng(seed)
    bids.mkdir(parents=True, exist_ok=True)
    rows = ["participant_id\tsource\trot_x\trot_y\trot_z\tshift_x\tshift_y\tshift_z"]
    for i in range(n_subjects):
        label = f"syn{i:03d}"
        src = sources[i % len(sources)]
        dst = bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
        sub_rng = np.random.default_rng([seed, i])
        pose = rigid_copy(src, dst, sub_rng) if not dst.is_file() else _pose_again(sub_rng)
        rows.append(f"sub-{label}\t{src.parent.parent.name}\t" + "\t".join(f"{pose[k]:.3f}" for k in
                                                                      ("rot_x", "rot_y", "rot_z", "shift_x", "shift_y", "shift_z")))
    del rng
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    (bids / "dataset_description.json").write_text(json.dumps({
        "Name": f"neurocurate scale benchmark: {n_subjects} rigidly moved copies of real corpus T1w scans",
        "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "GeneratedBy": [{"Name": "benchmarks/scale.py", "Description": f"seed {seed}"}]}, indent=2) + "\n")
    return bids


def _pose_again(rng: np.random.Generator, max_deg: float = 15.0, max_mm: float = 15.0) -> dict:
    angles, shift = rng.uniform(-max_deg, max_deg, 3), rng.uniform(-max_mm, max_mm, 3)
    return {"rot_x": angles[0], "rot_y": angles[1], "rot_z": angles[2], "shift_x": shift[0], "shift_y": shift[1],
            "shift_z": shift[2]}


# --------------------------------------------------------------------------- running commands


def run_cli(argv: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> dict:
    """Run ``neurocurate ARGV``; wall time, exit code and the main process's peak RSS (VmHWM, MB)."""
    start = time.perf_counter()
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen([NEUROCURATE, *argv], stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "NEUROCURATE_NO_PROGRESS": "1", **(env or {})})
    peak_kb = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    if log:
        out.close()
    return {"seconds": time.perf_counter() - start, "code": proc.returncode, "peak_mb": peak_kb / 1024}


def _config(path: Path, skull_strip: str, extra: str = "") -> Path:
    path.write_text(f'[anat]\nskull_strip = "{skull_strip}"\n{extra}')
    return path


# --------------------------------------------------------------------------- figures


def figure_throughput(work: Path, counts: list[int], nprocs: int, skull_strip: str) -> list[dict]:
    """``neurocurate run BIDS OUT --until shards`` on N subjects: subjects/hour, seconds/subject, peak memory."""
    rows = []
    for n in counts:
        bids = write_dataset(work / f"bids-{n}", n)
        out = work / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = _config(work / "run.toml", skull_strip, "[run]\nevaluate_target = \"\"\n")
        print(f"[throughput] {n} subjects, --nprocs {nprocs} ... ({load()})", flush=True)
        r = run_cli(["run", str(bids), str(out), "--config", str(cfg), "--until", "shards", "--nprocs", str(nprocs),
                     "--omp-nthreads", "1"], log=work / f"run-{n}.log")
        r.update(subjects=n, per_hour=n / r["seconds"] * 3600, per_subject=r["seconds"] / n, load=load())
        rows.append(r)
        print(f"  {n:4d} subjects: {r['seconds']:8.1f} s, {r['per_hour']:6.1f} subjects/hour, "
              f"{r['per_subject']:6.1f} s/subject, main-process peak {r['peak_mb']:.0f} MB, exit {r['code']} "
              f"({r['load']})", flush=True)
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(f"  cost per subject {b['subjects']} vs {a['subjects']}: x{b['per_subject'] / a['per_subject']:.2f} "
              f"(1.00 = linear); main-process peak memory x{b['peak_mb'] / max(a['peak_mb'], 1):.2f}")
    return rows


def figure_workers(work: Path, n: int, skull_strip: str) -> dict:
    """The same ``prep`` of N subjects with --nprocs 1 and --nprocs 2 (one thread per node)."""
    bids = write_dataset(work / f"bids-{n}", n)
    cfg = _config(work / "prep.toml", skull_strip)
    times = {}
    for procs in (1, 2):
        out = work / f"workers-{procs}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"[workers] {n} subjects, --nprocs {procs} ... ({load()})", flush=True)
        r = run_cli(["prep", str(bids), str(out), "participant", "--config", str(cfg), "--nprocs", str(procs),
                     "--omp-nthreads", "1"], log=work / f"workers-{procs}.log")
        times[procs] = r["seconds"]
        print(f"  --nprocs {procs}: {r['seconds']:.1f} s, exit {r['code']} ({load()})", flush=True)
    speedup = times[1] / times[2]
    # Amdahl with S + P = t1 and S + P/2 = t2: the part that did not get faster with the second worker.
    serial = 2 * times[2] - times[1]
    print(f"  1 -> 2 workers: x{speedup:.2f} (goal >= 1.8); serial part S = 2*t2 - t1 = {serial:.1f} s")
    return {"times": times, "speedup": speedup, "serial_s": serial}


def figure_slurm(work: Path, n: int, skull_strip: str) -> dict:
    """``prep`` of N subjects with MultiProc (--nprocs = node CPUs) and with the SLURM plugin on a local cluster."""
    sys.path.insert(0, str(REPO / "tests"))
    from slurm_cluster import LocalSlurm, missing_binaries

    missing = missing_binaries()
    if missing:
        print(f"[slurm] skipped: {', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
        return {}
    bids = write_dataset(work / f"bids-{n}", n)
    cfg = _config(work / "prep.toml", skull_strip, "[execution]\nomp_nthreads = 1\n")
    cpus = len(os.sched_getaffinity(0))
    cluster = LocalSlurm(Path(tempfile.mkdtemp(prefix="slurm-", dir=work))).start()
    try:
        out = work / "slurm-multiproc"
        shutil.rmtree(out, ignore_errors=True)
        print(f"[slurm] {n} subjects, MultiProc --nprocs {cpus} ... ({load()})", flush=True)
        mp = run_cli(["prep", str(bids), str(out), "participant", "--config", str(cfg), "--nprocs", str(cpus)],
                     log=work / "slurm-multiproc.log")
        out = work / "slurm-slurm"
        shutil.rmtree(out, ignore_errors=True)
        print(f"[slurm] {n} subjects, --plugin SLURM ... ({load()})", flush=True)
        before = len(cluster.jobs())
        sl = run_cli(["prep", str(bids), str(out), "participant", "--config", str(cfg), "--plugin", "SLURM",
                      "--plugin-arg", f"max_jobs={cpus}", "--work-dir", str(work / "slurm-work")],
                     env=cluster.env, log=work / "slurm-slurm.log")
        jobs = len(cluster.jobs()) - before
    finally:
        cluster.stop()
    per_job = (sl["seconds"] - mp["seconds"]) / max(jobs, 1)
    print(f"  MultiProc {mp['seconds']:.1f} s (exit {mp['code']}); SLURM {sl['seconds']:.1f} s (exit {sl['code']}), "
          f"{jobs} sbatch jobs; overhead {per_job:.2f} s/job ({load()})")
    return {"multiproc": mp["seconds"], "slurm": sl["seconds"], "jobs": jobs, "overhead_per_job": per_job}


def figure_shards(work: Path, n_runs: int, frames: int = 120, rois: int = 50, workers: int = 2) -> dict:
    """``neurocurate shards`` of N synthetic imported runs: [dask] local_cluster vs [shards] threads."""
    src = work / f"series-{n_runs}"
    if not src.is_dir():
        src.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(n_runs):
            np.save(src / f"run{i:05d}.npy", rng.standard_normal((frames, rois)).astype(np.float32))
    out = work / f"shards-{n_runs}"
    if not (out / "curation").is_dir():
        shutil.rmtree(out, ignore_errors=True)
        print(f"[shards] importing {n_runs} runs and QC ... ({load()})", flush=True)
        for argv in (["import-timeseries", str(src), "-o", str(out), "--tr", "2.0", "--min-volumes", "10"],
                     ["qc", str(out)]):
            r = run_cli(argv, log=work / "shards-setup.log")
            if r["code"] not in (0, 3):
                raise SystemExit(f"neurocurate {argv[0]} failed; see {work / 'shards-setup.log'}")
    times = {}
    configs = {
        "threads": f"[shards]\nworkers = {workers}\nscheduler = \"threads\"\nsamples_per_shard = 256\n",
        "LocalCluster": f"[shards]\nsamples_per_shard = 256\n[dask]\nlocal_cluster = true\nworkers = {workers}\n",
    }
    for name, text in configs.items():
        (work / "shards.toml").write_text(text)
        shutil.rmtree(out / "shards", ignore_errors=True)
        print(f"[shards] {n_runs} runs, {name} ({workers} workers) ... ({load()})", flush=True)
        r = run_cli(["shards", str(out), "--config", str(work / "shards.toml")], log=work / f"shards-{name}.log")
        times[name] = r["seconds"]
        print(f"  {name}: {r['seconds']:.1f} s, exit {r['code']}, main-process peak {r['peak_mb']:.0f} MB ({load()})")
    print(f"  LocalCluster / threads: x{times['LocalCluster'] / times['threads']:.2f} time")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("dataset", help="write the synthetic BIDS dataset")
    p.add_argument("bids", type=Path)
    p.add_argument("--subjects", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    for name in ("throughput", "workers", "slurm", "shards", "all"):
        p = sub.add_parser(name)
        p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "neurocurate-scale")
        p.add_argument("--skull-strip", choices=["template", "deepbet"], default="template")
        p.add_argument("--subjects", type=int, nargs="+", default=[10, 100] if name == "throughput" else [4])
        p.add_argument("--nprocs", type=int, default=2)
        p.add_argument("--runs", type=int, default=10000)
        p.add_argument("--quick", action="store_true", help="all: 2/4 subjects and 1000 runs (development)")
    args = parser.parse_args(argv)
    if args.cmd == "dataset":
        write_dataset(args.bids, args.subjects, args.seed)
        print(f"{args.bids}: {args.subjects} subjects")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"# benchmarks/scale.py {args.cmd}; {os.cpu_count()} CPUs; {load()}", flush=True)
    if args.cmd in ("throughput", "all"):
        counts = [2, 4] if args.quick else (args.subjects if args.cmd == "throughput" else [10, 100])
        figure_throughput(args.work, counts, args.nprocs, args.skull_strip)
    if args.cmd in ("workers", "all"):
        figure_workers(args.work, 2 if args.quick else args.subjects[0], args.skull_strip)
    if args.cmd in ("slurm", "all"):
        figure_slurm(args.work, 2 if args.quick else args.subjects[0], args.skull_strip)
    if args.cmd in ("shards", "all"):
        figure_shards(args.work, 1000 if args.quick else args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
