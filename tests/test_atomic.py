from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.core.atomic import atomic_dir, atomic_path, atomic_write_text


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failure_keeps_old_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "img.nii.gz"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz")
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["img.nii.gz"]


def test_atomic_dir_swaps_whole_directory(tmp_path):
    target = tmp_path / "store"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    # the target is a link to its one live version; nothing else is left beside it
    assert target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["store", os.readlink(target)])


def test_atomic_dir_publishes_in_one_rename_and_cleans_up_after_a_kill(tmp_path, monkeypatch):
    """Kill at each step of a publication: the target is always complete (old or new); the next call cleans up."""
    from pipeline.core import atomic

    target = tmp_path / "gradients"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("old")
    renames = []
    real_replace = os.replace

    def counting_replace(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", counting_replace)
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("new")
    assert renames == [(renames[0][0], "gradients")] and renames[0][0].startswith(".gradients.link-")
    assert (target / "v").read_text() == "new"

    class Killed(BaseException):
        pass

    def killed_replace(src, dst):  # the process dies just before the one rename
        raise Killed

    monkeypatch.setattr(atomic.os, "replace", killed_replace)
    with pytest.raises(Killed):
        with atomic_dir(target) as tmp:
            (tmp / "v").write_text("newest")
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert (target / "v").read_text() == "new"  # the old version stays whole
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name != "gradients")
    assert len(hidden) == 3  # the live version, the unpublished one and its link
    removed = atomic.cleanup_dir_leftovers(target)
    assert len(removed) == 2 and (target / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["gradients", os.readlink(target)])


def test_atomic_dir_replaces_a_plain_folder_written_before(tmp_path):
    target = tmp_path / "report"
    target.mkdir()
    (target / "old.html").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "report.html").write_text("y")
    assert target.is_symlink() and sorted(p.name for p in target.iterdir()) == ["report.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report", os.readlink(target)])
