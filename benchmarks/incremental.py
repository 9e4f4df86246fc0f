"""Incremental reruns of ``neurocurate run``: no-op rerun, adding one subject, 1 vs 2 workers (issues 8 and 13).

Prints, against references taken in the same run:

* no-op rerun time of a processed N-subject dataset (goal: under 10 s for 10 subjects);
* time to add one subject to it / the full run (goal: ratio <= 0.2), with where the time goes (each stage's
  seconds, and the QC group step's own counters: scans measured vs taken from the QC metric cache, subject
  reports drawn vs left unchanged);
* speed-up of a 4-subject full run from 1 to 2 nipype workers (goal: >= 1.8x).

Subjects are real scans: rigidly moved copies of the real T1w scans of ``../shared/data/corpus`` (the
dataset writer of ``benchmarks/scale.py``: subject ``i`` is the ``i``-th smallest corpus T1w in a random
pose, so the added subject ``syn0N`` is the next corpus scan in its own pose), preprocessed for real (N4,
affine registration, template brain mask, resampling), curated (``neurocurate qc``: metrics, four-layer
decisions, reports) and sharded (``--until shards``; gradients are skipped: no BOLD). Every run is the
command a user types (``neurocurate run ...`` as a subprocess, interpreter start included), with the
pipeline's defaults apart from ``skull_strip = "template"``; nothing is tuned on these scans. Wall times on a
shared machine are noisy: the load average is printed with each figure, and the ratios are taken in one run.

Usage::

    python benchmarks/incremental.py --workdir /tmp/nc_incremental [--subjects 10] [--skip-workers]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import load, run_cli, write_dataset  # the one synthetic-dataset writer

REPO = Path(__file__).resolve().parents[1]
_STAGE_LINE = re.compile(r"^(prep|qc|gradients|shards)\s+(ran|up to date|partial|skipped|failed|not run)\s+([\d.]+) s",
                         re.MULTILINE)
_QC_METRICS = re.compile(r"QC metrics: (\d+) scan\(s\) measured, (\d+) from the cache")
_QC_REPORTS = re.compile(r"QC reports: (\d+) subject report\(s\) drawn, (\d+) unchanged")


def timed_run(bids: Path, out: Path, config: Path, nprocs: int, log: Path) -> tuple[float, int, str]:
    """Seconds, exit code and printed text of one ``neurocurate run BIDS OUT --until shards``."""
    r = run_cli(["run", str(bids), str(out), "--config", str(config), "--until", "shards", "--nprocs", str(nprocs)],
                log=log)
    return r["seconds"], r["code"], log.read_text(errors="replace")


def stage_times(text: str) -> str:
    """``prep 191.2 s (ran) | qc ...`` from the run's summary table."""
    return " | ".join(f"{name} {secs} s ({status})" for name, status, secs in _STAGE_LINE.findall(text))


def qc_counters(text: str) -> str:
    """The QC group step's counters, as it logged them."""
    m, r = _QC_METRICS.findall(text), _QC_REPORTS.findall(text)
    parts = []
    if m:
        parts.append(f"QC metrics: {m[-1][0]} measured, {m[-1][1]} from the cache")
    if r:
        parts.append(f"subject reports: {r[-1][0]} drawn, {r[-1][1]} unchanged")
    return "; ".join(parts) or "QC did not run"


def main_bench(argv: list[str] | None = None) -> int:
    """Run the chosen figures and print them; exit code 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nc_incremental"))
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--skip-workers", action="store_true", help="leave out the 1 vs 2 workers figure")
    parser.add_argument("--workers-only", action="store_true", help="only the 1 vs 2 workers figure")
    parser.add_argument("--extra-config", default="",
                        help="TOML appended to the benchmark config (e.g. '[qc]\\nclassifier = false')")
    args = parser.parse_args(argv)

    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    config = args.workdir / "bench.toml"
    # Template masking (not deepbet) keeps the per-subject cost small; everything else is the default.
    config.write_text('[anat]\nskull_strip = "template"\n' + args.extra_config.replace("\\n", "\n") + "\n")
    print(f"# benchmarks/incremental.py; {load()}", flush=True)

    figures: list[tuple[str, str]] = []
    if not args.workers_only:
        code = incremental_figures(args, config, figures)
        if code:
            return code
    if not args.skip_workers:
        code = worker_figures(args, config, figures)
        if code:
            return code
    width = max(len(k) for k, _ in figures)
    for key, value in figures:
        print(f"{key:{width}s}  {value}")
    return 0


def incremental_figures(args, config: Path, figures: list[tuple[str, str]]) -> int:
    """Full run, no-op rerun and one added subject on the same dataset."""
    n = args.subjects
    root = args.workdir / "ds"
    bids = write_dataset(root / "bids", n)
    out = root / "out"
    load_full = load()
    full, code, text = timed_run(bids, out, config, args.nprocs, root / "full.log")
    print(f"full run: {full:.1f} s, exit {code}: {stage_times(text)}; {qc_counters(text)} ({load()})", flush=True)
    if code != 0:
        print(f"full run failed with exit code {code}; see {root / 'full.log'}", file=sys.stderr)
        return code
    noop, code, text = timed_run(bids, out, config, args.nprocs, root / "noop.log")
    print(f"no-op rerun: {noop:.2f} s, exit {code}: {stage_times(text)} ({load()})", flush=True)
    if code != 0 or "running" in text:
        print(f"the no-op rerun ran something; see {root / 'noop.log'}", file=sys.stderr)
        return code or 1
    write_dataset(bids, n + 1)  # the existing subjects are kept as they are; one more is written
    new_label = f"syn{n:03d}"
    load_add = load()
    add, code, text = timed_run(bids, out, config, args.nprocs, root / "add.log")
    print(f"add sub-{new_label}: {add:.1f} s, exit {code}: {stage_times(text)}; {qc_counters(text)} ({load()})",
          flush=True)
    if code != 0 or f"sub-{new_label}" not in text:
        print(f"adding sub-{new_label} failed; see {root / 'add.log'}", file=sys.stderr)
        return code or 1
    figures += [
        (f"full run, {n} subjects (prep+qc+shards, --nprocs {args.nprocs})", f"{full:.1f} s ({load_full} at start)"),
        (f"no-op rerun, {n} subjects", f"{noop:.2f} s (goal < 10 s; {noop / full:.4f} of the full run)"),
        ("add one subject / full run", (f"{add:.1f} s / {full:.1f} s = {add / full:.3f} (goal <= 0.2; "
                                        f"{load_add} at start)")),
        ("  where the add-one time goes", stage_times(text)),
        ("  its QC group step", qc_counters(text)),
    ]
    return 0


def worker_figures(args, config: Path, figures: list[tuple[str, str]]) -> int:
    """The same 4-subject full run with 1 and with 2 nipype workers."""
    times = {}
    for nprocs in (1, 2):
        ws = args.workdir / f"workers{nprocs}"
        bids = write_dataset(ws / "bids", 4)
        times[nprocs], code, text = timed_run(bids, ws / "out", config, nprocs, ws / "run.log")
        print(f"{nprocs} worker(s): {times[nprocs]:.1f} s: {stage_times(text)} ({load()})", flush=True)
        if code != 0:
            print(f"{nprocs}-worker run failed with exit code {code}; see {ws / 'run.log'}", file=sys.stderr)
            return code
    figures.append(("4 subjects, 1 vs 2 workers", (f"{times[1]:.1f} s vs {times[2]:.1f} s: "
                                                   f"speed-up {times[1] / times[2]:.2f}x (goal >= 1.8x)")))
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
