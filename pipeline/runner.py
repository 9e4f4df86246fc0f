"""End-to-end runs: the stage graph, its manifests and incremental reruns.

Stages run in one order, each consuming what the previous ones wrote::

    prep -> qc -> gradients -> shards -> pretrain -> evaluate

Before a stage runs, its inputs (files), the hash of the config sections it
reads and the versions of the software it uses are compared with its
manifest (:mod:`pipeline.core.manifest`). A stage whose inputs, config, versions
and outputs are all as the manifest says is not invoked at all; otherwise the
runner says why it runs. Prep goes further: only subjects whose files
changed (or are new) are handed to nipype, whose per-node cache stays the
source of truth inside a subject. Downstream decisions are taken again after
the upstream stage ran, so a QC threshold change that leaves the curated
series alone does not rebuild the gradients.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.core.bids import check_output_dir
from pipeline.core.config import Config, config_hash, config_to_dict
from pipeline.core.console import USER_LOG
from pipeline.core.errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, InputError, NeurocurateError
from pipeline.core.layout import EVALUATION_REPORT, OutputLayout, RunLayout, ShardsLayout
from pipeline.core.provenance import software_versions
from pipeline.stages.prep import failed_subjects
from pipeline.core.manifest import (
    FileState,
    Manifest,
    diff_inputs,
    file_states,
    read_manifest,
    write_manifest,
)

__all__ = [
    "STAGES",
    "Context",
    "Decision",
    "RunResult",
    "Stage",
    "StageNotApplicable",
    "StageOutcome",
    "StageRunner",
    "default_stages",
    "format_summary",
    "select_stages",
]

LOG = logging.getLogger(__name__)
STAGES = ("prep", "qc", "gradients", "shards", "pretrain", "evaluate")
# BIDS files that describe the dataset but change no image processing.
_LIGHT_BIDS_FILES = {"participants.tsv", "participants.json", "dataset_description.json", "README", "README.md",
                     "README.txt", "CHANGES", "LICENSE", ".bidsignore"}
_SKIP_BIDS_DIRS = {"derivatives", "sourcedata", "code", "stimuli"}
# Files under OUTPUT_DIR/sub-* that QC itself or the reports write.
_REPORT_SUFFIXES = (".html", ".svg", ".png")


class StageNotApplicable(Exception):
    """Raised by a stage's ``inputs`` when the stage does not apply to this dataset (the message says why)."""


@dataclass(frozen=True)
class Context:
    """Where a run reads and writes, and with which config."""

    bids_dir: Path
    output_dir: Path
    work_dir: Path
    cfg: Config

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.output_dir)

    @property
    def shards_dir(self) -> Path:
        """Shards folder: ``[shards].shards_dir`` or ``OUTPUT_DIR/shards``."""
        from pipeline.stages.shards import resolve_shards_dir

        return resolve_shards_dir(self.output_dir, self.cfg)

    @property
    def pretrain_dir(self) -> Path:
        """Pretraining run folder ``OUTPUT_DIR/pretrain``."""
        return self.layout.pretrain_dir

    @property
    def evaluation_dir(self) -> Path:
        """Evaluation report folder ``RUN_DIR/evaluation/<target>_<split>`` of the run's pretraining."""
        run = self.cfg.run
        return RunLayout(self.pretrain_dir).evaluation_dir(run.evaluate_target, run.evaluate_split)


