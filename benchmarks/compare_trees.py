"""Compare two output trees file by file (issue 11: behaviour unchanged by the refactor).

Usage::

    python benchmarks/compare_trees.py BEFORE AFTER [--skip PATTERN ...]

Prints, per top-level folder, how many files are byte-identical, differ, or exist on one side only.
Hidden files (work dirs, manifests, version folders behind links) are read through the links that
publish them; ``.work`` and ``.manifests`` are skipped (nipype caches and run bookkeeping, not outputs).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import sys
from collections import defaultdict
from pathlib import Path


def digests(root: Path, skip: list[str]) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if name.startswith(".") or any(fnmatch.fnmatch(rel, s) for s in skip):
                continue
            out[rel] = hashlib.sha256((Path(dirpath) / name).read_bytes()).hexdigest()
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--skip", nargs="*", default=[], help="glob patterns of relative paths to leave out")
    args = ap.parse_args(argv)
    a, b = digests(args.before, args.skip), digests(args.after, args.skip)
    stats: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    differing = []
    for rel in sorted(set(a) | set(b)):
        top = rel.split("/", 1)[0] if "/" in rel else "(top level)"
        if rel not in b:
            stats[top]["only before"] += 1
            differing.append(f"only before: {rel}")
        elif rel not in a:
            stats[top]["only after"] += 1
            differing.append(f"only after:  {rel}")
        elif a[rel] == b[rel]:
            stats[top]["identical"] += 1
        else:
            stats[top]["differ"] += 1
            differing.append(f"differ:      {rel}")
    print(f"{'folder':28s} identical differ only-before only-after")
    for top in sorted(stats):
        s = stats[top]
        print(f"{top:28s} {s['identical']:9d} {s['differ']:6d} {s['only before']:11d} {s['only after']:10d}")
    for line in differing:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
