"""Typed, frozen pretraining configuration loaded from TOML.

A run is described by one :class:`PretrainConfig` made of small sections
(model, fMRI masking, structural masking, MoE, training). Named configs
(``tiny``, ``small``, ``base``) ship as ``pipeline/configs/pretrain_<name>.toml``;
:func:`load_pretrain_config` accepts either such a name or a path to a TOML
file. Loading goes through :func:`pipeline.core.config.from_dict`, so an unknown key
or a wrongly typed value is an error naming the file and the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from pipeline.core.config import ConfigError, from_dict

__all__ = [
    "AnatMaskConfig",
    "FMRIMaskConfig",
    "ModelConfig",
    "MoEConfig",
    "PretrainConfig",
    "TrainConfig",
    "load_pretrain_config",
    "named_configs",
    "resolve_states",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class ModelConfig:
    """Encoder / predictor sizes shared by both JEPA variants.

    ``modality`` picks the model: ``fmri`` (Brain-JEPA on ROI x time) or
    ``anat`` (Neuro-JEPA on MNI volumes). ``var_reg`` / ``cov_reg`` add VICReg's
    variance and covariance terms on the context encoder's tokens to the JEPA
    loss (:func:`pipeline.pretrain.vit.vicreg_terms`; 0 = plain I-JEPA), against
    representation collapse, which the ``target_spread`` training log shows. On
    ABIDE (benchmarks/README.md, issue 14) 1 : 0.04 kept the tokens apart but
    lowered the readouts that carry signal, so every shipped config has 0.
    ``pred_distance_bias`` > 0 biases the predictor's attention towards the
    context tokens positioned nearest to each token, with that initial slope
    (:class:`pipeline.pretrain.vit.Attention`); 0 = plain I-JEPA attention,
    with which a small predictor learnt only each position's mean target.
    """

    modality: Literal["fmri", "anat"] = "fmri"
    dim: int = 384
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    pred_dim: int = 192
    pred_depth: int = 4
    pred_heads: int = 4
    loss: Literal["smooth_l1", "l1", "mse"] = "smooth_l1"
    pred_distance_bias: float = 0.0
    var_reg: float = 0.0
    cov_reg: float = 0.0


@dataclass(frozen=True)
class FMRIMaskConfig:
    """Brain-JEPA input and spatiotemporal masking (``MaskCollator_fmri`` of Dong et al. 2024).

    Scales are (low, high) fractions drawn uniformly once per batch.
    ``obs_scale``: observation block, fraction of all ROIs and of all time
    patches; ``xroi_*``: cross-ROI (alpha) block, fraction of all ROIs and
    of all time patches (placed inside the observation window);
    ``edge_roi_scale``: cross-time (beta) ROIs as a fraction of the observed
    non-alpha ROIs and double-cross (gamma) ROIs as a fraction of the
    unobserved and alpha ROIs; ``edge_time_scale``: patches per time edge as
    a fraction of all patches (0 allowed: an empty edge block), drawn among
    the first / last ``edge_zone`` fraction of the patches (Brain-JEPA: 3 of
    10). ``gradient_dim`` gradient coordinates position the ROIs (Brain-JEPA: 30).
    """

    num_frames: int = 160
    patch: int = 16
    gradient_dim: int = 30
    obs_scale: tuple[float, ...] = (0.84, 0.84)
    xroi_roi_scale: tuple[float, ...] = (0.45, 0.6)
    xroi_time_scale: tuple[float, ...] = (0.2, 0.6)
    edge_roi_scale: tuple[float, ...] = (0.15, 0.3)
    edge_time_scale: tuple[float, ...] = (0.0, 0.4)
    edge_zone: float = 0.3


@dataclass(frozen=True)
class AnatMaskConfig:
    """Neuro-JEPA volume input, multiscale block masking and foreground weighting.

    Volumes are centre-cropped / zero-padded to ``volume_shape`` (a multiple of
    ``patch`` on every axis). ``block_scales`` are block edge lengths as a
    fraction of the token grid, drawn in turn until exactly
    ``round(target_ratio * tokens)`` target tokens are chosen.
    """

    volume_shape: tuple[int, ...] = (96, 112, 96)
    patch: int = 8
    target_ratio: float = 0.6
    block_scales: tuple[float, ...] = (0.15, 0.3, 0.5)
    percentiles: tuple[float, ...] = (2.0, 98.0)
    background_weight: float = 0.1


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts FFN used on alternating encoder blocks.

    ``router`` selects the routing rule (see :mod:`pipeline.pretrain.routers`).
    ``expert_hidden`` is each expert's hidden width; a dense FFN with the same
    active FLOPs has hidden ``(num_shared + top_k) * expert_hidden``.
    ``capacity_factor`` 0 means no token is ever dropped by token-choice
    routers; for ``expert_choice`` it sets each expert's capacity
    (1.0 = non-overlapping assignment of every token to exactly one expert).
    ``states`` (``state_experts``: one expert per state): empty by default, in which case
    ``neurocurate pretrain`` takes the tasks present in the training split of the index
    (:func:`resolve_states`); listed, they fix the experts' order and must cover those tasks.
    The resolved list is what a run's checkpoints and ``pretrain_config.toml`` record.
    ``bias_clip`` bounds the aux-loss-free balancing bias, which is added to routing probabilities
    (in [0, 1]): at 1 it can outweigh any probability gap; at the former 0.3 a router whose softmax
    saturated kept sending every token to one expert (load max/mean 4.0 of 4 on ABIDE, issue 14).
    """

    enabled: bool = True
    every: int = 2
    num_experts: int = 8
    num_shared: int = 1
    top_k: int = 2
    expert_hidden: int = 384
    routing_scale: float = 1.0
    router: Literal["topk", "subject_prior", "expert_choice", "state_experts"] = "topk"
    capacity_factor: float = 0.0
    balance: bool = True
    bias_update_rate: float = 0.001
    bias_clip: float = 1.0
    subject_slots: int = 4096
    subject_l2: float = 0.001
    hierarchical: bool = False
    states: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, checkpointing and logging."""

    batch_size: int = 16
    max_steps: int = 10000
    lr: float = 5e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 500
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.95)
    grad_clip: float = 1.0
    ema: tuple[float, ...] = (0.996, 1.0)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass(frozen=True)
class PretrainConfig:
    """A whole pretraining run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    fmri: FMRIMaskConfig = field(default_factory=FMRIMaskConfig)
    anat: AnatMaskConfig = field(default_factory=AnatMaskConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def named_configs() -> list[str]:
    """Names of the configs shipped with the package (``tiny``, ``small``, ``base``)."""
    return sorted(p.stem.removeprefix("pretrain_") for p in CONFIG_DIR.glob("pretrain_*.toml"))


def _validate(cfg: PretrainConfig, where: str) -> PretrainConfig:
    m, moe, f, a = cfg.model, cfg.moe, cfg.fmri, cfg.anat
    if m.dim % m.heads or m.pred_dim % m.pred_heads:
        raise ConfigError(f"{where}: model.dim / pred_dim must be divisible by heads / pred_heads")
    if m.dim % 2 or m.pred_dim % 2:
        raise ConfigError(f"{where}: model.dim and model.pred_dim must be even (half ROI, half time embedding)")
    if cfg.model.var_reg < 0 or cfg.model.cov_reg < 0:
        raise ConfigError(f"{where}: model.var_reg and model.cov_reg must be >= 0 (0 = off), "
                          f"got {cfg.model.var_reg} and {cfg.model.cov_reg}")
    if m.pred_distance_bias < 0:
        raise ConfigError(f"{where}: model.pred_distance_bias must be >= 0 (0 = off), got {m.pred_distance_bias}")
    if not 0.0 < f.edge_zone < 0.5:
        raise ConfigError(f"{where}: fmri.edge_zone must be in (0, 0.5), got {f.edge_zone}")
    if f.num_frames // max(f.patch, 1) < 3:
        raise ConfigError(f"{where}: fmri.num_frames / fmri.patch must give at least 3 time patches")
    if f.num_frames % f.patch:
        raise ConfigError(f"{where}: fmri.num_frames ({f.num_frames}) must be a multiple of fmri.patch ({f.patch})")
    if any(s % a.patch for s in a.volume_shape):
        raise ConfigError(f"{where}: anat.volume_shape {a.volume_shape} must be multiples of anat.patch ({a.patch})")
    if not 0.0 < a.target_ratio < 1.0:
        raise ConfigError(f"{where}: anat.target_ratio must be in (0, 1)")
    if moe.enabled:
        if moe.router == "state_experts":
            if moe.top_k < 1 or (moe.states and moe.top_k > len(moe.states)):
                raise ConfigError(f"{where}: moe.top_k = {moe.top_k} but the state_experts router has "
                                  f"{len(moe.states)} expert(s), one per state {list(moe.states)}; "
                                  f"set 1 <= moe.top_k <= {len(moe.states)}")
            if len(set(moe.states)) != len(moe.states):
                raise ConfigError(f"{where}: moe.states lists a state twice: {list(moe.states)}")
        elif moe.router != "expert_choice" and not 1 <= moe.top_k <= moe.num_experts:
            raise ConfigError(f"{where}: moe.top_k must be between 1 and moe.num_experts")
        if moe.every < 1:
            raise ConfigError(f"{where}: moe.every must be >= 1")
    lengths = {
        "anat.volume_shape": (a.volume_shape, 3),
        "anat.block_scales": (a.block_scales, None),
        "anat.percentiles": (a.percentiles, 2),
        "train.betas": (cfg.train.betas, 2),
        "train.ema": (cfg.train.ema, 2),
        **{f"fmri.{n}": (getattr(f, n), 2) for n in ("obs_scale", "xroi_roi_scale", "xroi_time_scale", "edge_roi_scale", "edge_time_scale")},
    }
    for key, (value, n) in lengths.items():
        if (n is not None and len(value) != n) or len(value) == 0:
            raise ConfigError(f"{where}: {key} must have {n or 'at least 1'} value(s), got {list(value)}")
    for name in ("obs_scale", "xroi_roi_scale", "xroi_time_scale", "edge_roi_scale", "edge_time_scale"):
        lo, hi = getattr(f, name)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"{where}: fmri.{name} must satisfy 0 <= low <= high <= 1, got {(lo, hi)}")
    return cfg