@dataclass(frozen=True)
class Decision:
    """Whether a stage runs, and why.

    ``pending`` means an upstream stage runs first, so the decision is only
    known once it has (the plan says so); ``skip`` names why a stage does not
    apply (e.g. no ROI series for gradients); ``subjects`` are prep's subjects
    to process (None: all of them).
    """

    stage: str
    run: bool
    reasons: tuple[str, ...] = ()
    pending: bool = False
    skip: str = ""
    subjects: tuple[str, ...] | None = None
    inputs: dict[str, FileState] = field(default_factory=dict, repr=False)
    config_hash: str = ""
    versions: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Stage:
    """One node of the stage graph.

    ``inputs(ctx)`` maps manifest keys to files (None: the stage does not apply,
    with the reason from ``skip_reason``); ``outputs(ctx)`` are files that must
    exist for the stage to count as done; ``config(ctx)`` is what its config
    hash covers; ``execute(ctx, decision)`` runs it and returns an exit code
    (0, 3 = partial); ``distributions`` pick the software versions recorded.
    """

    name: str
    inputs: Callable[[Context], dict[str, Path] | None]
    outputs: Callable[[Context], list[Path]]
    config: Callable[[Context], Any]
    execute: Callable[[Context, Decision], int]
    distributions: tuple[str, ...]
    skip_reason: str = ""


@dataclass(frozen=True)
class StageOutcome:
    """What happened to one stage in a run."""

    stage: str
    status: str  # "up to date", "ran", "partial", "skipped", "failed", "not run"
    seconds: float
    message: str = ""


@dataclass(frozen=True)
class RunResult:
    """All stage outcomes of a run, its exit code and the report paths."""

    outcomes: tuple[StageOutcome, ...]
    exit_code: int
    qc_report: Path | None
    evaluation_report: Path | None


# --------------------------------------------------------------------------- stage definitions


def _rel_files(root: Path, files: list[Path]) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in files}


