"""Incremental reruns of ``neurocurate run``: no-op rerun, adding one subject, 1 vs 2 workers.

Prints, against references taken in the same run:

* no-op rerun time of a processed N-subject dataset (goal: under 10 s for 10 subjects);
* time to add one subject to it vs the full run (goal: ratio <= 1/5);
* speed-up of a 4-subject full run from 1 to 2 nipype workers (goal: >= 1.8x).

Subjects are real scans: copies of the niivue T1w (BSD-2, 104x150x133 at
1.6 mm) under different labels, preprocessed for real (N4, affine
registration, template brain mask, resampling) and curated, gradients
skipped (no BOLD), and sharded (``--until shards``). Wall times on a shared
machine are noisy; the ratios are taken in one run.

Usage::

    python benchmarks/incremental.py --workdir /tmp/nc_incremental [--subjects 10]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, shared: Path, labels: list[str]) -> Path:
    """A BIDS tree with one T1w (the niivue scan) per label."""
    bids = root / "bids"
    (bids).mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text('{"Name": "incremental benchmark", "BIDSVersion": "1.9.0"}')
    add_subjects(bids, shared, labels)
    return bids


def add_subjects(bids: Path, shared: Path, labels: list[str]) -> None:
    """Copy the scan in for each new label and rewrite participants.tsv."""
    for label in labels:
        target = bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / "anat" / "niivue_T1w_neck.nii.gz", target)
    subjects = sorted(p.name for p in bids.glob("sub-*"))
    (bids / "participants.tsv").write_text("participant_id\tsite\n" + "".join(f"{s}\tbench\n" for s in subjects))


def timed_run(bids: Path, out: Path, config: Path, nprocs: int) -> tuple[float, int, str]:
    """Seconds, exit code and printed text of one ``neurocurate run --until shards``."""
    import contextlib
    import io

    from pipeline.cli import main

    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        code = main(["run", str(bids), str(out), "--config", str(config), "--until", "shards", "--nprocs", str(nprocs)])
    return time.perf_counter() - t0, code, buf.getvalue()


def main_bench(argv: list[str] | None = None) -> int:
    """Run the chosen figures and print them; exit code 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nc_incremental"))
    parser.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--skip-workers", action="store_true", help="leave out the 1 vs 2 workers figure")
    parser.add_argument("--workers-only", action="store_true", help="only the 1 vs 2 workers figure")
    args = parser.parse_args(argv)

    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    config = args.workdir / "bench.toml"
    # Template masking (not deepbet) and one thread per process keep the per-subject cost small and comparable.
    config.write_text('[anat]\nskull_strip = "template"\n[execution]\nomp_nthreads = 1\n')

    labels = [f"{i:02d}" for i in range(1, args.subjects + 1)]
    figures: list[tuple[str, str]] = []
    if not args.workers_only:
        code = incremental_figures(args, config, labels, figures)
        if code:
            return code
    if not args.skip_workers:
        code = worker_figures(args, config, labels, figures)
        if code:
            return code
    width = max(len(k) for k, _ in figures)
    for key, value in figures:
        print(f"{key:{width}s}  {value}")
    return 0


def incremental_figures(args, config: Path, labels: list[str], figures: list[tuple[str, str]]) -> int:
    """Full run, no-op rerun and one added subject on the same dataset."""
    bids = make_dataset(args.workdir / "ds", args.shared_data, labels)
    out = args.workdir / "ds" / "out"
    full, code, _ = timed_run(bids, out, config, 2)
    if code != 0:
        print(f"full run failed with exit code {code}", file=sys.stderr)
        return code
    noop, code, text = timed_run(bids, out, config, 2)
    assert code == 0 and "running" not in text, text
    new_label = f"{args.subjects + 1:02d}"
    add_subjects(bids, args.shared_data, [new_label])
    add, code, text = timed_run(bids, out, config, 2)
    assert code == 0 and f"sub-{new_label}" in text, text
    print(text)
    figures += [
        (f"full run, {args.subjects} subjects (prep+qc+shards, 2 workers)", f"{full:.1f} s"),
        (f"no-op rerun, {args.subjects} subjects", f"{noop:.2f} s (goal < 10 s; {noop / full:.4f} of the full run)"),
        ("add 1 subject to the processed dataset", f"{add:.1f} s = {add / full:.3f} of the full run (goal <= 0.2)"),
    ]
    return 0


def worker_figures(args, config: Path, labels: list[str], figures: list[tuple[str, str]]) -> int:
    """The same 4-subject full run with 1 and with 2 nipype workers."""
    times = {}
    for nprocs in (1, 2):
        ws = args.workdir / f"workers{nprocs}"
        wbids = make_dataset(ws, args.shared_data, labels[:4])
        times[nprocs], code, text = timed_run(wbids, ws / "out", config, nprocs)
        stage_lines = [ln for ln in text.splitlines() if ln.split(" ", 1)[0] in ("prep", "qc", "shards")]
        print(f"{nprocs} worker(s):", " | ".join(" ".join(ln.split()) for ln in stage_lines))
        if code != 0:
            print(f"{nprocs}-worker run failed with exit code {code}", file=sys.stderr)
            return code
    figures.append(("4 subjects, 1 vs 2 workers", f"{times[1]:.1f} s vs {times[2]:.1f} s: "
                                                  f"speed-up {times[1] / times[2]:.2f}x (goal >= 1.8x)"))
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
