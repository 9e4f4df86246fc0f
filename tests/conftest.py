"""Shared fixtures: the real data in ../shared/data and tiny synthetic images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NEUROCURATE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the read-only real data (templates, atlases, anat, func, abide)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (set NEUROCURATE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def template_dir(shared_data: Path) -> Path:
    return shared_data / "templates"