def _walk(root: Path, skip_dirs: set[str] = frozenset()) -> list[Path]:
    """Every file under ``root`` except hidden ones and ``skip_dirs`` at the top."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        top = Path(dirpath) == root
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (top and d in skip_dirs))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return found


def _bids_subject(key: str) -> str | None:
    """Subject label of a BIDS-relative key, None for a dataset-level file."""
    first = key.split("/", 1)[0]
    return first[4:] if first.startswith("sub-") and "/" in key else None


def prep_inputs(ctx: Context) -> dict[str, Path]:
    """Every file of the BIDS dataset (derivatives/, sourcedata/, code/ and hidden files excluded)."""
    return _rel_files(ctx.bids_dir, _walk(ctx.bids_dir, _SKIP_BIDS_DIRS))


def prep_config(ctx: Context) -> dict[str, Any]:
    """Sections that change preprocessing outputs (not execution settings)."""
    c = ctx.cfg
    return {"anat": c.anat, "bold": c.bold, "templates": c.templates, "parcellation": c.parcellation}


def execute_prep(ctx: Context, decision: Decision) -> int:
    """Run the participant level on the decided subjects (all when ``subjects`` is None)."""
    from pipeline.stages.prep import refresh_descriptions, run_prep

    if decision.subjects == ():
        # Only dataset-level descriptions changed: refresh them, process nobody.
        refresh_descriptions(ctx.bids_dir, ctx.output_dir)
        return EXIT_OK
    return run_prep(ctx.bids_dir, ctx.output_dir, ctx.cfg, work_dir=ctx.work_dir, participant_labels=decision.subjects)


def qc_inputs(ctx: Context) -> dict[str, Path]:
    """Preprocessed derivatives, crash logs, ratings and participants.tsv (sites)."""
    layout = ctx.layout
    files: list[Path] = []
    for sub_dir in layout.subject_dirs():
        files.extend(p for p in _walk(sub_dir) if not p.name.endswith(_REPORT_SUFFIXES)
                     and "figures" not in p.relative_to(sub_dir).parts)
    files.extend(layout.crash_logs())
    files.extend(p for p in (layout.ratings, layout.participants) if p.is_file())
    return _rel_files(ctx.output_dir, files)


def execute_qc(ctx: Context, decision: Decision) -> int:
    """Group level: metrics, curation table and reports."""
    from pipeline.stages.qc import run_qc

    return run_qc(ctx.output_dir, ctx.cfg)


def _atlas_name(ctx: Context) -> str:
    from pipeline.stages.gradients import resolve_atlas

    return resolve_atlas(ctx.output_dir, ctx.cfg)


def gradients_inputs(ctx: Context) -> dict[str, Path] | None:
    """The curated ROI series of the atlas; None when there are none (anatomy-only data)."""
    from pipeline.stages.gradients import find_curated_series

    if not ctx.layout.curation_table.is_file():
        return None
    series = find_curated_series(ctx.output_dir, _atlas_name(ctx))
    return _rel_files(ctx.output_dir, series) if series else None


def execute_gradients(ctx: Context, decision: Decision) -> int:
    """Group gradients of the curated series."""
    from pipeline.stages.gradients import run_gradients

    run_gradients(ctx.output_dir, ctx.cfg, atlas=_atlas_name(ctx))
    return EXIT_OK


def shards_inputs(ctx: Context) -> dict[str, Path] | None:
    """Curation table, participants.tsv, gradients and every included derivative."""
    import pandas as pd

    out, layout = ctx.output_dir, ctx.layout
    table_path = layout.curation_table
    if not table_path.is_file():
        return None
    table = pd.read_parquet(table_path, columns=["path", "include"])
    files = [table_path]
    files.extend(p for p in (layout.participants,) if p.is_file())
    files.extend(layout.gradients_files())
    included = [out / str(p) for p in table.loc[table["include"].astype(bool), "path"]]
    if not included:
        return None
    files.extend(p for p in included if p.is_file())
    return _rel_files(out, files)


def execute_shards(ctx: Context, decision: Decision) -> int:
    """Build or extend the shards (they rewrite only what changed)."""
    from pipeline.stages.shards import run_shards

    run_shards(ctx.output_dir, ctx.cfg, shards_dir=ctx.shards_dir)
    return EXIT_OK


_INDEX_KEY = "shards/index"


def _index_input(ctx: Context) -> dict[str, Path] | None:
    index = ShardsLayout(ctx.shards_dir).index
    return {_INDEX_KEY: index} if index.is_file() else None


def pretrain_config(ctx: Context) -> dict[str, Any]:
    """The resolved pretraining config (named or file) and the step override."""
    from pipeline.pretrain.config import load_pretrain_config

    return {"pretrain": config_to_dict(load_pretrain_config(ctx.cfg.run.pretrain_config)),
            "max_steps": ctx.cfg.run.pretrain_max_steps}


def execute_pretrain(ctx: Context, decision: Decision) -> int:
    """Train afresh on the shards' train split (a changed config or data means a new model)."""
    from pipeline.stages.pretrain import run_pretrain

    run_pretrain(ctx.shards_dir, ctx.pretrain_dir, config=ctx.cfg.run.pretrain_config, split="train",
                 max_steps=ctx.cfg.run.pretrain_max_steps or None, fresh=True, progress=True)
    return EXIT_OK


def evaluate_inputs(ctx: Context) -> dict[str, Path] | None:
    """The newest checkpoint and the shard index; None without a target or a trained model."""
    target = ctx.cfg.run.evaluate_target
    if not target:
        return None
    index = _index_input(ctx)
    if index is not None:
        import pyarrow.parquet as pq

        if target not in pq.read_schema(index[_INDEX_KEY]).names:
            raise StageNotApplicable(f"no {target!r} column in participants.tsv (shard index); "
                                     "set [run].evaluate_target or --target")
    # Globbing (RunLayout) spares the plan a torch import.
    steps = RunLayout(ctx.pretrain_dir).checkpoints()
    ckpt = steps[-1] if steps else None
    if index is None or ckpt is None:
        return None
    return {**index, "pretrain/checkpoint": ckpt}


def execute_evaluate(ctx: Context, decision: Decision) -> int:
    """Frozen-embedding probes of the pretrained model against the baselines."""
    from pipeline.stages.evaluate import run_evaluate

    run = ctx.cfg.run
    run_evaluate(ctx.pretrain_dir, ctx.shards_dir, run.evaluate_target, ctx.cfg, split=run.evaluate_split,
                 out_dir=ctx.evaluation_dir)
    return EXIT_OK


