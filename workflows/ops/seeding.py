"""Reproducible ANTs runs: the seed antspyx actually reads."""

from __future__ import annotations

import contextlib

__all__ = ["ants_seed"]


@contextlib.contextmanager
def ants_seed(seed: int | None):
    """Seed ANTs registrations (metric sampling) inside the block, then restore.

    antspyx 0.6 reads the seed from ``ants.config`` (the ``random_seed``
    argument of ``ants.registration`` is swallowed by ``**kwargs``); without
    it the Mattes sampling differs per run and reruns are not byte-identical.
    ``ants.config.set_ants_deterministic`` would also reseed numpy globally and
    pin ITK to one thread for the whole process; only the seed is wanted here.
    """
    import ants.config

    previous = ants.config._random_seed
    ants.config._random_seed = seed
    try:
        yield
    finally:
        ants.config._random_seed = previous
