"""Stage manifests: what a stage last ran on, so a rerun can tell what changed.

A manifest (``OUTPUT_DIR/.manifests/<stage>.json``) records, for every input
file, its size, modification time and SHA-256, plus the hash of the config
the stage used and the versions of the software it ran with. Checking an
input costs one ``stat`` when its size and mtime are unchanged; only a file
whose size or mtime moved is re-hashed, so a touched but identical file is
still "unchanged".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_write_text
from pipeline.core.errors import InputError
from pipeline.core.layout import OutputLayout
from pipeline.core.provenance import file_digest

__all__ = [
    "FileState",
    "InputDiff",
    "Manifest",
    "diff_inputs",
    "file_states",
    "manifest_path",
    "read_manifest",
    "write_manifest",
]

MANIFEST_VERSION = 1
# Distributions whose version changes what a stage computes.
@dataclass(frozen=True)
class FileState:
    """Size, modification time (ns) and SHA-256 of one input file."""

    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What one stage last ran on.

    ``inputs`` maps a key (a path relative to the stage's input root, or an
    absolute path) to its :class:`FileState`; ``extra`` holds stage-specific
    bookkeeping (e.g. the subjects prep finished).
    """

    stage: str
    config_hash: str
    versions: dict[str, str]
    inputs: dict[str, FileState]
    extra: dict[str, Any] = field(default_factory=dict)
    finished_at: str = ""


@dataclass(frozen=True)
class InputDiff:
    """Inputs added, removed and changed in content since the manifest."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    @property
    def any(self) -> bool:
        """True when any input differs."""
        return bool(self.added or self.removed or self.changed)

    def keys(self) -> set[str]:
        """Every added, removed or changed key."""
        return {*self.added, *self.removed, *self.changed}


def manifest_path(output_dir: str | Path, stage: str) -> Path:
    """``OUTPUT_DIR/.manifests/<stage>.json``."""
    return OutputLayout(output_dir).manifest(stage)


def file_states(files: dict[str, Path], previous: dict[str, FileState] | None = None,
                chunk_bytes: int = 8 << 20) -> dict[str, FileState]:
    """Current state of ``files`` (key -> path), re-hashing only what moved.

    Parameters
    ----------
    files : dict
        Key (as stored in the manifest) -> path on disk.
    previous : dict, optional
        The manifest's states; a file whose size and mtime match keeps its hash.
    chunk_bytes : int
        Read size when hashing.
    """
    previous = previous or {}
    out: dict[str, FileState] = {}
    for key, path in files.items():
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InputError(path, "input disappeared while the run was being planned") from None
        old = previous.get(key)
        if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
            out[key] = old
        else:
            out[key] = FileState(st.st_size, st.st_mtime_ns, file_digest(path, "sha256", chunk_bytes))
    return out


def diff_inputs(current: dict[str, FileState], previous: dict[str, FileState]) -> InputDiff:
    """Which keys were added, removed or changed in content (SHA-256)."""
    added = tuple(sorted(set(current) - set(previous)))
    removed = tuple(sorted(set(previous) - set(current)))
    changed = tuple(sorted(k for k in set(current) & set(previous) if current[k].sha256 != previous[k].sha256))
    return InputDiff(added, removed, changed)


def read_manifest(output_dir: str | Path, stage: str) -> Manifest | None:
    """The stage's manifest, or None when there is none (or an unreadable one, which means "rerun")."""
    path = manifest_path(output_dir, stage)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if data.get("manifest_version") != MANIFEST_VERSION:
        return None
    try:
        inputs = {k: FileState(**v) for k, v in data["inputs"].items()}
        return Manifest(data["stage"], data["config_hash"], dict(data["versions"]), inputs,
                        dict(data.get("extra", {})), data.get("finished_at", ""))
    except (KeyError, TypeError):
        return None


def write_manifest(output_dir: str | Path, manifest: Manifest) -> Path:
    """Write the stage's manifest atomically."""
    import datetime

    body = {
        "manifest_version": MANIFEST_VERSION,
        "stage": manifest.stage,
        "config_hash": manifest.config_hash,
        "versions": manifest.versions,
        "finished_at": manifest.finished_at or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "extra": manifest.extra,
        "inputs": {k: {"size": s.size, "mtime_ns": s.mtime_ns, "sha256": s.sha256} for k, s in sorted(manifest.inputs.items())},
    }
    path = manifest_path(output_dir, manifest.stage)
    atomic_write_text(path, json.dumps(body, indent=1) + "\n")
    return path
