"""The house rules of issue 11, checked on the source tree (fast, no imports of the checked modules)."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _architecture():
    spec = importlib.util.spec_from_file_location("nc_architecture", REPO / "benchmarks" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles_between_files_or_layers():
    info = _architecture().analyse(REPO)
    assert info["file_cycles"] == []
    assert info["layer_cycles"] == []


def test_core_imports_no_stage_workflow_or_qc():
    arch = _architecture()
    mods = arch.collect(REPO)
    for mod, path in mods.items():
        if mod.startswith("pipeline.core"):
            deps = arch.imports_of(mod, path, mods)
            bad = [d for d in deps if not (d.startswith("pipeline.core") or d == "pipeline")]
            assert not bad, f"{mod} imports {bad}"


def test_no_print_or_argparse_outside_the_command_line():
    offenders = []
    for pkg in ("pipeline", "workflows", "qc"):
        for path in (REPO / pkg).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if rel == "pipeline/cli.py" or rel.startswith("pipeline/commands/"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                    offenders.append(f"{rel}:{node.lineno} print")
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    if "argparse" in names:
                        offenders.append(f"{rel}:{node.lineno} argparse")
    assert offenders == []


def test_output_paths_are_spelled_only_in_the_layout_module():
    """No literal OUTPUT_DIR/SHARDS_DIR/RUN_DIR path segment is joined onto a path outside pipeline/core/layout.py."""
    joined = re.compile(r'/ "(curation|reports|logs|gradients|shards|pretrain|evaluation|eval|checkpoints|\.work|'
                        r'\.manifests|curation\.parquet|curation\.tsv|ratings\.json|group\.html|index\.parquet|'
                        r'catalog\.parquet|norm\.json|metrics\.jsonl|report\.html)"')
    offenders = []
    for pkg in ("pipeline", "workflows", "qc"):
        for path in (REPO / pkg).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if rel == "pipeline/core/layout.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if joined.search(line):
                    offenders.append(f"{rel}:{i}: {line.strip()}")
    assert offenders == []


def test_every_stage_has_one_module_with_a_run_entry_point():
    stages = {"prep": "run_prep", "import_series": "run_import", "qc": "run_qc", "gradients": "run_gradients",
              "shards": "run_shards", "pretrain": "run_pretrain", "evaluate": "run_evaluate"}
    for module, entry in stages.items():
        tree = ast.parse((REPO / "pipeline" / "stages" / f"{module}.py").read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert entry in names, f"pipeline/stages/{module}.py lacks {entry}"
