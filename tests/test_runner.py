"""Stage graph, manifests and incremental reruns, with cheap stand-in stages.

The stand-ins keep the real input discovery (BIDS walk, derivatives, curation
table, shard index) and replace only the work each stage does, logging every
call, so the tests check exactly which stages and subjects are recomputed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.core.config import Config, from_dict
from pipeline.core.errors import InputError, NeurocurateError
from pipeline.core.manifest import file_states, manifest_path, read_manifest
from pipeline.runner import StageRunner, default_stages, format_summary, select_stages, with_stage


def _bids(root: Path, subjects: dict[str, int]) -> Path:
    """A BIDS tree whose 'T1w' files hold one number: the QC metric the fake QC reads."""
    bids = root / "bids"
    bids.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    (bids / "participants.tsv").write_text("participant_id\tdiagnosis\n" + "".join(f"sub-{s}\tA\n" for s in subjects))
    for sub, value in subjects.items():
        _write_subject(bids, sub, value)
    return bids


def _write_subject(bids: Path, sub: str, value: int) -> None:
    path = bids / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(value))


class Calls:
    """Log of the stand-in stages' work."""

    def __init__(self):
        self.log: list[tuple[str, tuple[str, ...] | None]] = []

    def stages(self) -> list[str]:
        return [name for name, _ in self.log]


def _fake_stages(calls: Calls, fail_subjects: set[str] = frozenset()):
    def prep(ctx, decision):
        subjects = decision.subjects if decision.subjects is not None else tuple(
            sorted(p.name[4:] for p in ctx.bids_dir.glob("sub-*")))
        calls.log.append(("prep", decision.subjects))
        (ctx.output_dir / "dataset_description.json").write_text("{}")
        code = 0
        for sub in subjects:
            if sub in fail_subjects:
                log = ctx.output_dir / "logs" / f"sub-{sub}_anat_crash.txt"
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text("InputError: broken")
                code = 3
                continue
            src = ctx.bids_dir / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"
            dst = ctx.output_dir / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-preproc_T1w.nii.gz"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(src.read_text())
        return code

    def qc(ctx, decision):
        calls.log.append(("qc", None))
        rows = []
        for p in sorted(ctx.output_dir.glob("sub-*/anat/*_desc-preproc_T1w.nii.gz")):
            value = float(p.read_text())
            rows.append({"subject": p.name[4:6], "path": p.relative_to(ctx.output_dir).as_posix(),
                         # a stand-in rule on the fake scans: value >= 1.6 x [qc].reference_z_limit (16 by default)
                         "include": value >= 1.6 * ctx.cfg.qc.reference_z_limit})
        (ctx.output_dir / "curation").mkdir(exist_ok=True)
        pd.DataFrame(rows).to_parquet(ctx.output_dir / "curation" / "curation.parquet")
        (ctx.output_dir / "reports").mkdir(exist_ok=True)
        (ctx.output_dir / "reports" / "group.html").write_text("<html></html>")
        return 0

    def shards(ctx, decision):
        calls.log.append(("shards", None))
        table = pd.read_parquet(ctx.output_dir / "curation" / "curation.parquet")
        ctx.shards_dir.mkdir(exist_ok=True)
        table[table["include"]].to_parquet(ctx.shards_dir / "index.parquet")
        return 0

    def pretrain(ctx, decision):
        calls.log.append(("pretrain", None))
        ctx.pretrain_dir.mkdir(exist_ok=True)
        (ctx.pretrain_dir / "metrics.jsonl").write_text(json.dumps({"steps": ctx.cfg.run.pretrain_max_steps}))
        return 0

    stages = default_stages()
    stages = with_stage(stages, "prep", execute=prep)
    stages = with_stage(stages, "qc", execute=qc)
    # No ROI series in this data: the real gradients stage would say so; the stand-in skips too.
    stages = with_stage(stages, "gradients", inputs=lambda ctx: None)
    stages = with_stage(stages, "shards", execute=shards)
    stages = with_stage(stages, "pretrain", execute=pretrain)
    stages = with_stage(stages, "evaluate", inputs=lambda ctx: None)
    return stages


def _cfg(**sections) -> Config:
    return from_dict(Config, {"run": {"pretrain_max_steps": 5}, **sections})


@pytest.fixture
def dataset(tmp_path):
    bids = _bids(tmp_path, {"01": 30, "02": 30, "03": 30})
    return bids, tmp_path / "out"


def _runner(bids, out, calls, cfg=None, **kw):
    return StageRunner(bids, out, cfg or _cfg(), stages=_fake_stages(calls, kw.pop("fail", set())), **kw)


