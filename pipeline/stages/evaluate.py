"""Stage ``evaluate``: frozen-encoder probes of a pretraining run against honest baselines.

Entry point: :func:`run_evaluate`. The report goes to its one home, ``RUN_DIR/evaluation/<target>_<split>[_k<K>]``
(:class:`pipeline.core.layout.RunLayout`), unless ``out_dir`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.config import Config, write_resolved_config
from pipeline.core.console import USER_LOG
from pipeline.core.errors import InputError
from pipeline.core.layout import EVALUATION_REPORT, RunLayout

__all__ = ["run_evaluate"]


def run_evaluate(
    run_dir: str | Path,
    shards_dir: str | Path | None,
    target: str,
    cfg: Config,
    *,
    split: str = "kfold",
    few_shot: int | None = None,
    out_dir: str | Path | None = None,
    store: str | None = None,
    reference_shards: str | Path | None = None,
    atlas_image: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Probe the run's frozen embeddings for ``target`` and compare them with the baselines.

    Parameters
    ----------
    run_dir : path-like
        Pretraining run folder.
    shards_dir : path-like or None
        Shards to evaluate on; ``None``: the shards the run was trained on (``RUN_DIR/training_data.json``).
        A store whose ROI set differs from the run's is refused (:class:`~pipeline.core.errors.InputError`).
    target : str
        Label column (``diagnosis``, ``sex``, ``age`` or any participants.tsv column).
    cfg : Config
        Resolved configuration (the ``[evaluate]`` section applies).
    split : {"kfold", "site", "subject"}
        Subject-grouped k-fold, leave-site-out, or the index's held-out test subjects.
    few_shot : int, optional
        Train on K subjects per class (resampled).
    out_dir : path-like, optional
        Report folder (default ``RUN_DIR/evaluation/<target>_<split>[_k<K>]``).
    store, reference_shards, atlas_image, checkpoint : optional
        See ``neurocurate evaluate --help``.

    Returns
    -------
    dict
        The result written to ``report.json`` (models, metrics with intervals, comparisons), plus ``report_dir``.
    """
    from pipeline.evaluation.run import evaluate_run

    if few_shot is not None and few_shot < 1:
        raise InputError("--few-shot", "K must be at least 1")
    out = Path(out_dir) if out_dir else RunLayout(run_dir).evaluation_dir(target, split, few_shot)
    result = evaluate_run(run_dir, shards_dir, target, split=split, few_shot=few_shot, cfg=cfg.evaluate, out_dir=out,
                          store=store, reference_shards=reference_shards, atlas_image=atlas_image,
                          checkpoint=checkpoint)
    write_resolved_config(cfg, out)
    _summarise(result, target, split, cfg)
    USER_LOG.info(f"report: {out / EVALUATION_REPORT}")
    return {**result, "report_dir": str(out)}


def _summarise(result: dict[str, Any], target: str, split: str, cfg: Config) -> None:
    metric = result["primary_metric"]
    USER_LOG.info(f"{target} ({split} split, {result['n_tested']} tested samples): {metric} "
                  f"[{round(100 * cfg.evaluate.confidence)}% CI]")
    for name, info in result["models"].items():
        m = info["metrics"][metric]
        kind = "baseline" if info["baseline"] else "model   "
        USER_LOG.info(f"  {name:24s} {kind} {m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]")
    for name, c in result["comparisons"].items():
        USER_LOG.info(f"  {name} vs {c['against']}: difference {c['difference']:+.3f}, "
                      f"permutation p = {c['p_value']:.4f}")
    if "few_shot" in result:
        fs = result["few_shot"]
        USER_LOG.info(f"few-shot K={fs['k']} ({fs['resamples']} resamples): {metric} mean ± sd")
        for name, info in fs["models"].items():
            m = info["metrics"][metric]
            USER_LOG.info(f"  {name:24s} {m['mean']:.3f} ± {m['std']:.3f}")
