"""Frozen target-encoder embeddings of shard samples, cached on disk, with routing statistics.

Shape legend: N samples, R ROIs, T frames, W windows, L tokens, P time patches
per window (L = R * P for fMRI), D encoder width, E experts, k gradient coordinates.

A pretraining ``RUN_DIR`` (``neurocurate pretrain``) holds ``checkpoints/step-*.pt``
whose payload carries the model weights (EMA target encoder included) and the
resolved config. :func:`load_encoder` rebuilds the model from that config and
returns the frozen target encoder; ``random_init=True`` gives an untrained
encoder of the same architecture (the random-encoder baseline).

Inputs are prepared by the run's own mask collator, so evaluation sees exactly
what pretraining saw: fMRI windows of ``fmri.num_frames`` frames z-scored per
ROI, positioned by the *run's* gradient coordinates (supplied by the caller,
see :func:`pipeline.evaluation.run.positioning_gradients`); volumes cropped to
``anat.volume_shape`` and percentile-scaled. A run longer than one window is
cut into windows that cover it (overlapping where needed, at most
``max_windows``) whose embeddings are averaged.

Embeddings: the mean over all tokens (``pooled_ND``) and, for the per-ROI
readouts and the attentive probe, per-ROI tokens averaged over time patches
(fMRI, ``[N, R, D]``) or the token grid average-pooled by 2 per axis
(volumes); for fMRI also the similarity structure of the ROIs' time-resolved
tokens (each ROI's ``[P, D]`` token sequence centred over time, cosine
similarity between ROIs, averaged over windows, Fisher z): the encoder's
analogue of a connectivity matrix, which time-pooled embeddings lose.

Routing: forward hooks on every MoE router of the target encoder count, per
MoE layer, how many tokens of each ROI went to each expert (``[R, E]``; for
volumes a single row).
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import atomic_path
from pipeline.core.layout import RunLayout, ShardsLayout
from pipeline.core.errors import InputError

__all__ = ["Embeddings", "LoadedEncoder", "ShardSamples", "embed_samples", "load_encoder", "read_shard_samples"]

log = logging.getLogger(__name__)


@dataclass
class LoadedEncoder:
    """A frozen encoder and what it came from."""

    cfg: Any  # PretrainConfig
    encoder: Any  # torch.nn.Module (the JEPA target encoder)
    checkpoint: Path | None
    step: int
    random_init: bool


@dataclass
class ShardSamples:
    """Samples of one store read into memory, in index order.

    ``data`` holds ``[R, T]`` float32 series (fMRI) or ``[X, Y, Z]`` volumes
    (anat); ``index`` is the matching slice of ``index.parquet``.
    """

    kind: str
    store: str
    roi_names: list[str]
    gradients_Rk: np.ndarray | None
    data: list[np.ndarray]
    index: Any  # pandas.DataFrame
    fingerprint: str
    atlas: str = ""


@dataclass
class Embeddings:
    """Encoder outputs of :class:`ShardSamples`, row-aligned with its index."""

    pooled_ND: np.ndarray
    tokens_NRD: np.ndarray
    routing: list[np.ndarray] = field(default_factory=list)  # per MoE layer: [R, E] token counts
    # fMRI: upper-triangle Fisher-z similarities between the ROIs' time-resolved token sequences, [N, R(R-1)/2]
    token_similarity_NF: np.ndarray | None = None


def load_encoder(run_dir: str | Path, *, checkpoint: str | Path | None = None, random_init: bool = False,
                 seed: int = 0) -> LoadedEncoder:
    """Rebuild the model of a pretraining run and return its frozen target encoder.

    Parameters
    ----------
    run_dir : path-like
        ``RUN_DIR`` of ``neurocurate pretrain``.
    checkpoint : path-like, optional
        A specific checkpoint; default the newest in ``RUN_DIR/checkpoints``.
    random_init : bool
        Return a freshly initialised encoder of the same architecture instead.
    seed : int
        Torch seed of the random initialisation.

    Raises
    ------
    InputError
        When the run has no checkpoint or the weights do not fit the config.
    """
    import torch

    from pipeline.pretrain.checkpoint import latest_checkpoint, load_checkpoint
    from pipeline.pretrain.config import config_from_dict
    from pipeline.pretrain.train import build_model

    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise InputError(RunLayout(run_dir).checkpoints_dir, "no checkpoint in this run folder; run 'neurocurate pretrain' first")
    payload = load_checkpoint(path)
    try:
        cfg = config_from_dict(payload["config"], where=f"{path}:config")
    except Exception as exc:  # ConfigError and friends: the checkpoint's config is unusable
        raise InputError(path, f"checkpoint config is invalid ({exc})") from None
    torch.manual_seed(seed)
    model = build_model(cfg)
    if not random_init:
        try:
            model.load_state_dict(payload["model"])
        except RuntimeError as exc:
            raise InputError(path, f"weights do not match the model of its config ({str(exc).splitlines()[0]})") from None
    encoder = model.target_encoder
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return LoadedEncoder(cfg, encoder, path, int(payload["step"]), random_init)


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def read_shard_samples(shards_dir: str | Path, target: str | None, *, store: str | None = None) -> ShardSamples:
    """Read every sample of a store that has a ``target`` label, unnormalised, in index order.

    Parameters
    ----------
    shards_dir : path-like
        Folder with ``index.parquet``.
    target : str or None
        Label column that must be present (``None`` keeps every sample).
    store : str, optional
        Store name; default the only fMRI store.
    """
    from pipeline.core.config import LoaderConfig
    from pipeline.store.loader import ShardDataset

    shards_dir = Path(shards_dir)
    try:
        probe = ShardDataset(shards_dir, LoaderConfig(window_length=0, normalization="none"), store=store, training=False)
    except ValueError as exc:  # the loader refuses an ambiguous or unknown store with a ValueError
        raise InputError(ShardsLayout(shards_dir).index, str(exc)) from None
    if target is not None and target not in probe.label_columns:
        raise InputError(ShardsLayout(shards_dir).index, f"no label column {target!r}; labels: {probe.label_columns}")
    # Volumes keep the loader's per-volume robust scaling (it needs no store statistics);
    # fMRI stays raw because the collator z-scores every window anyway.
    norm = "roi_robust" if probe.kind == "anat" else "none"
    ds = ShardDataset(shards_dir, LoaderConfig(window_length=0, normalization=norm, shuffle_buffer=1),
                      store=probe.store, training=False, shuffle=False,
                      require_labels=[target] if target else (), rank=0, world_size=1)
    by_id: dict[str, np.ndarray] = {}
    for sample in ds:
        x = sample["x"]
        if ds.kind == "fmri":
            by_id[sample["sample_id"]] = x[:, : int(sample["n_frames"])].numpy()
        else:
            by_id[sample["sample_id"]] = x[0].numpy()
    index = ds.index.reset_index(drop=True)
    data = [by_id[s] for s in index["sample_id"].astype(str)]
    grads = ds.gradients_Rk.numpy() if ds.gradients_Rk is not None else None
    fp = hashlib.sha256(("|".join(index["sample_id"].astype(str)) + _file_fingerprint(ShardsLayout(shards_dir).index)).encode()).hexdigest()
    return ShardSamples(ds.kind, ds.store, ds.roi_names, grads, data, index, fp, ds.atlas if ds.kind == "fmri" else "")


def _windows(x_RT: np.ndarray, T: int, max_windows: int) -> list[np.ndarray]:
    """Evenly spread ``T``-frame windows that cover the whole run (the run itself when shorter than ``T``).

    ``ceil(n / T)`` windows, overlapping where ``n`` is not a multiple of ``T``, so that every frame is
    seen, as the connectivity baselines see every frame (a 176-frame run in 96-frame windows is two
    windows, not the first 96 frames); at most ``max_windows``, evenly spread when a run needs more.
    """
    n = x_RT.shape[1]
    if n <= T:
        return [x_RT]
    count = min(max_windows, -(-n // T))
    starts = np.linspace(0, n - T, count).round().astype(int) if count > 1 else [(n - T) // 2]
    return [x_RT[:, s:s + T] for s in starts]


def _subject_meta(subjects: list[str], tasks: list[str], cfg) -> dict[str, Any]:
    # Same ids as the pretraining collator: crc32 of the subject label, state = index of the task.
    import torch

    states = {s: i for i, s in enumerate(cfg.moe.states)}
    return {
        "subject": torch.tensor([zlib.crc32(s.encode()) % cfg.moe.subject_slots for s in subjects], dtype=torch.long),
        "state": torch.tensor([states.get(t, -1) for t in tasks], dtype=torch.long),
    }


def _tasks(samples: ShardSamples) -> list[str]:
    if "task" not in samples.index:
        return [""] * len(samples.data)
    return samples.index["task"].fillna("").astype(str).tolist()


def _cache_key(enc: LoadedEncoder, samples: ShardSamples, gradients_Rk: np.ndarray | None, max_windows: int, seed: int) -> str:
    blob = json.dumps({
        "checkpoint": _file_fingerprint(enc.checkpoint) if enc.checkpoint else "",
        "random": enc.random_init, "seed": seed if enc.random_init else 0,
        "samples": samples.fingerprint, "store": samples.store, "max_windows": max_windows,
        "gradients": hashlib.sha256(np.ascontiguousarray(gradients_Rk).tobytes()).hexdigest() if gradients_Rk is not None else "",
        "version": 3,  # 3: windows cover the whole run
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def embed_samples(enc: LoadedEncoder, samples: ShardSamples, *, gradients_Rk: np.ndarray | None = None,
                  max_windows: int = 8, batch_size: int = 16, cache_dir: str | Path | None = None,
                  seed: int = 0) -> Embeddings:
    """Embed every sample with the frozen encoder (cached in ``cache_dir`` when given).

    Parameters
    ----------
    enc : LoadedEncoder
    samples : ShardSamples
        From :func:`read_shard_samples` (fMRI stores need ``enc.cfg.model.modality == "fmri"``).
    gradients_Rk : array, optional
        ROI gradient coordinates the run was trained with (fMRI); ``None``
        falls back to the collator's cosine code of the ROI index.
    """
    modality = enc.cfg.model.modality
    if modality != samples.kind:
        raise InputError(samples.store, f"store holds {samples.kind} data but the run's model is {modality}")
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"embeddings-{_cache_key(enc, samples, gradients_Rk, max_windows, seed)}.npz"
        if cache_path.is_file():
            with np.load(cache_path) as z:
                n_layers = int(z["n_layers"])
                return Embeddings(z["pooled"], z["tokens"], [z[f"routing{i}"] for i in range(n_layers)],
                                  z["token_similarity"] if "token_similarity" in z.files else None)
    emb = _embed_fmri(enc, samples, gradients_Rk, max_windows, batch_size, seed) if modality == "fmri" \
        else _embed_anat(enc, samples, batch_size, seed)
    if cache_path is not None:
        with atomic_path(cache_path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                extra = {"token_similarity": emb.token_similarity_NF} if emb.token_similarity_NF is not None else {}
                np.savez(fh, pooled=emb.pooled_ND, tokens=emb.tokens_NRD, n_layers=len(emb.routing),
                         **{f"routing{i}": r for i, r in enumerate(emb.routing)}, **extra)
    return emb


class _RoutingCounter:
    """Forward hooks on the MoE routers accumulating ``[groups, E]`` token counts per layer."""

    def __init__(self, encoder, n_groups: int):
        from pipeline.pretrain.moe import moe_layers

        self.layers = moe_layers(encoder)
        self.counts = [np.zeros((n_groups, m.num_experts), dtype=np.int64) for m in self.layers]
        self.group_of_L: np.ndarray | None = None
        self.handles = [m.router.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, inputs, routing):
            L = len(self.group_of_L)
            group_A = self.group_of_L[routing.token_A.cpu().numpy() % L]
            np.add.at(self.counts[i], (group_A, routing.expert_A.cpu().numpy()), 1)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _embed_fmri(enc: LoadedEncoder, samples: ShardSamples, gradients_Rk, max_windows: int, batch_size: int,
                seed: int) -> Embeddings:
    import torch

    from pipeline.pretrain.masks import FMRICollator

    cfg = enc.cfg
    T, patch = cfg.fmri.num_frames, cfg.fmri.patch
    collator = FMRICollator(cfg.fmri, cfg.moe, seed)
    R = samples.data[0].shape[0] if samples.data else 0
    P = T // patch
    counter = _RoutingCounter(enc.encoder, R)
    counter.group_of_L = np.repeat(np.arange(R), P)  # tokens are ROI-major
    items: list[tuple[int, np.ndarray]] = [(i, w) for i, x in enumerate(samples.data) for w in _windows(x, T, max_windows)]
    D = cfg.model.dim
    pooled = np.zeros((len(samples.data), D))
    tokens = np.zeros((len(samples.data), R, D))
    sim = np.zeros((len(samples.data), R, R))
    n_win = np.zeros(len(samples.data))
    subjects = samples.index["subject"].astype(str).tolist()
    tasks = _tasks(samples)
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for s in range(0, len(items), batch_size):
                chunk = items[s:s + batch_size]
                batch_samples = [{"x": torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), "subject": subjects[i],
                                  "task": tasks[i], **({"gradients": torch.from_numpy(gradients_Rk)} if gradients_Rk is not None else {})}
                                 for i, w in chunk]
                batch = collator(batch_samples, 0)
                meta = _subject_meta([subjects[i] for i, _ in chunk], [tasks[i] for i, _ in chunk], cfg)
                h_BLD = enc.encoder({"x": batch["x"], "gradients": batch["gradients"]}, None, meta).float()
                h_BRPD = h_BLD.reshape(len(chunk), R, P, D)
                z_BRF = (h_BRPD - h_BRPD.mean(2, keepdim=True)).reshape(len(chunk), R, P * D)
                z_BRF = z_BRF / z_BRF.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                sim_BRR = (z_BRF @ z_BRF.transpose(1, 2)).numpy()
                for (i, _), h_RPD, s_RR in zip(chunk, h_BRPD.numpy(), sim_BRR):
                    pooled[i] += h_RPD.mean((0, 1))
                    tokens[i] += h_RPD.mean(1)
                    sim[i] += s_RR
                    n_win[i] += 1
    finally:
        counter.close()
    pooled /= n_win[:, None]
    tokens /= n_win[:, None, None]
    iu = np.triu_indices(R, k=1)
    token_sim = np.arctanh(np.clip((sim / n_win[:, None, None])[:, iu[0], iu[1]], -0.999999, 0.999999))
    return Embeddings(pooled.astype(np.float32), tokens.astype(np.float32), counter.counts, token_sim.astype(np.float32))


def _embed_anat(enc: LoadedEncoder, samples: ShardSamples, batch_size: int, seed: int) -> Embeddings:
    import torch
    import torch.nn.functional as F

    from pipeline.pretrain.masks import AnatCollator

    cfg = enc.cfg
    collator = AnatCollator(cfg.anat, cfg.moe, seed)
    grid = tuple(s // cfg.anat.patch for s in cfg.anat.volume_shape)
    counter = _RoutingCounter(enc.encoder, 1)
    counter.group_of_L = np.zeros(int(np.prod(grid)), dtype=np.int64)
    subjects = samples.index["subject"].astype(str).tolist()
    tasks = _tasks(samples)
    pooled, tokens = [], []
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for s in range(0, len(samples.data), batch_size):
                vols = samples.data[s:s + batch_size]
                batch = collator([{"x": torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[None], "subject": sub}
                                  for v, sub in zip(vols, subjects[s:s + batch_size])], 0)
                meta = _subject_meta(subjects[s:s + batch_size], tasks[s:s + batch_size], cfg)
                h_BLD = enc.encoder({"x": batch["x"]}, None, meta).float()
                B, L, D = h_BLD.shape
                pooled.append(h_BLD.mean(1).numpy())
                h_BDXYZ = h_BLD.transpose(1, 2).reshape(B, D, *grid)
                tokens.append(F.avg_pool3d(h_BDXYZ, 2, ceil_mode=True).flatten(2).transpose(1, 2).numpy())
    finally:
        counter.close()
    return Embeddings(np.concatenate(pooled).astype(np.float32), np.concatenate(tokens).astype(np.float32), counter.counts)