def default_stages() -> tuple[Stage, ...]:
    """The six stages with their real implementations."""
    base = ("neurocurate", "numpy", "nibabel")
    return (
        Stage("prep", prep_inputs, lambda c: [c.layout.dataset_description], prep_config,
              execute_prep, (*base, "nipype", "antspyx", "deepbet", "scipy", "nilearn")),
        Stage("qc", qc_inputs,
              lambda c: [c.layout.curation_table, c.layout.group_report],
              lambda c: {"qc": c.cfg.qc, "templates": c.cfg.templates}, execute_qc, (*base, "scipy", "pandas")),
        Stage("gradients", gradients_inputs,
              lambda c: [c.layout.gradients_tsv(_atlas_name(c))],
              lambda c: {"gradients": c.cfg.gradients, "parcellation": c.cfg.parcellation}, execute_gradients,
              (*base, "scipy"), skip_reason="no curated ROI series (anatomy only, or every run excluded)"),
        Stage("shards", shards_inputs, lambda c: [ShardsLayout(c.shards_dir).index], lambda c: {"shards": c.cfg.shards},
              execute_shards, (*base, "pandas", "zarr"), skip_reason="no curated scan is included"),
        Stage("pretrain", _index_input, lambda c: [RunLayout(c.pretrain_dir).metrics], pretrain_config,
              execute_pretrain, ("neurocurate", "torch"), skip_reason="no shards to train on"),
        Stage("evaluate", evaluate_inputs, lambda c: [c.evaluation_dir / EVALUATION_REPORT],
              lambda c: {"evaluate": c.cfg.evaluate, "target": c.cfg.run.evaluate_target,
                         "split": c.cfg.run.evaluate_split},
              execute_evaluate, ("neurocurate", "torch", "scikit-learn"),
              skip_reason="no evaluation target ([run].evaluate_target) or no pretrained model"),
    )


# --------------------------------------------------------------------------- decisions


def select_stages(until: str | None = None, only: str | None = None) -> tuple[str, ...]:
    """Stage names a run covers: all, up to ``until`` (inclusive), or ``only`` one."""
    for name in (until, only):
        if name is not None and name not in STAGES:
            raise NeurocurateError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if until and only:
        raise NeurocurateError("--until and --only exclude each other")
    if only:
        return (only,)
    if until:
        return STAGES[: STAGES.index(until) + 1]
    return STAGES


