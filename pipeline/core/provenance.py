"""Provenance: the one file hasher and the one record of software versions."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

__all__ = ["DISTRIBUTIONS", "SIDECAR_DISTRIBUTIONS", "file_digest", "software_versions"]

#: Distributions whose versions shape the outputs (recorded in sidecars and stage manifests).
DISTRIBUTIONS = ("neurocurate", "nipype", "antspyx", "deepbet", "nibabel", "numpy", "scipy", "pandas",
                 "zarr", "torch", "scikit-learn", "nilearn")
#: The subset that shapes the numbers of an image derivative (its JSON sidecar's ``SoftwareVersions``).
SIDECAR_DISTRIBUTIONS = ("neurocurate", "antspyx", "nipype", "nibabel", "numpy", "deepbet", "torch", "nilearn")


def file_digest(path: str | Path, algorithm: str = "sha256", chunk_bytes: int = 8 << 20) -> str:
    """Hex digest of a file's bytes, read in ``chunk_bytes`` pieces.

    Parameters
    ----------
    path : path-like
        The file.
    algorithm : str
        A :mod:`hashlib` algorithm; SHA-256 everywhere except the shard stores' source fingerprints,
        which stay SHA-1 so that stores written before keep matching their sources.
    chunk_bytes : int
        Read size.
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def software_versions(distributions: Iterable[str] = DISTRIBUTIONS) -> dict[str, str]:
    """Installed versions of ``distributions`` (read from package metadata; nothing is imported)."""
    from importlib import metadata

    versions = {}
    for dist in distributions:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions
