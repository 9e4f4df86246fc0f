"""Subject reports of ``prep`` run as nodes of the graph, on the workers (issue 17: 1 -> 2 workers).

The reports used to be drawn one subject after another in the main process once the whole graph had run;
the per-scan work they hold (QC metrics, the classifier, figures) was serial time next to the workers. The
end-to-end check (reports written by the nodes, the failed subject's by the main process) is in
``tests/test_prep_integration.py``; these are the fast checks of the wiring.
"""

from __future__ import annotations

import logging
import shutil

import networkx as nx
import pytest

from pipeline.core.config import load_config


@pytest.fixture(scope="module")
def graph(tmp_path_factory, shared_data):
    """The participant graph of two subjects (one T1w; one T1w + BOLD) with the report nodes added."""
    from pipeline.core.bids import collect_scans, index_dataset
    from pipeline.stages.prep import add_report_nodes
    from workflows.base import init_neurocurate_wf

    root = tmp_path_factory.mktemp("prep_reports")
    bids = root / "bids"
    files = {
        "sub-01/anat/sub-01_T1w.nii.gz": shared_data / "anat" / "colin27_T1w.nii.gz",
        "sub-02/anat/sub-02_T1w.nii.gz": shared_data / "anat" / "niivue_T1w_neck.nii.gz",
        "sub-02/func/sub-02_task-oneback_run-1_bold.nii.gz": shared_data / "func" / "sub-02_task-oneback_run-1_bold.nii.gz",
        "sub-02/func/sub-02_task-oneback_run-1_bold.json": shared_data / "func" / "sub-02_task-oneback_run-1_bold.json",
    }
    for rel, src in files.items():
        (bids / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, bids / rel)
    (bids / "dataset_description.json").write_text('{"Name": "reports", "BIDSVersion": "1.9.0"}')
    cfg = load_config(None, {"anat": {"skull_strip": "template"},
                             "templates": {"template_dir": str(shared_data / "templates")}})
    subjects = collect_scans(index_dataset(bids, root / "work"), None)
    wf = init_neurocurate_wf(subjects=subjects, output_dir=root / "out", work_dir=root / "work", cfg=cfg)
    added = add_report_nodes(wf, sorted(subjects), root / "out", cfg, num_threads=2)
    return {"wf": wf, "added": added, "cfg": cfg, "flat": wf._create_flat_graph()}


def test_every_subject_gets_one_report_node_after_all_its_sinks(graph):
    from pipeline.stages.prep import REPORT_NODE
    from workflows.interfaces.reports import WriteSubjectReport

    assert graph["added"] == {"sub_01_wf": "01", "sub_02_wf": "02"}
    flat = graph["flat"]
    reports = {n.fullname.split(".")[-2]: n for n in flat.nodes() if n.name == REPORT_NODE}
    assert set(reports) == {"sub_01_wf", "sub_02_wf"}
    for sub_wf, node in reports.items():
        assert isinstance(node.interface, WriteSubjectReport)
        assert node.interface.inputs.subject == graph["added"][sub_wf]
        assert node.n_procs == 2 and node.interface.inputs.num_threads == 2
        assert node.overwrite  # always runs: ratings, the curation table and crash logs are no node inputs
        assert not node.run_without_submitting  # on a worker, not in the main process
        sinks = {n.fullname for n in flat.nodes() if n.name.startswith("ds_") and f".{sub_wf}." in n.fullname}
        before = {n.fullname for n in nx.ancestors(flat, node)}
        assert sinks and sinks <= before, (sinks, before)
        # Only its own subject: a report never waits for another subject's scans.
        assert all(f".{sub_wf}." in name for name in before)
    sinks_02 = {n.fullname.rsplit(".", 1)[-1] for n in flat.nodes() if ".sub_02_wf." in n.fullname and
                n.name.startswith("ds_")}
    assert sinks_02 == {"ds_anat_res2", "ds_bold"}


def test_report_node_config_is_the_run_config(graph):
    from pipeline.core.config import Config, from_dict

    node = next(n for n in graph["flat"].nodes() if n.name == "subject_report")
    assert from_dict(Config, dict(node.interface.inputs.config)) == graph["cfg"]


def test_status_callback_records_finished_reports(graph):
    from pipeline.stages.prep import _ScanProgress

    progress = _ScanProgress(graph["wf"], n_scans=3, report_nodes=graph["added"])
    assert progress.bar.total == 3  # the report nodes are no scans
    report_01, report_02 = sorted((n for n in graph["flat"].nodes() if n.name == "subject_report"),
                                  key=lambda n: n.fullname)
    progress(report_01, "start")
    progress(report_02, "exception")
    assert progress.reported == set()
    progress(report_01, "end")
    assert progress.reported == {"01"}
    assert progress.bar.done == 0
    progress.bar.close()


def test_report_runs_with_the_node_thread_limit_and_never_raises(monkeypatch, caplog, tmp_path):
    from threadpoolctl import threadpool_info

    import qc.group
    from workflows.interfaces.reports import write_report_limited

    seen = {}

    def fake_report(output_dir, subject, cfg):
        seen["openmp"] = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "openmp"]
        raise RuntimeError("disk full")

    monkeypatch.setattr(qc.group, "write_subject_report", fake_report)
    caplog.set_level(logging.WARNING)
    assert write_report_limited(str(tmp_path), "07", load_config(None), num_threads=1) == ""
    # scikit-learn's OpenMP runtime is loaded before the limit, so the limit reaches it.
    assert seen["openmp"] and set(seen["openmp"]) == {1}
    assert "could not write the report of sub-07: disk full" in caplog.text
