"""Write files so that readers never see a half-written one.

Everything is written to a temporary sibling (same directory, so the rename
stays on one filesystem) and moved into place with :func:`os.replace`, which
is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_copy", "atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_text", "cleanup_dir_leftovers"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it over ``target`` on success.

    The temporary name keeps ``target``'s extension (``suffix``) so libraries
    that pick a format from the name (``.nii.gz``) still work.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".nii.gz") else target.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; published files get the usual umask-derived mode.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_copy(src: str | Path, target: str | Path) -> Path:
    with atomic_path(target) as tmp:
        shutil.copyfile(src, tmp)
    return Path(target)


_VERSION_TAG = ".v-"


def _versions(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}{_VERSION_TAG}*"))


def cleanup_dir_leftovers(target: str | Path) -> list[Path]:
    """Remove what a killed :func:`atomic_dir` left next to ``target``; return what was removed.

    Leftovers are version folders ``.<name>.v-*`` that ``target`` does not point to (a new version whose
    publication never happened, or an old one whose removal never happened) and temporary links
    ``.<name>.link-*``. The version ``target`` points to is never touched.
    """
    target = Path(target)
    current = (target.parent / os.readlink(target)).resolve() if target.is_symlink() else None
    removed = []
    for path in [*_versions(target), *target.parent.glob(f".{target.name}.link-*")]:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif current is None or path.resolve() != current:
            shutil.rmtree(path, ignore_errors=True)
        else:
            continue
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a new, empty version folder that replaces ``target`` as a whole, in one rename, on success.

    ``target`` is a symbolic link to a hidden version folder ``.<name>.v-<random>`` beside it. A new version
    is written beside the current one; publishing it is a single :func:`os.replace` of the link, so at every
    moment ``target`` is either the old or the new version (never missing, never half-written). The old
    version is removed afterwards; leftovers of a killed run are removed by the next call
    (:func:`cleanup_dir_leftovers`). A ``target`` that is still a plain folder (written by an older
    version) is moved aside once, then replaced by the link.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    cleanup_dir_leftovers(target)
    version = Path(tempfile.mkdtemp(prefix=f".{target.name}{_VERSION_TAG}", dir=target.parent))
    os.chmod(version, 0o777 & ~_umask())
    try:
        yield version
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    previous = (target.parent / os.readlink(target)) if target.is_symlink() else None
    if target.exists() and not target.is_symlink():
        legacy = Path(tempfile.mkdtemp(prefix=f".{target.name}{_VERSION_TAG}legacy-", dir=target.parent))
        os.replace(target, legacy)  # a folder cannot be replaced by a link in one step: once only
        previous = legacy
    link = target.with_name(f".{target.name}.link-{version.name.rsplit(_VERSION_TAG, 1)[1]}")
    os.symlink(version.name, link)
    os.replace(link, target)
    if previous is not None and previous.resolve() != version.resolve():
        shutil.rmtree(previous, ignore_errors=True)
