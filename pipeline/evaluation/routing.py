"""Routing maps: which experts the tokens of each brain network use, per MoE layer.

ROIs are named after the Yeo-7 network of their Schaefer name
(``7Networks_LH_Vis_1`` -> ``Vis``), ``Subcortex`` for Tian subcortical names
(``HIP-head-m-rh``), or, for atlases without network names (CC200), the
majority Schaefer network of their voxels when the atlas image is given.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline.roi.atlas import majority_networks, schaefer_network

__all__ = ["UNASSIGNED", "network_routing", "roi_networks"]

UNASSIGNED = "Unassigned"
_TIAN_RE = re.compile(r"^[A-Za-z]+(-[A-Za-z]+)*-(lh|rh)$")
_TRAILING_ID_RE = re.compile(r"(\d+)$")
_YEO7_ORDER = ("Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default", "Subcortex")


def roi_networks(roi_names: list[str], atlas_image: str | Path | None = None) -> list[str]:
    """Network of every ROI (Yeo-7 name, ``Subcortex`` or ``Unassigned``).

    Parameters
    ----------
    roi_names : list of str
        ROI names of the store, in order.
    atlas_image : path-like, optional
        Labels NIfTI of the store's atlas; ROI ``k`` is label id = the
        trailing number of its name (``CC200_17`` -> 17). Used for names that
        carry no network.
    """
    nets: list[str | None] = [schaefer_network(n) or ("Subcortex" if _TIAN_RE.match(n) else None) for n in roi_names]
    missing = [i for i, n in enumerate(nets) if n is None]
    if missing and atlas_image is not None:
        ids = []
        for i in missing:
            m = _TRAILING_ID_RE.search(roi_names[i])
            ids.append(int(m.group(1)) if m else -1)
        usable = [(i, lid) for i, lid in zip(missing, ids) if lid > 0]
        if usable:
            found = majority_networks(atlas_image, [lid for _, lid in usable])
            for (i, _), net in zip(usable, found):
                nets[i] = net
    return [n or UNASSIGNED for n in nets]


def network_routing(counts_RE: np.ndarray, networks: list[str]) -> dict[str, list]:
    """Fraction of each network's tokens sent to each expert.

    Returns
    -------
    dict
        ``networks`` (Yeo-7 order, then Subcortex, then others),
        ``fractions`` (``[networks][E]``: share of the network's token-to-expert
        assignments that went to each expert; rows sum to 1) and
        ``assignments`` (the number of assignments per network).
    """
    counts_RE = np.asarray(counts_RE, dtype=np.float64)
    if counts_RE.shape[0] != len(networks):
        raise ValueError(f"{counts_RE.shape[0]} count rows for {len(networks)} ROI networks")
    present = sorted(set(networks), key=lambda n: (_YEO7_ORDER.index(n) if n in _YEO7_ORDER else len(_YEO7_ORDER), n))
    nets = np.asarray(networks, dtype=object)
    rows, totals = [], []
    for net in present:
        c_E = counts_RE[nets == net].sum(0)
        total = c_E.sum()
        rows.append((c_E / total).tolist() if total > 0 else [0.0] * len(c_E))
        totals.append(float(total))
    return {"networks": present, "fractions": rows, "assignments": totals}