def load_pretrain_config(name_or_path: str | Path) -> PretrainConfig:
    """Load a named config (``tiny``/``small``/``base``) or a TOML file.

    Raises
    ------
    ConfigError
        Unknown name, missing file, invalid TOML, unknown key, wrong type or
        inconsistent sizes; the message names the file.
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"pretrain_{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(f"{name_or_path}: no such named config; known: {named_configs()}")
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return _validate(from_dict(PretrainConfig, data, where=str(path)), str(path))


def config_from_dict(data: dict, where: str = "config") -> PretrainConfig:
    """Build and validate a :class:`PretrainConfig` from a nested mapping (tests, overrides)."""
    return _validate(from_dict(PretrainConfig, data, where=where), where)


def resolve_states(cfg: PretrainConfig, tasks, where: str) -> PretrainConfig:
    """``cfg`` with the ``state_experts`` router's states taken from the training data, validated against ``top_k``.

    Parameters
    ----------
    cfg : PretrainConfig
        Loaded config; returned unchanged unless the MoE uses the ``state_experts`` router.
    tasks : iterable of str
        The ``task`` of every training sample (the index's task column of the training split).
    where : str
        What to name in an error (the index the tasks came from).

    Raises
    ------
    ConfigError
        No task labels, a task missing from an explicit ``moe.states``, or ``moe.top_k`` larger than the
        number of state experts; raised before any model is built.
    """
    moe = cfg.moe
    if not moe.enabled or moe.router != "state_experts":
        return cfg
    present = sorted({str(t) for t in tasks if t is not None and str(t) not in ("", "nan")})
    if moe.states:
        missing = [t for t in present if t not in moe.states]
        if missing:
            raise ConfigError(f"{where}: task(s) {missing} of the training split are not in moe.states "
                              f"{list(moe.states)}; list them or leave moe.states empty to take the index's tasks")
        states = tuple(moe.states)
    else:
        if not present:
            raise ConfigError(f"{where}: the state_experts router needs the index's task column, but no sample of "
                              "the training split has a task")
        states = tuple(present)
    if not 1 <= moe.top_k <= len(states):
        raise ConfigError(f"{where}: moe.top_k = {moe.top_k} but the state_experts router has {len(states)} expert(s), "
                          f"one per task of the training split {list(states)}; set moe.top_k <= {len(states)}")
    return replace(cfg, moe=replace(moe, states=states))