def test_first_run_runs_everything_then_noop_rerun_does_no_work(dataset, capsys):
    from pipeline.core.console import attach_console

    attach_console()  # what the CLI does: the runner's messages on stdout
    bids, out = dataset
    calls = Calls()
    result = _runner(bids, out, calls).run()
    assert result.exit_code == 0
    assert calls.stages() == ["prep", "qc", "shards", "pretrain"]
    assert calls.log[0] == ("prep", None)  # first run: every subject
    assert {o.stage: o.status for o in result.outcomes}["gradients"] == "skipped"
    for stage in ("prep", "qc", "shards", "pretrain"):
        m = read_manifest(out, stage)
        assert m is not None and m.config_hash and "neurocurate" in m.versions
    assert set(read_manifest(out, "prep").inputs) >= {"sub-01/anat/sub-01_T1w.nii.gz", "participants.tsv"}

    calls2 = Calls()
    t0 = time.perf_counter()
    again = _runner(bids, out, calls2).run()
    assert time.perf_counter() - t0 < 5
    assert calls2.log == []
    assert [o.status for o in again.outcomes] == ["up to date", "up to date", "skipped", "up to date", "up to date", "skipped"]
    assert "[prep] up to date" in capsys.readouterr().out
    assert again.qc_report == out / "reports" / "group.html"


def test_touched_but_identical_input_is_not_rerun(dataset):
    bids, out = dataset
    _runner(bids, out, Calls()).run()
    f = bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    calls = Calls()
    _runner(bids, out, calls).run()
    assert calls.log == []
    # The manifest now holds the new mtime, so the next check is a stat only.
    assert read_manifest(out, "prep").inputs["sub-02/anat/sub-02_T1w.nii.gz"].mtime_ns == st.st_mtime_ns + 5_000_000_000


def test_new_subject_processes_only_that_subject(dataset):
    bids, out = dataset
    _runner(bids, out, Calls()).run()
    _write_subject(bids, "04", 30)
    calls = Calls()
    plan = _runner(bids, out, calls).plan()
    assert plan[0].subjects == ("04",) and "new subject(s): sub-04" in plan[0].reasons[0]
    assert plan[1].pending
    _runner(bids, out, calls).run()
    assert calls.log[0] == ("prep", ("04",))
    assert calls.stages() == ["prep", "qc", "shards", "pretrain"]


def test_changed_file_reruns_only_its_subject(dataset):
    bids, out = dataset
    _runner(bids, out, Calls()).run()
    _write_subject(bids, "02", 31)
    calls = Calls()
    _runner(bids, out, calls).run()
    assert calls.log[0] == ("prep", ("02",))


def test_changed_qc_threshold_recurates_without_prep(dataset):
    bids, out = dataset
    _write_subject(bids, "03", 10)
    _runner(bids, out, Calls()).run()
    assert len(pd.read_parquet(out / "shards" / "index.parquet")) == 2  # sub-03 below the stand-in limit 16
    calls = Calls()
    cfg = _cfg(qc={"reference_z_limit": 5.0})
    plan = _runner(bids, out, calls, cfg).plan()
    assert not plan[0].run and plan[1].run and plan[1].reasons == ("its config changed",)
    _runner(bids, out, calls, cfg).run()
    assert calls.stages() == ["qc", "shards", "pretrain"]
    assert len(pd.read_parquet(out / "shards" / "index.parquet")) == 3


def test_qc_change_that_keeps_the_curation_stops_early(dataset):
    bids, out = dataset
    _runner(bids, out, Calls()).run()
    calls = Calls()
    _runner(bids, out, calls, _cfg(qc={"reference_z_limit": 17.0 / 1.6})).run()
    # The fake QC rewrites the table with the same rows; parquet bytes are deterministic.
    assert calls.stages() == ["qc"]


def test_pretrain_config_change_retrains_only(dataset):
    bids, out = dataset
    _runner(bids, out, Calls()).run()
    calls = Calls()
    cfg = _cfg(run={"pretrain_max_steps": 7})
    _runner(bids, out, calls, cfg).run()
    assert calls.stages() == ["pretrain"]
    assert json.loads((out / "pretrain" / "metrics.jsonl").read_text())["steps"] == 7


def test_missing_output_reruns_the_stage(dataset):
    bids, out = dataset
    _runner(bids, out, Calls()).run()
    (out / "reports" / "group.html").unlink()
    calls = Calls()
    plan = _runner(bids, out, calls).plan()
    assert plan[1].run and plan[1].reasons[0].startswith("output missing")
    _runner(bids, out, calls).run()
    assert calls.stages() == ["qc"]


