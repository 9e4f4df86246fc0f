"""Stage ``shards``: the curated data of an OUTPUT_DIR into Zarr v3 shard stores + one parquet index.

Entry point: :func:`run_shards`. Collecting the samples is :mod:`pipeline.store.collect`, writing the stores
:mod:`pipeline.store.write`, reading them back :mod:`pipeline.store.read` and :mod:`pipeline.store.loader`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.core.config import Config, ShardsConfig, write_resolved_config
from pipeline.core.console import USER_LOG
from pipeline.core.errors import NeurocurateError
from pipeline.core.layout import OutputLayout, ShardsLayout
from pipeline.store.collect import collect_samples, read_gradients_table
from pipeline.store.write import write_shards

__all__ = ["build_shards", "resolve_shards_dir", "run_shards"]


def resolve_shards_dir(output_dir: str | Path, cfg: Config, shards_dir: str | Path | None = None) -> Path:
    """``shards_dir``, else ``[shards].shards_dir``, else ``OUTPUT_DIR/shards``."""
    return Path(shards_dir or cfg.shards.shards_dir or OutputLayout(output_dir).default_shards_dir)


def run_shards(output_dir: str | Path, cfg: Config, *, shards_dir: str | Path | None = None) -> pd.DataFrame:
    """Build or extend the shards of the curated data of OUTPUT_DIR; returns the index.

    Writes the stores and ``SHARDS_DIR/index.parquet`` (only what changed) and the resolved config next to them.
    """
    from pipeline.core.parallel import dask_session

    target = resolve_shards_dir(output_dir, cfg, shards_dir)
    with dask_session(cfg.dask):  # shards go to the [dask] cluster when one is configured
        index = build_shards(output_dir, target, cfg.shards)
    write_resolved_config(cfg, target)
    counts = index.groupby(["store", "split"]).size().unstack(fill_value=0)
    USER_LOG.info(f"{len(index)} samples in {index['store'].nunique()} store(s) -> {ShardsLayout(target).index}")
    USER_LOG.info(counts.to_string())
    return index


def build_shards(output_dir: str | Path, shards_dir: str | Path | None = None,
                 cfg: ShardsConfig = ShardsConfig()) -> pd.DataFrame:
    """Shard the curated data of ``OUTPUT_DIR`` (``neurocurate shards``).

    Parameters
    ----------
    output_dir : path-like
        Derivatives folder with ``curation/curation.parquet`` and
        ``participants.tsv``.
    shards_dir : path-like, optional
        Defaults to ``cfg.shards_dir`` or ``OUTPUT_DIR/shards``.
    cfg : ShardsConfig

    Returns
    -------
    pandas.DataFrame
        The index written to ``SHARDS_DIR/index.parquet``.

    Notes
    -----
    The index always describes the current curation table: excluded samples
    leave the index (their shard files stay as they are), and with
    ``cfg.atlas`` set only that atlas's store is indexed.
    """
    output_dir = Path(output_dir)
    layout = OutputLayout(output_dir)
    shards_dir = Path(shards_dir or cfg.shards_dir or layout.default_shards_dir)
    samples, label_columns, qc_columns = collect_samples(output_dir, cfg)
    if samples.empty:
        raise NeurocurateError(f"{layout.curation_table}: no included samples to shard")
    gradients = {}
    for atlas in sorted(set(samples.loc[samples["kind"] == "fmri", "atlas"])):
        table = read_gradients_table(output_dir, atlas)
        if table is not None:
            gradients[f"fmri-{atlas}"] = table
    return write_shards(samples, shards_dir, cfg, gradients=gradients,
                        label_columns=label_columns, qc_columns=qc_columns)
