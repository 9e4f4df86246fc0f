"""Write derivatives into OUTPUT_DIR: atomically, and only when the content changed.

Copying only changed files keeps reruns cheap and leaves unchanged
derivatives byte-identical (same inode, same mtime).
"""

from __future__ import annotations

import filecmp
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_copy, atomic_write_text

__all__ = ["publish_file", "publish_json"]


def publish_file(src: str | Path, target: str | Path) -> bool:
    """Copy ``src`` to ``target`` atomically unless identical content is already there.

    Returns
    -------
    bool
        True when the target was (re)written.
    """
    target = Path(target)
    if target.is_file() and filecmp.cmp(src, target, shallow=False):
        return False
    atomic_copy(src, target)
    return True


def publish_json(payload: Mapping[str, Any], target: str | Path) -> bool:
    """Write a JSON sidecar atomically unless the same text is already there."""
    target = Path(target)
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    if target.is_file() and target.read_text() == text:
        return False
    atomic_write_text(target, text)
    return True