def test_participants_change_refreshes_labels_without_processing(dataset):
    bids, out = dataset
    _runner(bids, out, Calls()).run()
    (bids / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-01\tB\nsub-02\tA\nsub-03\tA\n")
    plan = _runner(bids, out, Calls()).plan()
    assert plan[0].run and plan[0].subjects == ()


def test_failed_subject_gives_partial_exit_and_is_not_retried_unless_asked(dataset):
    bids, out = dataset
    calls = Calls()
    result = _runner(bids, out, calls, fail={"03"}).run()
    assert result.exit_code == 3
    assert {o.stage: o.status for o in result.outcomes}["prep"] == "partial"
    assert calls.stages() == ["prep", "qc", "shards", "pretrain"]  # the others finish
    assert read_manifest(out, "prep").extra["failed"] == ["03"]
    assert "partial" in format_summary(result)

    calls2 = Calls()
    again = _runner(bids, out, calls2, fail={"03"}).run()
    assert calls2.log == [] and again.exit_code == 3

    calls3 = Calls()
    retried = _runner(bids, out, calls3, retry_failed=True).run()
    assert calls3.log[0] == ("prep", ("03",)) and retried.exit_code == 0
    assert read_manifest(out, "prep").extra["failed"] == []


def test_stop_on_first_crash_stops_after_partial_stage(dataset):
    bids, out = dataset
    calls = Calls()
    result = _runner(bids, out, calls, fail={"02"}).run(stop_on_first_crash=True)
    assert calls.stages() == ["prep"] and result.exit_code == 3
    assert [o.status for o in result.outcomes[1:]] == ["not run"] * 5


def test_failing_stage_stops_downstream_with_exit_2(dataset):
    bids, out = dataset
    calls = Calls()

    def broken(ctx, decision):
        raise InputError(ctx.output_dir / "curation", "cannot curate")

    stages = with_stage(_fake_stages(calls), "qc", execute=broken)
    result = StageRunner(bids, out, _cfg(), stages=stages).run()
    assert result.exit_code == 2
    assert [o.status for o in result.outcomes] == ["ran", "failed", "not run", "not run", "not run", "not run"]
    assert read_manifest(out, "qc") is None  # a failed stage is retried next time


def test_until_and_only_select_stages(dataset):
    assert select_stages(until="qc") == ("prep", "qc")
    assert select_stages(only="shards") == ("shards",)
    with pytest.raises(NeurocurateError, match="unknown stage 'bogus'"):
        select_stages(until="bogus")
    bids, out = dataset
    calls = Calls()
    _runner(bids, out, calls).run(select_stages(until="qc"))
    assert calls.stages() == ["prep", "qc"]
    _runner(bids, out, calls).run(select_stages(only="pretrain"))
    assert calls.stages() == ["prep", "qc"]  # no shards yet: pretrain has nothing to train on


def test_dry_run_prints_plan_and_runs_nothing(dataset, capsys):
    bids, out = dataset
    assert main(["run", str(bids), str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "prep       will run (all subjects): no manifest (first run)" in text
    assert "qc         may run: decided after prep runs" in text
    assert "shards     may run: decided after prep runs" in text
    assert not (out / ".manifests").exists()


def test_bids_without_subjects_is_an_input_error(tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text("{}")
    with pytest.raises(InputError, match="no sub-\\* folders"):
        StageRunner(bids, tmp_path / "out", Config()).plan()


def test_output_must_differ_from_bids(tmp_path):
    with pytest.raises(NeurocurateError, match="must differ"):
        StageRunner(tmp_path, tmp_path, Config())


def test_unreadable_manifest_means_rerun(dataset):
    bids, out = dataset
    _runner(bids, out, Calls()).run()
    manifest_path(out, "shards").write_text("{not json")
    calls = Calls()
    _runner(bids, out, calls).run()
    # The rebuilt index has the same bytes, so pretraining is not redone.
    assert calls.stages() == ["shards"]


def test_file_states_rehash_only_moved_files(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    first = file_states({"a": f})
    fake = {"a": dataclasses.replace(first["a"], sha256="cached")}
    assert file_states({"a": f}, fake)["a"].sha256 == "cached"  # size+mtime equal: no read
    f.write_text("two!")
    assert file_states({"a": f}, fake)["a"].sha256 != "cached"


def test_evaluate_skips_with_reason_when_target_column_is_missing(dataset):
    bids, out = dataset
    calls = Calls()
    stages = with_stage(_fake_stages(calls), "evaluate", inputs=default_stages()[5].inputs)
    runner = StageRunner(bids, out, _cfg(run={"evaluate_target": "age", "pretrain_max_steps": 5}), stages=stages)
    (out / "pretrain" / "checkpoints").mkdir(parents=True)
    (out / "pretrain" / "checkpoints" / "step-00000005.pt").write_bytes(b"x")
    result = runner.run()
    evaluate = result.outcomes[-1]
    assert evaluate.status == "skipped" and "no 'age' column" in evaluate.message
    assert result.exit_code == 0