def _describe(keys: tuple[str, ...], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class StageRunner:
    """Plan and run the stages of one dataset.

    Parameters
    ----------
    bids_dir, output_dir : path-like
        Raw BIDS dataset and derivatives root.
    cfg : Config
        Resolved configuration.
    work_dir : path-like, optional
        nipype work folder (default ``OUTPUT_DIR/.work``).
    stages : tuple of Stage, optional
        The stage graph (default :func:`default_stages`); tests pass cheap ones.
    force : bool
        Run every selected stage whatever the manifests say.
    retry_failed : bool
        Hand subjects whose preprocessing failed last time to prep again even
        when their files did not change.
    """

    def __init__(self, bids_dir: str | Path, output_dir: str | Path, cfg: Config, *, work_dir: str | Path | None = None,
                 stages: tuple[Stage, ...] | None = None, force: bool = False, retry_failed: bool = False):
        bids_dir, output_dir = check_output_dir(bids_dir, output_dir)
        work = Path(work_dir).resolve() if work_dir else OutputLayout(output_dir).default_work_dir
        self.ctx = Context(bids_dir, output_dir, work, cfg)
        self.stages = {s.name: s for s in (stages or default_stages())}
        self.force = force
        self.retry_failed = retry_failed
        self._chunk = max(1, cfg.run.hash_chunk_mb) << 20

    # -- decisions

    def decide(self, name: str) -> Decision:
        """Decide now, from the files on disk, whether stage ``name`` has to run."""
        stage = self.stages[name]
        ctx = self.ctx
        try:
            files = stage.inputs(ctx)
        except StageNotApplicable as exc:
            return Decision(name, False, skip=str(exc))
        if files is None:
            return Decision(name, False, skip=stage.skip_reason or "not applicable")
        manifest = read_manifest(ctx.output_dir, name)
        states = file_states(files, manifest.inputs if manifest else None, self._chunk)
        chash = config_hash(stage.config(ctx))
        versions = {k: v for k, v in software_versions().items() if k in stage.distributions}
        common = {"inputs": states, "config_hash": chash, "versions": versions}
        if name == "prep":
            return self._decide_prep(manifest, states, common)
        reasons = self._general_reasons(manifest, chash, versions)
        if manifest is not None:
            diff = diff_inputs(states, manifest.inputs)
            for label, keys in (("new input", diff.added), ("removed input", diff.removed),
                                ("changed input", diff.changed)):
                if keys:
                    reasons.append(f"{len(keys)} {label}(s): {_describe(keys)}")
        missing = [str(p) for p in stage.outputs(ctx) if not p.exists()]
        if missing and manifest is not None:
            reasons.append(f"output missing: {_describe(tuple(missing))}")
        return Decision(name, bool(reasons), tuple(reasons), **common)

    def _general_reasons(self, manifest: Manifest | None, chash: str, versions: dict[str, str]) -> list[str]:
        if self.force:
            return ["--force"]
        if manifest is None:
            return ["no manifest (first run)"]
        reasons = []
        if manifest.config_hash != chash:
            reasons.append("its config changed")
        changed = sorted(k for k in set(versions) | set(manifest.versions) if versions.get(k) != manifest.versions.get(k))
        if changed:
            reasons.append("software versions changed: " + ", ".join(
                f"{k} {manifest.versions.get(k, '-')} -> {versions.get(k, '-')}" for k in changed))
        return reasons

    def _decide_prep(self, manifest: Manifest | None, states: dict[str, FileState], common: dict) -> Decision:
        """All subjects on a first run or a config/version change; otherwise only the subjects whose files changed."""
        reasons = self._general_reasons(manifest, common["config_hash"], common["versions"])
        current = {s for k in states if (s := _bids_subject(k))}
        if not current:
            raise InputError(self.ctx.bids_dir, "no sub-* folders: nothing to preprocess")
        if reasons:
            return Decision("prep", True, tuple(reasons), subjects=None, **common)
        diff = diff_inputs(states, manifest.inputs)
        touched = diff.keys()
        subjects = {s for k in touched if (s := _bids_subject(k)) and s in current}
        out_reasons = []
        new = sorted(s for s in subjects if not any(_bids_subject(k) == s for k in manifest.inputs))
        if new:
            out_reasons.append(f"new subject(s): {', '.join('sub-' + s for s in new)}")
        changed = sorted(subjects - set(new))
        if changed:
            keys = tuple(sorted(k for k in touched if _bids_subject(k) in changed))
            out_reasons.append(f"changed files of {', '.join('sub-' + s for s in changed)}: {_describe(keys)}")
        global_keys = tuple(sorted(k for k in touched if _bids_subject(k) is None and k not in _LIGHT_BIDS_FILES))
        if global_keys:
            subjects = current
            out_reasons.append(f"dataset-level file(s) changed: {_describe(global_keys)}")
        failed = set(manifest.extra.get("failed", [])) & current
        if self.retry_failed and failed - subjects:
            out_reasons.append(f"--retry-failed: {', '.join('sub-' + s for s in sorted(failed - subjects))}")
            subjects |= failed
        missing = sorted(s for s in current - subjects - failed if not (self.ctx.output_dir / f"sub-{s}").is_dir())
        if missing:
            out_reasons.append(f"derivatives missing for {', '.join('sub-' + s for s in missing)}")
            subjects |= set(missing)
        removed = sorted({s for k in diff.removed if (s := _bids_subject(k)) and s not in current})
        light = tuple(sorted(k for k in touched if k in _LIGHT_BIDS_FILES))
        if not subjects and (light or removed):
            why = [f"dataset description changed: {_describe(light)}"] if light else []
            if removed:
                why.append(f"subject(s) gone from the dataset: {', '.join('sub-' + s for s in removed)} (derivatives kept)")
            return Decision("prep", True, tuple(why), subjects=(), **common)
        if not subjects:
            return Decision("prep", False, (), subjects=(), **common)
        return Decision("prep", True, tuple(out_reasons), subjects=tuple(sorted(subjects)), **common)

    def plan(self, selected: tuple[str, ...] | None = None) -> list[Decision]:
        """Decisions for ``selected`` stages without running anything.

        A stage downstream of one that will run cannot be judged before its
        inputs exist, so it is reported as pending.
        """
        decisions = []
        upstream_runs: list[str] = []
        for name in self._selected(selected):
            if upstream_runs:
                decisions.append(Decision(name, True, (f"decided after {upstream_runs[0]} runs, from the files "
                                                       "it writes",), pending=True))
                upstream_runs.append(name)
                continue
            decision = self.decide(name)
            decisions.append(decision)
            if decision.run:
                upstream_runs.append(name)
        return decisions

    @staticmethod
    def format_plan(decisions: list[Decision]) -> str:
        """Human-readable plan, one stage per line (``--dry-run``)."""
        lines = []
        for d in decisions:
            if d.skip:
                lines.append(f"{d.stage:10s} skip: {d.skip}")
            elif not d.run:
                lines.append(f"{d.stage:10s} up to date")
            elif d.pending:
                lines.append(f"{d.stage:10s} may run: {d.reasons[0]}")
            else:
                who = ""
                if d.stage == "prep":
                    who = " (all subjects)" if d.subjects is None else (
                        f" ({', '.join('sub-' + s for s in d.subjects)})" if d.subjects else " (no subject: descriptions only)")
                lines.append(f"{d.stage:10s} will run{who}: {'; '.join(d.reasons)}")
        return "\n".join(lines)

    # -- running

    def _record(self, decision: Decision, exit_code: int) -> None:
        """Write the manifest of a stage that finished (fully or partially)."""
        inputs = dict(decision.inputs)
        extra: dict[str, Any] = {}
        if decision.stage == "prep":
            old = read_manifest(self.ctx.output_dir, "prep")
            processed = sorted({s for k in inputs if (s := _bids_subject(k))}) if decision.subjects is None else list(decision.subjects)
            failed_now = failed_subjects(self.ctx.output_dir, processed) if exit_code else []
            earlier = set(old.extra.get("failed", [])) if old else set()
            extra["failed"] = sorted((earlier - set(processed)) | set(failed_now))
        write_manifest(self.ctx.output_dir, Manifest(decision.stage, decision.config_hash, decision.versions, inputs, extra))

    def _refresh_stat_cache(self, decision: Decision) -> None:
        """Store new mtimes of touched but identical inputs, so the next check is a stat again."""
        old = read_manifest(self.ctx.output_dir, decision.stage)
        if old is not None and old.inputs != decision.inputs:
            write_manifest(self.ctx.output_dir, replace(old, inputs=dict(decision.inputs)))

    def _selected(self, selected: tuple[str, ...] | None) -> tuple[str, ...]:
        if selected is None:
            return tuple(self.stages)
        unknown = [n for n in selected if n not in self.stages]
        if unknown:
            raise NeurocurateError(f"unknown stage(s) {unknown}; stages: {', '.join(self.stages)}")
        return tuple(selected)

    def run(self, selected: tuple[str, ...] | None = None, *, stop_on_first_crash: bool = False) -> RunResult:
        """Run the selected stages in order, each only when its decision says so.

        Returns
        -------
        RunResult
            Exit code 0, 3 when some subject or scan failed (the others
            finished), 2 when a stage failed as a whole (later stages not run).
        """
        outcomes: list[StageOutcome] = []
        exit_code = EXIT_OK
        selected = self._selected(selected)
        self.ctx.output_dir.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(selected):
            t0 = time.perf_counter()
            decision = self.decide(name)
            if decision.skip or not decision.run:
                status = "skipped" if decision.skip else "up to date"
                if not decision.skip:
                    self._refresh_stat_cache(decision)
                outcomes.append(StageOutcome(name, status, time.perf_counter() - t0, decision.skip))
                USER_LOG.info(f"[{name}] {status}{': ' + decision.skip if decision.skip else ''}")
                prep_manifest = read_manifest(self.ctx.output_dir, "prep") if name == "prep" else None
                if prep_manifest is not None and prep_manifest.extra.get("failed"):
                    # Subjects that failed before still have no derivatives: the dataset stays partial.
                    exit_code = EXIT_PARTIAL
                    USER_LOG.info(f"[prep] still failed (inputs unchanged; --retry-failed to retry): "
                          f"{', '.join('sub-' + s for s in prep_manifest.extra['failed'])}")
                continue
            USER_LOG.info(f"[{name}] running: {'; '.join(decision.reasons)}")
            try:
                code = int(self.stages[name].execute(self.ctx, decision) or 0)
            except (NeurocurateError, ValueError) as exc:
                outcomes.append(StageOutcome(name, "failed", time.perf_counter() - t0, str(exc)))
                USER_LOG.info(f"[{name}] failed: {exc}")
                outcomes.extend(StageOutcome(n, "not run", 0.0, f"{name} failed") for n in selected[i + 1:])
                return RunResult(tuple(outcomes), EXIT_ERROR, *self._reports())
            seconds = time.perf_counter() - t0
            if code not in (EXIT_OK, EXIT_PARTIAL):
                outcomes.append(StageOutcome(name, "failed", seconds, f"exit code {code}"))
                USER_LOG.info(f"[{name}] failed (exit code {code})")
                outcomes.extend(StageOutcome(n, "not run", 0.0, f"{name} failed") for n in selected[i + 1:])
                return RunResult(tuple(outcomes), EXIT_ERROR, *self._reports())
            self._record(decision, code)
            status = "ran" if code == EXIT_OK else "partial"
            outcomes.append(StageOutcome(name, status, seconds))
            USER_LOG.info(f"[{name}] {'done' if code == EXIT_OK else 'partial: some subjects or scans failed'} "
                          f"in {seconds:.1f} s")
            if code == EXIT_PARTIAL:
                exit_code = EXIT_PARTIAL
                if stop_on_first_crash:
                    outcomes.extend(StageOutcome(n, "not run", 0.0, "--stop-on-first-crash") for n in selected[i + 1:])
                    break
        return RunResult(tuple(outcomes), exit_code, *self._reports())

    def _reports(self) -> tuple[Path | None, Path | None]:
        qc = self.ctx.layout.group_report
        ev = self.ctx.evaluation_dir / EVALUATION_REPORT
        return (qc if qc.is_file() else None, ev if ev.is_file() else None)


def format_summary(result: RunResult) -> str:
    """Per-stage status and timing, the exit meaning and the report paths."""
    lines = ["", "stage      status       time"]
    for o in result.outcomes:
        lines.append(f"{o.stage:10s} {o.status:12s} {o.seconds:6.1f} s{('  ' + o.message) if o.message else ''}")
    meaning = {EXIT_OK: "complete", EXIT_PARTIAL: "partial (some subjects or scans failed; see OUTPUT_DIR/logs)",
               EXIT_ERROR: "failed"}[result.exit_code]
    lines.append(f"result: {meaning} (exit code {result.exit_code})")
    lines.append(f"QC report:         {result.qc_report or '(not written)'}")
    lines.append(f"evaluation report: {result.evaluation_report or '(not written)'}")
    return "\n".join(lines)


def with_stage(stages: tuple[Stage, ...], name: str, **changes: Any) -> tuple[Stage, ...]:
    """``stages`` with stage ``name``'s fields replaced (e.g. a cheap ``execute`` in tests)."""
    return tuple(replace(s, **changes) if s.name == name else s for s in stages)
