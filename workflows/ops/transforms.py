"""ANTs/ITK linear transform files as matrices (one owner of the LPS/RAS and centre conventions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["LPS_TO_RAS", "itk_linear_ras"]

#: ITK works in LPS physical space, nibabel in RAS: the flip of the first two axes (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def itk_linear_ras(xfm_file: str | Path) -> np.ndarray:
    """4x4 RAS matrix of an ANTs linear ``.mat`` transform.

    ANTs stores ``y = A (x - c) + t + c`` in LPS (``c`` its fixed parameters);
    the result maps RAS points the same way (for a registration's forward
    transform: template point -> subject point).
    """
    import ants

    tx = ants.read_transform(str(xfm_file))
    p = np.asarray(tx.parameters, dtype=np.float64)
    c = np.asarray(tx.fixed_parameters, dtype=np.float64)
    a = p[:9].reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS @ a @ LPS_TO_RAS
    m[:3, 3] = LPS_TO_RAS @ (p[9:12] + c - a @ c)
    return m
