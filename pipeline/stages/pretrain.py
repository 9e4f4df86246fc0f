"""Stage ``pretrain``: streaming MoE-JEPA pretraining on shard stores.

Entry point: :func:`run_pretrain`. Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group
(NCCL on GPUs, gloo on CPUs) and every rank trains on its part of the stream.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.console import USER_LOG
from pipeline.core.errors import InputError
from pipeline.core.layout import RunLayout, ShardsLayout, store_gradients

__all__ = ["PretrainResult", "run_pretrain"]


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`run_pretrain` did: the last step, its loss and the run folder."""

    run_dir: Path
    step: int
    loss: float | None


def _init_distributed():
    """Join the torchrun process group when WORLD_SIZE > 1; returns the device to use (None: single process)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl")
        return torch.device("cuda", local)
    torch.distributed.init_process_group("gloo")
    return torch.device("cpu")


def _record_training_data(run: RunLayout, shards_dir: Path, dataset, split: str, *, resuming: bool) -> None:
    """Write what the run trains on (``RUN_DIR/training_data.json`` + its gradients); refuse to resume on other data.

    A run that resumes from a checkpoint must see the store, split, ROI set, gradients and tasks it started
    with; only the shards' location and the index may change (the record is then updated).
    """
    import torch

    from pipeline.pretrain.checkpoint import latest_checkpoint
    from pipeline.pretrain.record import read_training_data, training_data_of, write_training_data

    record, grads = training_data_of(shards_dir, dataset, split)
    if resuming and latest_checkpoint(run.root) is not None:
        old = read_training_data(run.root)
        if old is not None and old.identity() != record.identity():
            new_id, old_id = record.identity(), old.identity()
            changed = ", ".join(k for k in new_id if new_id[k] != old_id[k])
            raise InputError(run.training_data, f"the run was trained on store {old.store} ({old.describe()}, split "
                                                f"{old.split}) of {old.shards_dir}; this data differs in {changed}; "
                                                "pass --no-resume or another --out for a new model")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0:
        write_training_data(run.root, record, grads)


def run_pretrain(
    shards_dir: str | Path,
    run_dir: str | Path,
    *,
    config: str = "tiny",
    store: str | None = None,
    split: str = "train",
    max_steps: int | None = None,
    device: str | None = None,
    resume: bool = True,
    fresh: bool = False,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain a MoE-JEPA on one store of the shards.

    Parameters
    ----------
    shards_dir : path-like
        Folder with ``index.parquet`` (``neurocurate shards``).
    run_dir : path-like
        Run folder: ``metrics.jsonl``, ``checkpoints/``, the resolved pretraining config, and what the run was
        trained on (``training_data.json`` + ``training_gradients.npy``, see :mod:`pipeline.pretrain.record`),
        which ``neurocurate evaluate`` uses by default.
    config : str
        Named pretraining config (``pipeline/configs/pretrain_<name>.toml``) or a TOML file.
    store : str, optional
        Store to train on (default: the only fMRI store, or ``anat`` for ``model.modality = "anat"``).
    split : str
        Index split to train on; ``"all"`` for every split.
    max_steps : int, optional
        Stop after this many steps (default ``train.max_steps``).
    device : str, optional
        Torch device (default: this rank's GPU, else CPU).
    resume : bool
        Continue from the newest checkpoint of ``run_dir`` when there is one.
    fresh : bool
        Delete earlier checkpoints and metrics of ``run_dir`` first (a new model, e.g. after the data changed).
    progress : bool
        Show a progress bar.
    """
    import torch

    from pipeline.pretrain.config import load_pretrain_config, resolve_states
    from pipeline.pretrain.train import Trainer, loader_config
    from pipeline.store.loader import ShardDataset

    cfg = load_pretrain_config(config)
    shards_dir, run = Path(shards_dir), RunLayout(run_dir)
    if not ShardsLayout(shards_dir).index.is_file():
        raise InputError(shards_dir, "no index.parquet here; build shards with `neurocurate shards` first")
    if fresh:
        # A retrain is a new model: stale checkpoints would otherwise win "newest" for evaluation,
        # and stale metrics would mix into the new curve.
        shutil.rmtree(run.checkpoints_dir, ignore_errors=True)
        run.metrics.unlink(missing_ok=True)
    dist_device = _init_distributed()
    try:
        fmri = cfg.model.modality == "fmri"
        loader_cfg = loader_config(cfg)  # the window and normalisation the model expects
        store = store or (None if fmri else "anat")
        try:
            dataset = ShardDataset(shards_dir, loader_cfg, store=store, split=None if split == "all" else split,
                                   training=True)
        except ValueError as exc:
            raise InputError(shards_dir, str(exc)) from None
        if dataset.kind != cfg.model.modality:
            raise InputError(shards_dir, f"store {dataset.store!r} holds {dataset.kind} data but the config trains "
                                         f"model.modality={cfg.model.modality!r}")
        if len(dataset.index) == 0:
            raise InputError(shards_dir, f"store {dataset.store!r} has no samples in split {split!r}")
        grads = getattr(dataset, "gradients_Rk", None)
        if fmri and grads is not None and grads.shape[1] < cfg.fmri.gradient_dim:
            raise InputError(store_gradients(ShardsLayout(shards_dir).store_dir(dataset.store)),
                             f"holds {grads.shape[1]} gradient coordinates per ROI but the pretraining config "
                             f"needs fmri.gradient_dim = {cfg.fmri.gradient_dim}; rerun `neurocurate gradients` with "
                             f"--n-components {cfg.fmri.gradient_dim} and `neurocurate shards`, or lower gradient_dim")
        # state_experts: one expert per task of the training split, checked against top_k before any model exists
        cfg = resolve_states(cfg, dataset.index["task"] if "task" in dataset.index else [],
                             str(ShardsLayout(shards_dir).index))
        _record_training_data(run, shards_dir, dataset, split, resuming=resume and not fresh)
        trainer = Trainer(cfg, dataset, run.root, device=dist_device or device, resume=resume and not fresh,
                          progress=progress)
        history = trainer.fit(max_steps)
        loss = history[-1]["loss"] if history else None
        if trainer.rank == 0 and loss is not None:
            USER_LOG.info(f"step {trainer.step}: loss {loss:.4f}; metrics in {run.metrics}")
        return PretrainResult(run.root, int(trainer.step), loss)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
