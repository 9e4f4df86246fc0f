"""Architecture figures of a source tree (issue 11): files per layer, import cycles, longest functions, duplicates.

Usage::

    python benchmarks/architecture.py [ROOT]      # ROOT defaults to the repository root

Import edges are read with ``ast`` (no import is executed), counting imports at any depth
(function-local imports too): a cycle is a strongly connected component of more than one file.
"Layers" are the top-level groups a reader sees in the tree. The ``duplicates`` tool of the
tool library is run when it is on PATH.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("pipeline", "workflows", "qc")


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def collect(root: Path) -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            mods[module_name(root, p)] = p
    return mods


def imports_of(mod: str, path: Path, mods: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg_parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg_parts = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                base = ".".join(pkg_parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            # resolve to the longest known module prefix
            parts = n.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in mods:
                    if cand != mod:
                        out.add(cand)
                    break
    return out


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    result.append(sorted(comp))
    return result



def layers_of(root: Path, mods: dict[str, Path]) -> dict[str, list[str]]:
    """Top-level groups a reader sees in the tree: ``pipeline/<subpackage>/``, ``pipeline/*.py``, ``workflows/``, ``qc/``."""
    layers: dict[str, list[str]] = defaultdict(list)
    for m in mods:
        parts = m.split(".")
        if parts[0] == "pipeline" and len(parts) >= 2 and (root / "pipeline" / parts[1]).is_dir():
            layers[f"pipeline/{parts[1]}/"].append(m)
        elif m == "pipeline":
            layers["pipeline/__init__.py"].append(m)
        elif parts[0] == "pipeline":
            layers["pipeline/*.py"].append(m)
        else:
            layers[f"{parts[0]}/"].append(m)
    return dict(layers)


def analyse(root: Path) -> dict:
    """Modules, file-level and layer-level import cycles of the tree at ``root``."""
    mods = collect(root)
    graph = {m: imports_of(m, p, mods) for m, p in mods.items()}
    layers = layers_of(root, mods)
    layer_of = {m: k for k, v in layers.items() for m in v}
    lgraph: dict[str, set[str]] = {k: set() for k in layers}
    for m, deps in graph.items():
        lgraph[layer_of[m]].update(layer_of[d] for d in deps if layer_of[d] != layer_of[m])
    return {"modules": mods, "graph": graph, "layers": layers, "file_cycles": sccs(graph),
            "layer_cycles": sccs(lgraph)}


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1]).resolve()
    info = analyse(root)
    mods, layers = info["modules"], info["layers"]
    print(f"root: {root}")
    print("files per layer:")
    for k in sorted(layers):
        print(f"  {k:24s} {len(layers[k]):3d}")
    print(f"  {'total':24s} {len(mods):3d}")
    print(f"file-level import cycles: {len(info['file_cycles'])}")
    for c in info["file_cycles"]:
        print("   ", " <-> ".join(c))
    print(f"layer-level import cycles: {len(info['layer_cycles'])}")
    for c in info["layer_cycles"]:
        print("   ", " <-> ".join(c))
    # longest functions
    funcs = []
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(root)}:{node.lineno} {node.name}"))
    funcs.sort(reverse=True)
    print("longest functions (lines):")
    for n, name in funcs[:5]:
        print(f"  {n:4d}  {name}")
    biggest = sorted(((len(p.read_text().splitlines()), str(p.relative_to(root))) for p in mods.values()), reverse=True)[:3]
    print("largest files (lines):", ", ".join(f"{f} {n}" for n, f in biggest))
    if shutil.which("duplicates"):
        out = subprocess.run(["duplicates", "--repo", str(root), "--most", "1", "--seconds", "120"],
                             capture_output=True, text=True).stdout.splitlines()
        print("duplicates:", out[0] if out else "(no output)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
