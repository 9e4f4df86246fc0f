"""Stage ``prep``: the BIDS-App participant level on nipype's own plugins (MultiProc, Linear, SLURM, SGE, PBS, ...).

Entry point: :func:`run_prep`.

One failing scan never stops the others: nipype skips only the failed node's
descendants. Afterwards every crash is turned into a one-line error that
names the input file, written to ``OUTPUT_DIR/logs/sub-<label>_<node>_crash.txt``
(which the QC reports show) and printed; the exit code is 3 ("partial")
when some subjects failed and others finished.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.core.atomic import atomic_write_text
from pipeline.core.bids import check_output_dir
from pipeline.core.config import Config, write_resolved_config
from pipeline.core.console import USER_LOG
from pipeline.core.derivatives import write_dataset_description
from pipeline.core.errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL
from pipeline.core.layout import OutputLayout

__all__ = ["CrashRecord", "collect_crashes", "ensure_login_name", "failed_subjects", "nipype_plugin_args",
           "refresh_descriptions", "run_prep", "scan_threads"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrashRecord:
    subject: str
    node: str
    message: str
    crash_file: Path


def nipype_plugin_args(cfg: Config) -> dict:
    """Arguments for the configured nipype plugin; ``execution.plugin_args`` win.

    MultiProc gets ``n_procs`` and ``memory_gb`` (a node waits until its ``mem_gb`` fits); the automatic
    values (0) of ``[execution]`` are resolved for this machine first (:func:`pipeline.core.parallel.resolve_execution`).
    """
    from pipeline.core.parallel import resolve_execution

    ex = resolve_execution(cfg.execution)
    args: dict = {}
    if ex.plugin in ("MultiProc", "LegacyMultiProc"):
        args = {"n_procs": ex.nprocs, "memory_gb": ex.mem_gb, "raise_insufficient": False}
    return {**args, **ex.plugin_args}


def scan_threads(ex, requested: int, n_scans: int):
    """``[execution]`` with each node's threads raised so that fewer scans than processes still use every core.

    Only when the threads are automatic (``requested`` 0) on a local MultiProc pool: ``n_scans`` scans get
    ``max(omp_nthreads, nprocs // n_scans)`` threads per node (at most 8), so a lone subject's chain, e.g.
    one added to a processed dataset, runs on all ``nprocs`` cores instead of one.
    """
    if requested or n_scans <= 0 or ex.plugin not in ("MultiProc", "LegacyMultiProc"):
        return ex
    return replace(ex, omp_nthreads=min(ex.nprocs, max(ex.omp_nthreads, min(ex.nprocs // n_scans, 8))))


def ensure_login_name() -> None:
    """Set ``LOGNAME`` from the password database when it is unset.

    nipype's SLURM, SGE, PBS, LSF, OAR and Condor plugins name every job after ``os.environ["LOGNAME"]`` and
    die with ``KeyError: 'LOGNAME'`` where it is missing (containers, CI, cron).
    """
    if os.environ.get("LOGNAME"):
        return
    try:
        import pwd

        name = pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        import getpass

        try:
            name = getpass.getuser()
        except Exception:
            name = f"uid{os.getuid()}"
    os.environ["LOGNAME"] = name


_SCAN_WF_RE = re.compile(r"^(.*?\.(?:anat|bold)_[^.]+_wf)(?:\.|$)")


#: Name of the per-subject report node (:func:`add_report_nodes`) inside each subject's sub-workflow.
REPORT_NODE = "subject_report"
_REPORT_INPUTS_NODE = "subject_report_inputs"
_REPORT_NODES = (REPORT_NODE, _REPORT_INPUTS_NODE)


class _ScanProgress:
    """nipype ``status_callback``: counts scans whose nodes all finished, and scans with a failed node.

    It also records the subjects whose report node (:data:`REPORT_NODE`) finished, in ``reported``:
    ``report_nodes`` maps a subject's sub-workflow name to its label.
    """

    def __init__(self, wf, n_scans: int, report_nodes: dict[str, str] | None = None):
        from nipype.interfaces.utility import IdentityInterface

        from pipeline.core.progress import Progress

        self.report_nodes = dict(report_nodes or {})
        self.reported: set[str] = set()
        self.nodes_left: dict[str, set[str]] = {}
        try:
            for node in wf._create_flat_graph().nodes():
                if isinstance(node.interface, IdentityInterface):  # nipype drops these before running
                    continue
                key = self._scan_of(node.fullname)
                if key:
                    self.nodes_left.setdefault(key, set()).add(node.fullname)
        except Exception as exc:  # progress must never cost the run
            LOG.debug("no per-scan progress: %s", exc)
        self.failed: set[str] = set()
        self.bar = Progress("prep", total=len(self.nodes_left) or n_scans, unit="scan")

    @staticmethod
    def _scan_of(fullname: str) -> str | None:
        match = _SCAN_WF_RE.match(fullname)
        return match.group(1) if match else None

    def __call__(self, node, status: str) -> None:
        try:
            parts = node.fullname.split(".")
            if status == "end" and parts[-1] == REPORT_NODE and len(parts) > 1 and parts[-2] in self.report_nodes:
                self.reported.add(self.report_nodes[parts[-2]])
                return
            key = self._scan_of(node.fullname)
            if key is None or key not in self.nodes_left or key in self.failed:
                return
            left = self.nodes_left[key]
            if status == "exception":
                self.failed.add(key)
                self.bar.update(1, failed=True)
            elif status == "end" and node.fullname in left:
                left.discard(node.fullname)
                if not left:
                    self.bar.update(1)
        except Exception as exc:  # pragma: no cover - progress must never cost the run
            LOG.debug("progress callback: %s", exc)


_NODE_RE = re.compile(r"^Node:\s*(\S+)", re.MULTILINE)
_SUB_RE = re.compile(r"\bsub_([A-Za-z0-9]+)_wf\b")


def _last_error_line(text: str) -> str:
    """The exception line of a traceback (``InputError: /x.nii.gz: contains NaN``)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*:", line):
            name, _, msg = line.partition(":")
            return f"{name.rsplit('.', 1)[-1]}:{msg}"
    return lines[-1] if lines else "unknown error"


def collect_crashes(crash_dir: Path, since: float) -> list[CrashRecord]:
    """nipype crash files written after ``since`` (epoch seconds)."""
    records = []
    if not crash_dir.is_dir():
        return records
    for path in sorted(crash_dir.glob("crash-*.txt")):
        if path.stat().st_mtime < since:
            continue
        text = path.read_text(errors="replace")
        node_match = _NODE_RE.search(text)
        node = node_match.group(1) if node_match else path.stem
        sub_match = _SUB_RE.search(node) or _SUB_RE.search(text)
        subject = sub_match.group(1) if sub_match else "unknown"
        records.append(CrashRecord(subject, node, _last_error_line(text), path))
    return records


def _publish_crash(output_dir: Path, rec: CrashRecord) -> Path:
    short = rec.node.split(".", 2)[-1].replace(".", "_") if "." in rec.node else rec.node
    target = OutputLayout(output_dir).crash_log(rec.subject, short)
    body = f"{rec.message}\n\nnode: {rec.node}\nnipype crash file: {rec.crash_file}\n\n{rec.crash_file.read_text(errors='replace')}"
    atomic_write_text(target, body)
    return target


def _clear_old_crashes(output_dir: Path, subjects: list[str]) -> None:
    layout = OutputLayout(output_dir)
    for sub in subjects:
        for path in layout.crash_logs(sub):
            path.unlink(missing_ok=True)


def failed_subjects(output_dir: Path, subjects: list[str] | tuple[str, ...]) -> list[str]:
    """Subjects among ``subjects`` with a crash file in ``OUTPUT_DIR/logs``."""
    layout = OutputLayout(output_dir)
    return sorted(s for s in subjects if layout.crash_logs(s))


def _remove_stale_temporaries(output_dir: Path) -> None:
    """Delete temporary files a killed run left behind (atomic writes use ``.<name>.<random>.tmp<ext>``)."""
    for pattern in ("sub-*/**/.*.tmp*", "logs/.*.tmp*", ".*.tmp*"):
        for path in output_dir.glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)


