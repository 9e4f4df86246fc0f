"""Training loop: AdamW, warmup + cosine, EMA target, MoE bias balancing, checkpoints, DDP.

Shape legend: B samples per rank and step, L tokens per sample.

The trainer takes any iterable of per-sample dicts (the streaming zarr loader
of :mod:`pipeline.store.loader`, or an in-memory list in tests), groups ``batch_size``
samples, masks them in the collator and runs one optimizer step per batch.
Under ``torchrun`` (``WORLD_SIZE`` > 1) it wraps the model in DDP; each rank
is expected to receive its own partition of the data.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.atomic import atomic_write_text
from pipeline.core.config import config_to_dict, dump_config
from pipeline.core.layout import RunLayout
from pipeline.core.faults import crash_point
from pipeline.core.errors import InputError, NeurocurateError
from pipeline.pretrain.checkpoint import (
    checkpoint_path,
    get_rng_state,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from pipeline.pretrain.config import PretrainConfig
from pipeline.pretrain.moe import moe_stats, update_router_biases
from pipeline.pretrain.vit import JEPA

__all__ = ["COLLAPSE_SPREAD", "STALE_TEACHER_SHARE", "SampleStream", "Trainer", "build_collator", "build_model",
           "collapse_warning", "ema_momentum", "loader_config", "lr_lambda", "stale_teacher_warning", "teacher_init_share"]

log = logging.getLogger(__name__)


def build_model(cfg: PretrainConfig) -> JEPA:
    """Brain-JEPA (``model.modality = "fmri"``) or Neuro-JEPA (``"anat"``)."""
    if cfg.model.modality == "fmri":
        from pipeline.pretrain.fmri_jepa import build_fmri_jepa

        return build_fmri_jepa(cfg)
    from pipeline.pretrain.struct_jepa import build_struct_jepa

    return build_struct_jepa(cfg)


def build_collator(cfg: PretrainConfig, seed: int):
    """Mask collator of the configured modality."""
    from pipeline.pretrain.masks import AnatCollator, FMRICollator

    if cfg.model.modality == "fmri":
        return FMRICollator(cfg.fmri, cfg.moe, seed)
    return AnatCollator(cfg.anat, cfg.moe, seed)


def loader_config(cfg: PretrainConfig, seed: int | None = None):
    """The :class:`~pipeline.core.config.LoaderConfig` a run of ``cfg`` reads its shards with.

    fMRI: windows of ``fmri.num_frames`` frames, ``normalization="none"``
    because the collator z-scores every ROI over its window (the model's one
    normalisation, see :class:`~pipeline.pretrain.masks.FMRICollator`);
    volumes: whole, with the loader's per-volume robust scaling.
    """
    from pipeline.core.config import LoaderConfig

    seed = cfg.train.seed if seed is None else seed
    if cfg.model.modality == "fmri":
        return LoaderConfig(window_length=cfg.fmri.num_frames, seed=seed, normalization="none")
    return LoaderConfig(window_length=0, seed=seed, normalization="roi_robust")


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum(ema: tuple[float, ...], max_steps: int, step: int) -> float:
    """EMA momentum of the update after optimizer step ``step`` (0-based): linear from ``ema[0]`` to ``ema[1]``."""
    lo, hi = ema
    return lo + (hi - lo) * min(1.0, step / max(1, max_steps))


def teacher_init_share(ema: tuple[float, ...], max_steps: int, steps: int) -> float:
    """Share of the EMA target encoder that is still its random initialisation after ``steps`` updates.

    The target is ``prod(m_s) * theta_0 + sum_s w_s * theta_s`` over the momenta ``m_s`` of
    :func:`ema_momentum`, so ``prod(m_s)`` of it is the initial weights whatever training did. It is
    a property of the schedule alone: with I-JEPA's ``[0.996, 1]`` over 1600 steps it is 0.04; with
    a slow teacher ``[0.9995, 1]`` it is 0.67, and the target encoder that ``evaluate`` reads is
    then mostly the random encoder it is compared with.
    """
    s = np.arange(max(int(steps), 0))
    lo, hi = ema
    return float(np.exp(np.log(lo + (hi - lo) * np.minimum(1.0, s / max(1, max_steps))).sum()))


class SampleStream:
    """Endless stream of samples over epochs of an iterable, with resumable state.

    A dataset with ``state_dict``/``load_state_dict`` (the streaming loader)
    keeps its own position; for any other iterable the stream counts the
    samples taken in the current epoch and skips them again on resume.
    """

    def __init__(self, dataset: Iterable[dict]):
        self.dataset = dataset
        self.native = callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))
        self.epoch = 0
        self.offset = 0
        self._it = None

    def _start(self) -> None:
        # A stateful dataset moves to its next epoch itself (and set_epoch
        # would discard a position just restored by load_state_dict).
        if not self.native:
            if callable(getattr(self.dataset, "set_epoch", None)):
                self.dataset.set_epoch(self.epoch)
        self._it = iter(self.dataset)
        if not self.native:
            for _ in range(self.offset):
                next(self._it)

    def next(self) -> dict:
        """The next sample, starting a new epoch when the iterable is exhausted."""
        for _ in range(2):
            if self._it is None:
                self._start()
            try:
                sample = next(self._it)
            except StopIteration:
                self._it = None
                if self.offset == 0:
                    break
                self.epoch += 1
                self.offset = 0
                continue
            self.offset += 1
            return sample
        raise NeurocurateError("the training data yielded no samples")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "offset": self.offset}
        if self.native:
            state["dataset"] = self.dataset.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        if self.native and "dataset" in state:
            self.dataset.load_state_dict(state["dataset"])
        self._it = None


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Trainer:
    """One pretraining run in ``run_dir``.

    Parameters
    ----------
    cfg : PretrainConfig
        Resolved configuration (written to ``run_dir/pretrain_config.toml``).
    dataset : iterable of dict
        This rank's samples.
    run_dir : path-like
        Receives ``metrics.jsonl``, ``checkpoints/`` and the resolved config.
    device : str or torch.device, optional
        Defaults to CUDA (this rank's local device) when available, else CPU.
    resume : bool
        Continue from the newest checkpoint in ``run_dir`` when there is one.
    progress : bool
        Show a tqdm progress bar on rank 0.
    """

    def __init__(
        self,
        cfg: PretrainConfig,
        dataset: Iterable[dict],
        run_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        resume: bool = True,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world = _dist()
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        t = cfg.train
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        torch.manual_seed(t.seed)
        self.model = build_model(cfg).to(self.device)
        self.model.train()
        self.net: nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Router biases are updated identically on every rank; no buffer broadcast needed.
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        self.collator = build_collator(cfg, t.seed + 7919 * self.rank)
        self.stream = SampleStream(dataset)
        self.step = 0
        self._teacher_init: float | None = None  # running teacher_init_share; recomputed once after a resume
        self.progress = progress
        if resume and (ckpt := latest_checkpoint(self.run_dir)) is not None:
            self.load(ckpt)
        elif self.rank == 0:
            self._truncate_metrics()  # a fresh start: metrics of an older run would mix in
        # Written after a successful resume so a mismatching config never replaces the run's own.
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "pretrain_config.toml", dump_config(cfg))

    def _optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # Norms, biases, position/mask tokens and router priors are not decayed.
            (no_decay if p.ndim < 2 or name.endswith((".bias", "mask_token")) else decay).append(p)
        t = self.cfg.train
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)

    # ------------------------------------------------------------------ state

    def _gather(self, local: Any) -> list[Any]:
        if self.world == 1:
            return [local]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, local)
        return out

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank contributes its state)."""
        ranks = self._gather({"loader": self.stream.state_dict(), "rng": get_rng_state()})
        path = None
        if self.rank == 0:
            payload = {
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "config": config_to_dict(self.cfg),
                "ranks": ranks,
            }
            path = save_checkpoint(checkpoint_path(self.run_dir, self.step), payload)
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        if self.world > 1:
            torch.distributed.barrier()
        return path

    def load(self, path: str | Path) -> None:
        """Restore model, EMA, router biases, optimizer, scheduler, loader and RNG state."""
        payload = load_checkpoint(path)
        if len(payload["ranks"]) != self.world:
            raise NeurocurateError(f"{path}: written by {len(payload['ranks'])} rank(s), resuming with {self.world}")
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError as exc:
            raise InputError(path, f"checkpoint does not fit the model of this config ({str(exc).splitlines()[0]}); use another --out or --no-resume") from None
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.step = int(payload["step"])
        mine = payload["ranks"][self.rank]
        self.stream.load_state_dict(mine["loader"])
        set_rng_state(mine["rng"])
        if self.rank == 0:
            self._truncate_metrics()
        log.info("resumed from %s at step %d", path, self.step)

    def _truncate_metrics(self) -> None:
        # Lines logged after the checkpoint would be logged again: drop them.
        path = RunLayout(self.run_dir).metrics
        if path.is_file():
            keep = [line for line in path.read_text().splitlines() if _logged_step(line) <= self.step]
            atomic_write_text(path, "".join(f"{line}\n" for line in keep))

    # ------------------------------------------------------------------ steps

    def next_batch(self) -> dict[str, torch.Tensor]:
        samples = [self.stream.next() for _ in range(self.cfg.train.batch_size)]
        batch = self.collator(samples, self.step)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def momentum(self) -> float:
        return ema_momentum(self.cfg.train.ema, self.cfg.train.max_steps, self.step)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step; returns the step's logs."""
        t = self.cfg.train
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, logs = self.net(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip) if t.grad_clip > 0 else None
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        update_router_biases(self.model.encoder, self.cfg.moe.bias_update_rate, self.cfg.moe.bias_clip, self.cfg.moe.balance)
        momentum = self.momentum()
        self.model.update_target(momentum)
        self.step += 1
        self._teacher_init = (teacher_init_share(t.ema, t.max_steps, self.step) if self._teacher_init is None
                              else self._teacher_init * momentum)
        out = {"loss": float(loss.detach()), "lr": lr, "momentum": momentum, "teacher_init": self._teacher_init}
        out.update({k: float(v) for k, v in logs.items()})
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    def fit(self, max_steps: int | None = None) -> list[dict[str, float]]:
        """Train until ``max_steps`` (default ``train.max_steps``); returns every step's logs.

        Every ``log_every`` steps rank 0 appends to ``metrics.jsonl``: loss,
        lr, EMA momentum, ``teacher_init`` (:func:`teacher_init_share`, the
        share of the target encoder that is still its initialisation), grad
        norm, ``tokens_per_s`` (context + target
        tokens of all ranks per second) and, per MoE layer ``i`` of the
        encoder, ``moe/i/load_max_mean``, ``moe/i/entropy`` and
        ``moe/i/dropped``.
        """
        t = self.cfg.train
        stop = t.max_steps if max_steps is None else max_steps
        history: list[dict[str, float]] = []
        bar = None
        from pipeline.core.progress import progress_enabled

        if self.progress and self.rank == 0 and progress_enabled():  # only on a terminal, not under --no-progress
            from tqdm.auto import tqdm

            bar = tqdm(total=stop, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True)
        tick = time.perf_counter()
        tokens = 0
        while self.step < stop:
            batch = self.next_batch()
            tokens += batch["x"].shape[0] * (batch["ctx_idx"].shape[1] + batch["tgt_idx"].shape[1]) * self.world
            logs = self.train_step(batch)
            crash_point("pretrain.step")
            history.append({"step": self.step, **logs})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if self.step % t.log_every == 0 or self.step == stop:
                elapsed = time.perf_counter() - tick
                self._log({"step": self.step, **logs, "tokens_per_s": tokens / max(elapsed, 1e-9), **moe_stats(self.model.encoder)})
                tick, tokens = time.perf_counter(), 0
            if t.checkpoint_every > 0 and (self.step % t.checkpoint_every == 0 or self.step == stop):
                self.save()
                crash_point("pretrain.checkpoint_saved")
        if bar is not None:
            bar.close()
        for warning in (collapse_warning(history), stale_teacher_warning(history, t.ema)):
            if warning and self.rank == 0:
                log.warning("%s: %s", self.run_dir, warning)
        return history

    def _log(self, record: dict[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` (rank 0)."""
        if self.rank != 0:
            return
        with open(RunLayout(self.run_dir).metrics, "a") as fh:
            fh.write(json.dumps(record) + "\n")


#: ``target_spread`` below which the encoder counts as collapsed (every token nearly the same vector;
#: at initialisation it is about 0.9).
COLLAPSE_SPREAD = 0.1


def collapse_warning(history: list[dict[str, float]], window: int = 20) -> str | None:
    """Words for the user when the last ``window`` steps' mean ``target_spread`` is below :data:`COLLAPSE_SPREAD`."""
    spreads = [h["target_spread"] for h in history[-window:] if "target_spread" in h]
    if not spreads or (spread := sum(spreads) / len(spreads)) >= COLLAPSE_SPREAD:
        return None
    return (f"the encoder has collapsed (target_spread {spread:.3f} < {COLLAPSE_SPREAD:g}: its tokens are nearly one "
            "vector, so a low JEPA loss says little); a predictor that carries content ([model] pred_distance_bias, "
            "3 in the cpu recipe), a slower teacher ([train] ema starting closer to 1, e.g. 0.9995) or [model] "
            "var_reg / cov_reg work against it")


#: ``teacher_init`` above which the target encoder counts as mostly untrained.
STALE_TEACHER_SHARE = 0.5


def stale_teacher_warning(history: list[dict[str, float]], ema: tuple[float, ...]) -> str | None:
    """Words for the user when the run ends with ``teacher_init`` above :data:`STALE_TEACHER_SHARE`.

    ``evaluate`` reads the EMA target encoder. When most of it is still its initialisation, a
    comparison with a randomly initialised encoder compares the initialisation with itself.
    """
    shares = [h["teacher_init"] for h in history if "teacher_init" in h]
    if not shares or shares[-1] <= STALE_TEACHER_SHARE:
        return None
    return (f"the target encoder, which 'neurocurate evaluate' reads, is still {shares[-1]:.0%} its random "
            f"initialisation after {int(history[-1]['step'])} steps: the EMA teacher ([train] ema = "
            f"{list(ema)}) barely followed the trained encoder; train longer or start the ema lower")


def _logged_step(line: str) -> float:
    """The step of one ``metrics.jsonl`` line; a line cut short by a kill counts as after every checkpoint."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")
