"""MNI152NLin6Asym template files, found offline.

The 2 mm templates ship in ``pipeline/data/templates``. A configured template
directory is searched first; it may be a flat folder of
``MNI152NLin6Asym_res-<r>[_desc-<d>]_<suffix>.nii.gz`` files or a TemplateFlow
tree (``<dir>/tpl-MNI152NLin6Asym/tpl-MNI152NLin6Asym_res-0<r>_...``).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import NeurocurateError

__all__ = ["BUNDLED_DIR", "TEMPLATE", "get_template", "template_candidates"]

TEMPLATE = "MNI152NLin6Asym"
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data" / "templates"


def template_candidates(
    resolution: int, suffix: str, desc: str | None = None, template_dir: str | Path | None = None
) -> list[Path]:
    """Every path where the requested template may be, in search order."""
    desc_part = f"_desc-{desc}" if desc else ""
    flat = f"{TEMPLATE}_res-{resolution}{desc_part}_{suffix}.nii.gz"
    tflow = f"tpl-{TEMPLATE}_res-{resolution:02d}{desc_part}_{suffix}.nii.gz"
    roots = [Path(template_dir)] if template_dir else []
    roots.append(BUNDLED_DIR)
    out = []
    for root in roots:
        out += [root / flat, root / f"tpl-{TEMPLATE}" / tflow, root / tflow]
    return out


def get_template(
    resolution: int = 2, suffix: str = "T1w", desc: str | None = None, template_dir: str | Path | None = None
) -> Path:
    """Path of an MNI152NLin6Asym template image.

    Parameters
    ----------
    resolution : int
        1 or 2 (mm).
    suffix : str
        ``T1w``, ``T2w`` or ``mask``.
    desc : str, optional
        ``"brain"`` for the brain-extracted image or the brain mask.
    template_dir : path-like, optional
        Searched before the bundled files.

    Raises
    ------
    NeurocurateError
        When no candidate exists (the message lists where it looked).
    """
    candidates = template_candidates(resolution, suffix, desc, template_dir)
    for path in candidates:
        if path.is_file():
            return path
    hint = "" if template_dir else " (set templates.template_dir to a folder holding it)"
    raise NeurocurateError(
        f"template {TEMPLATE} res-{resolution} desc-{desc} {suffix} not found{hint}; looked in "
        + ", ".join(str(p) for p in candidates)
    )