def _merge_participants(bids_dir: Path, output_dir: Path) -> None:
    """Carry participants.tsv into the derivatives (labels for shards and evaluation)."""
    import pandas as pd

    from pipeline.core.bids import read_participants

    rows = read_participants(bids_dir)
    if rows is None:
        return
    new = pd.DataFrame(rows).set_index("participant_id")
    target = OutputLayout(output_dir).participants
    if target.is_file():
        old = pd.read_csv(target, sep="\t", dtype=str, keep_default_na=False).set_index("participant_id")
        new = new.combine_first(old)[list(dict.fromkeys([*new.columns, *old.columns]))]
    text = new.reset_index().to_csv(sep="\t", index=False)
    if not target.is_file() or target.read_text() != text:
        atomic_write_text(target, text)


def add_report_nodes(wf, subjects: list[str] | tuple[str, ...], output_dir: Path, cfg: Config,
                     num_threads: int = 1) -> dict[str, str]:
    """Give every subject's sub-workflow a report node (:data:`REPORT_NODE`) that runs after its derivative sinks.

    The subject reports are then drawn on the workers, next to the other subjects' scans, instead of one after
    the other in the main process once the whole graph has run. A subject with a failed node never reaches its
    report node; its report (with the crash) is written by the main process afterwards, as before.

    Returns
    -------
    dict
        Sub-workflow name -> subject label, for the subjects that got a report node.
    """
    from nipype.interfaces.utility import Merge
    from nipype.pipeline import engine as pe

    from pipeline.core.config import config_to_dict
    from workflows.base import subject_wf_name
    from workflows.interfaces.bold import WriteBoldDerivatives
    from workflows.interfaces.derivatives import WriteAnatDerivatives
    from workflows.interfaces.reports import WriteSubjectReport

    sink_output = {WriteAnatDerivatives: "out_files", WriteBoldDerivatives: "sidecar"}
    config = config_to_dict(cfg)
    added: dict[str, str] = {}
    for sub in subjects:
        sub_wf = wf.get_node(subject_wf_name(sub))
        if sub_wf is None:
            continue
        sinks = []
        for scan_wf in sorted(sub_wf._graph.nodes(), key=lambda n: n.name):
            if not isinstance(scan_wf, pe.Workflow):
                continue
            for node in sorted(scan_wf._graph.nodes(), key=lambda n: n.name):
                field = next((f for cls, f in sink_output.items() if isinstance(node.interface, cls)), None)
                if field is not None:
                    sinks.append((scan_wf, f"{node.name}.{field}"))
        if not sinks:
            continue
        merge = pe.Node(Merge(len(sinks)), name=_REPORT_INPUTS_NODE, run_without_submitting=True)
        report = pe.Node(WriteSubjectReport(output_dir=str(output_dir), subject=sub, config=config,
                                            num_threads=num_threads),
                         name=REPORT_NODE, n_procs=num_threads, mem_gb=0.5)
        # Always run: the report also shows the curation table, ratings and crash logs, which are no inputs
        # of the node; it rewrites the HTML only when what it shows changed (qc.group).
        report.overwrite = True
        for i, (scan_wf, source) in enumerate(sinks, 1):
            sub_wf.connect(scan_wf, source, merge, f"in{i}")
        sub_wf.connect(merge, "out", report, "published")
        added[sub_wf.name] = sub
    return added


def refresh_descriptions(bids_dir: str | Path, output_dir: str | Path) -> None:
    """Carry only the dataset-level descriptions (dataset_description.json, participants.tsv) into OUTPUT_DIR."""
    bids_dir, output_dir = check_output_dir(bids_dir, output_dir)
    write_dataset_description(output_dir, bids_dir)
    _merge_participants(bids_dir, output_dir)


def run_prep(
    bids_dir: str | Path,
    output_dir: str | Path,
    cfg: Config,
    *,
    work_dir: str | Path | None = None,
    participant_labels: list[str] | tuple[str, ...] | None = None,
) -> int:
    """Preprocess a BIDS dataset (participant level): index, build and run the nipype graph.

    Parameters
    ----------
    bids_dir, output_dir : path-like
        The raw dataset and the derivatives root (they must differ).
    cfg : Config
        Resolved configuration (``[execution]``, ``[anat]``, ``[bold]``, ``[templates]``, ``[parcellation]``).
    work_dir : path-like, optional
        nipype work folder and BIDS index cache (default ``OUTPUT_DIR/.work``).
    participant_labels : list of str, optional
        Subjects to process (with or without ``sub-``); default all.

    Returns
    -------
    int
        ``EXIT_OK``; ``EXIT_PARTIAL`` when some subjects failed and others finished (each failure is
        in ``OUTPUT_DIR/logs``); ``EXIT_ERROR`` when none could be processed.
    """
    bids_dir, output_dir = check_output_dir(bids_dir, output_dir)
    work_dir = Path(work_dir).resolve() if work_dir else OutputLayout(output_dir).default_work_dir
    participant_labels = list(participant_labels) if participant_labels else None
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no network check for updates
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    from pipeline.core.bids import collect_scans, index_dataset
    from workflows.base import init_neurocurate_wf

    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(output_dir)
    layout = index_dataset(bids_dir, work_dir)
    subject_errors: dict[str, Exception] = {}
    subjects = collect_scans(layout, participant_labels, errors=subject_errors)
    write_dataset_description(output_dir, bids_dir)
    _merge_participants(bids_dir, output_dir)
    write_resolved_config(cfg, output_dir)

    crash_dir = work_dir / "crash"
    crash_dir.mkdir(exist_ok=True)
    nipype_config.set("execution", "crashdump_dir", str(crash_dir))
    nipype_logging.update_logging(nipype_config)
    level = logging.getLogger().level
    nipype_logging.getLogger("nipype.workflow").setLevel(max(level, logging.WARNING))

    _clear_old_crashes(output_dir, [*subjects, *subject_errors])
    for sub, exc in sorted(subject_errors.items()):
        target = OutputLayout(output_dir).crash_log(sub, "bids")
        atomic_write_text(target, f"{exc}\n")
        USER_LOG.error(f"error: sub-{sub}: {exc} (subject skipped; details: {target})")
    if not subjects:
        USER_LOG.error(f"neurocurate prep: no subject could be processed; see {OutputLayout(output_dir).logs_dir}")
        return EXIT_ERROR
    from pipeline.core.parallel import resolve_execution

    run_cfg = replace(cfg, execution=scan_threads(resolve_execution(cfg.execution), cfg.execution.omp_nthreads,
                                                  sum(len(s.anat) + len(s.bold) for s in subjects.values())))
    ensure_login_name()
    wf = init_neurocurate_wf(subjects=subjects, output_dir=output_dir, work_dir=work_dir, cfg=run_cfg)
    wf.config["execution"].update({
        "crashdump_dir": str(crash_dir),
        "crashfile_format": "txt",
        "poll_sleep_duration": cfg.execution.poll_sleep_duration,
        "stop_on_first_crash": cfg.execution.stop_on_first_crash,
        "remove_unnecessary_outputs": False,
    })
    n_scans = sum(len(s.anat) + len(s.bold) for s in subjects.values())
    ex = run_cfg.execution
    plugin_args = nipype_plugin_args(run_cfg)
    where = (f"{ex.nprocs} process(es) x {ex.omp_nthreads} thread(s), {ex.mem_gb:g} GB"
             if ex.plugin in ("MultiProc", "LegacyMultiProc") else f"plugin {ex.plugin}")
    USER_LOG.info(f"neurocurate prep: {len(subjects)} subject(s), {n_scans} scan(s); {where}; work dir {work_dir}")
    started = time.time() - 1.0
    failed = False
    # Subject reports run inside the graph (on the workers) wherever the status callback can tell which
    # finished; the others are written below, in the main process.
    watch = not ex.plugin.endswith("Graph") and "status_callback" not in plugin_args
    report_nodes = add_report_nodes(wf, sorted(subjects), output_dir, cfg, ex.omp_nthreads) if watch else {}
    progress = _ScanProgress(wf, n_scans, report_nodes)
    if watch:
        plugin_args = {**plugin_args, "status_callback": progress}
    # Everything alive now (imports, the graph) lives until the end: keep it out of the full collections that
    # MultiProc runs in this process before every submission while a worker waits (0.05-0.14 s each, ~8 per
    # subject; measured 4.6 s of 4 subjects' prep), and out of the forked workers' copy-on-write pages.
    gc.freeze()
    try:
        wf.run(plugin=ex.plugin, plugin_args=plugin_args)
    except RuntimeError as exc:
        # nipype raises this after the graph ran when any node failed.
        LOG.debug("nipype: %s", exc)
        failed = True
    finally:
        gc.unfreeze()
        progress.bar.close()
    crashes = collect_crashes(crash_dir, started)
    # A report node that crashed outside the report code (a killed worker, say) costs no derivative: the
    # main process draws that report below, and the subject stays finished.
    report_crashes = [rec for rec in crashes if rec.node.rsplit(".", 1)[-1] in _REPORT_NODES]
    crashes = [rec for rec in crashes if rec not in report_crashes]
    for rec in report_crashes:
        LOG.warning("the report node of sub-%s failed (%s); drawing the report in the main process",
                    rec.subject, rec.message)
    if failed and report_crashes and not crashes:
        failed = False
    for rec in crashes:
        path = _publish_crash(output_dir, rec)
        USER_LOG.error(f"error: sub-{rec.subject}: {rec.message} (details: {path})")
    if failed and not crashes:
        USER_LOG.error("error: the workflow failed without a crash file; rerun with -vv for nipype's log")
    bad = {rec.subject for rec in crashes} | set(subject_errors)
    ok = sorted(set(subjects) - bad)
    _subject_reports(output_dir, [s for s in ok + sorted(bad) if s in bad or s not in progress.reported], cfg,
                     ex.omp_nthreads)
    n_all = len(set(subjects) | set(subject_errors))
    USER_LOG.info(f"neurocurate prep: {len(ok)} of {n_all} subject(s) finished; derivatives in {output_dir}")
    if failed or crashes or subject_errors:
        return EXIT_PARTIAL if ok else EXIT_ERROR
    return EXIT_OK


def _subject_reports(output_dir: Path, subjects: list[str], cfg: Config, num_threads: int = 1) -> None:
    """Per-subject HTML reports of the subjects whose report node did not run (failed subjects, *Graph plugins).

    A report failure is logged and never fails the run.
    """
    try:
        from workflows.interfaces.reports import write_report_limited
    except ImportError:
        return
    for sub in subjects:
        write_report_limited(str(output_dir), sub, cfg, num_threads)
