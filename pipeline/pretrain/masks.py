"""Mask collators: turn a list of loader samples into a batch with JEPA masks.

Shape legend: B samples, R ROIs, T time points, N time patches, L tokens,
C context tokens, M target tokens, k gradient coordinates, X/Y/Z voxels.

Masks are drawn in the collator (as in V-JEPA) from a generator seeded by
``(seed, step)``, so the masks of step ``s`` are the same whether or not the
run was interrupted before it. Block sizes are drawn once per batch, block
positions per sample; a group whose size depends on the sample (fMRI beta /
gamma / context) is cut to the batch's smallest count by a random subset, so
the index tensors stack.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.pretrain.config import AnatMaskConfig, FMRIMaskConfig, MoEConfig

__all__ = ["TARGET_GROUPS", "AnatCollator", "FMRICollator", "edge_zone_patches", "fmri_block_sizes", "fmri_mask_groups",
           "fmri_masks", "multiscale_block_mask"]


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(1, generator=g).item()


def _randint(g: torch.Generator, high: int) -> int:
    """Uniform integer in ``[0, high)``."""
    return int(torch.randint(0, max(high, 1), (1,), generator=g).item())


def _subject_id(subject: Any, slots: int) -> int:
    # crc32 is stable across processes and runs, unlike hash().
    return zlib.crc32(str(subject).encode()) % slots


class _Meta:
    """Subject and state ids used by the subject_prior / state_experts routers."""

    def __init__(self, moe: MoEConfig):
        self.slots = moe.subject_slots
        self.states = {s: i for i, s in enumerate(moe.states)}

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        subject = [_subject_id(s.get("subject", ""), self.slots) for s in samples]
        state = [self.states.get(str(s.get("task", "")), -1) for s in samples]
        return {"subject": torch.tensor(subject, dtype=torch.long), "state": torch.tensor(state, dtype=torch.long)}


def _count(size: int, lo: float, hi: float, u: float) -> int:
    """``int(size * scale)`` for a scale ``u`` in ``[lo, hi]``, at least 1 when ``lo > 0`` (and ``size > 0``)."""
    n = int(size * (lo + (hi - lo) * u))
    return max(n, 1 if lo > 0 and size > 0 else 0)


def edge_zone_patches(N: int, cfg: FMRIMaskConfig) -> int:
    """Time patches at each end of the window from which cross-time / double-cross patches are drawn.

    ``round(edge_zone * N)`` (Brain-JEPA: 3 of 10), at least 1 and at most
    ``(N - 1) // 2`` so the middle patch always stays in the context.
    """
    return max(1, min(round(cfg.edge_zone * N), (N - 1) // 2))


def fmri_block_sizes(g: torch.Generator, R: int, N: int, cfg: FMRIMaskConfig) -> dict[str, float | int]:
    """Block sizes shared by a batch, drawn as in Brain-JEPA's ``MaskCollator_fmri``.

    Keys: ``obs_r``/``obs_t`` observation block (ROIs, time patches),
    ``a_r``/``a_t`` cross-ROI (alpha) block, ``left``/``right`` edge time
    patches (possibly 0 when ``edge_time_scale`` starts at 0), and
    ``u_left``/``u_right`` the edge ROI fractions; the cross-time (beta)
    and double-cross (gamma) ROI counts of a side are that fraction of the
    sample's own candidate sets (see :func:`fmri_masks`).
    """
    if R < 2 or N < 3:
        raise ValueError(f"fMRI masking needs at least 2 ROIs and 3 time patches, got {R} x {N}")
    obs_r = min(R, max(2, int(_uniform(g, *cfg.obs_scale) * R)))
    obs_t = min(N, max(3, int(_uniform(g, *cfg.obs_scale) * N)))
    a_r = min(obs_r - 1, max(1, int(_uniform(g, *cfg.xroi_roi_scale) * R)))
    a_t = min(obs_t - 1, max(1, int(_uniform(g, *cfg.xroi_time_scale) * N)))
    zone = edge_zone_patches(N, cfg)
    sizes: dict[str, float | int] = {"obs_r": obs_r, "obs_t": obs_t, "a_r": a_r, "a_t": a_t, "zone": zone}
    for side in ("left", "right"):
        sizes[f"u_{side}"] = torch.rand(1, generator=g).item()
        sizes[side] = min(zone, _count(N, *cfg.edge_time_scale, torch.rand(1, generator=g).item()))
    return sizes


def _grid_idx(rois: torch.Tensor, times: torch.Tensor, N: int) -> torch.Tensor:
    return (rois[:, None] * N + times[None, :]).reshape(-1)


def _pick(g: torch.Generator, pool: torch.Tensor, n: int) -> torch.Tensor:
    return pool[torch.randperm(pool.numel(), generator=g)[:n]].sort().values


def fmri_mask_groups(g: torch.Generator, R: int, N: int, sz: dict, cfg: FMRIMaskConfig) -> dict[str, torch.Tensor]:
    """Token indices of one sample per mask group (Brain-JEPA spatiotemporal masking).

    * observation block: ``obs_r`` random ROIs ``O`` x ``obs_t`` consecutive time patches ``W``;
    * ``alpha`` (cross-ROI): ``a_r`` ROIs ``A`` drawn from *all* ROIs x ``a_t``
      consecutive patches inside ``W``; ``A`` is removed from the context;
    * per side, ``left``/``right`` patches drawn among the first/last
      ``zone`` patches of the window (edge blocks may be empty): ``beta``
      (cross-time) ROIs from ``O - A``, ``gamma`` (double-cross) ROIs from
      the unobserved ROIs together with ``A``, each the side's fraction
      ``u`` of ``edge_roi_scale`` of its candidate set; the context loses
      those patches for every ROI;
    * ``context``: ``(O - A)`` x (``W`` minus the edge patches).

    The context is disjoint from every target group; beta and gamma are
    disjoint; alpha and gamma may share tokens (as in Brain-JEPA).
    """
    perm = torch.randperm(R, generator=g)
    obs, unobs = perm[: sz["obs_r"]], perm[sz["obs_r"]:]
    alpha = torch.randperm(R, generator=g)[: sz["a_r"]]
    keep = ~torch.isin(obs, alpha)
    ctx_rois = obs[keep].sort().values
    gamma_pool = torch.cat([unobs, alpha]).unique()
    t0 = _randint(g, N - sz["obs_t"] + 1)
    a0 = t0 + _randint(g, sz["obs_t"] - sz["a_t"] + 1)
    out = {"alpha": _grid_idx(alpha.sort().values, torch.arange(a0, a0 + sz["a_t"]), N)}
    edge_cols = []
    zone = int(sz["zone"])
    for side in ("left", "right"):
        first = 0 if side == "left" else N - zone
        cols = (first + torch.randperm(zone, generator=g)[: int(sz[side])]).sort().values
        edge_cols.append(cols)
        lo, hi = cfg.edge_roi_scale
        u = float(sz[f"u_{side}"])
        beta = _pick(g, ctx_rois, _count(ctx_rois.numel(), lo, hi, u))
        gamma = _pick(g, gamma_pool, _count(gamma_pool.numel(), lo, hi, u))
        out[f"beta_{side}"] = _grid_idx(beta, cols, N)
        out[f"gamma_{side}"] = _grid_idx(gamma, cols, N)
    window = torch.arange(t0, t0 + sz["obs_t"])
    inner = window[~torch.isin(window, torch.cat(edge_cols))]
    out["context"] = _grid_idx(ctx_rois, inner, N)
    return out


TARGET_GROUPS = ("alpha", "beta_left", "gamma_left", "beta_right", "gamma_right")


def _equalise(g: torch.Generator, groups: list[dict[str, torch.Tensor]], name: str) -> list[torch.Tensor]:
    """Random subsets of each sample's group of the batch's smallest size (Brain-JEPA truncates to it)."""
    n = min(grp[name].numel() for grp in groups)
    return [grp[name][torch.randperm(grp[name].numel(), generator=g)[:n]].sort().values for grp in groups]


def fmri_masks(g: torch.Generator, R: int, N: int, sz: dict, cfg: FMRIMaskConfig | None = None,
               batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Context ``[B, C]`` and target ``[B, M]`` indices of ``batch`` samples, and the target count per group.

    Candidate sets differ between samples (how many alpha ROIs fall in the
    observation block), so each group is cut to the batch's smallest count
    by a random subset; the counts of a group are then equal across the batch.
    """
    cfg = cfg or FMRIMaskConfig()
    groups = [fmri_mask_groups(g, R, N, sz, cfg) for _ in range(batch)]
    ctx = torch.stack(_equalise(g, groups, "context"))
    parts = [_equalise(g, groups, name) for name in TARGET_GROUPS]
    tgt = torch.stack([torch.cat([p[b] for p in parts]) for b in range(batch)])
    counts = {name: int(p[0].numel()) for name, p in zip(TARGET_GROUPS, parts)}
    return ctx, tgt, counts


class FMRICollator:
    """Batch fMRI samples ``{"x": [R, T], "gradients": [R, k]?, "subject", "task"?}`` with masks.

    Each ROI series is cropped at a random start (or linearly resampled when
    shorter) to ``num_frames`` and z-scored per ROI over the window
    (zero-variance ROIs become 0). This per-window normalisation is the
    model's only one: it removes the scanner- and site-dependent amplitude
    and keeps the ROI-to-ROI coupling (what connectivity measures). It is
    invariant to any per-ROI affine scaling, so the store's robust
    ``(x - median) / IQR`` statistics cannot change what the model sees; the
    fMRI pretraining and evaluation read the shards with
    ``normalization="none"`` (see :func:`pipeline.pretrain.train.loader_config`).
    Without ``gradients`` the ROI coordinates fall back to a cosine code of
    the ROI index, which still distinguishes ROIs for any ROI count.
    """

    def __init__(self, cfg: FMRIMaskConfig, moe: MoEConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.meta = _Meta(moe)

    def _series(self, x_RT: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        T = self.cfg.num_frames
        if x_RT.shape[1] >= T:
            start = _randint(g, x_RT.shape[1] - T + 1)
            x_RT = x_RT[:, start : start + T]
        else:
            x_RT = F.interpolate(x_RT[None], size=T, mode="linear", align_corners=True)[0]
        mean_R1 = x_RT.mean(1, keepdim=True)
        std_R1 = x_RT.std(1, keepdim=True)
        return torch.where(std_R1 > 1e-8, (x_RT - mean_R1) / std_R1.clamp_min(1e-8), torch.zeros_like(x_RT))

    def _gradients(self, sample: dict, R: int) -> torch.Tensor:
        k = self.cfg.gradient_dim
        grad = sample.get("gradients")
        if grad is None:
            # Low-frequency cosine code of the ROI index: the first coordinate is
            # monotonic, so every ROI gets a distinct position for any R.
            r_R1 = (torch.arange(R, dtype=torch.float32)[:, None] + 0.5) / R
            return torch.cos(math.pi * r_R1 * torch.arange(1, k + 1, dtype=torch.float32)[None, :])
        grad_Rk = torch.as_tensor(grad, dtype=torch.float32)
        if grad_Rk.ndim != 2 or grad_Rk.shape[0] != R or grad_Rk.shape[1] < k:
            raise ValueError(f"sample {sample.get('subject', '?')}: gradients {tuple(grad_Rk.shape)} do not give {k} coordinates for {R} ROIs")
        return grad_Rk[:, :k]

    def __call__(self, samples: Sequence[dict], step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        # The loader zero-pads short runs and says how many frames are real.
        xs = [torch.as_tensor(s["x"], dtype=torch.float32)[..., : int(s.get("n_frames", 0)) or None] for s in samples]
        R = xs[0].shape[0]
        if any(x.ndim != 2 or x.shape[0] != R for x in xs):
            shapes = sorted({tuple(x.shape) for x in xs})
            raise ValueError(f"fMRI samples of one batch must share the ROI count, got shapes {shapes}")
        x_BRT = torch.stack([self._series(x, g) for x in xs])
        grad_BRk = torch.stack([self._gradients(s, R) for s in samples])
        N = self.cfg.num_frames // self.cfg.patch
        sizes = fmri_block_sizes(g, R, N, self.cfg)
        ctx_BC, tgt_BM, counts = fmri_masks(g, R, N, sizes, self.cfg, len(samples))
        self.last_sizes = {**sizes, **counts}  # for logging and tests
        return {"x": x_BRT, "gradients": grad_BRk, "ctx_idx": ctx_BC, "tgt_idx": tgt_BM, **self.meta(samples)}


def multiscale_block_mask(g: torch.Generator, grid: tuple[int, int, int], n_target: int, scales: Sequence[float]) -> torch.Tensor:
    """Boolean target mask over a token grid with exactly ``n_target`` tokens.

    Cuboid blocks with edges ``scale * grid`` are drawn cycling through the
    scales; each adds its not-yet-chosen tokens until the next one would
    overshoot, and then only a random subset of its new tokens is taken so
    the count is met exactly.
    """
    L = math.prod(grid)
    if not 0 < n_target < L:
        raise ValueError(f"target token count {n_target} must be in (0, {L})")
    chosen = torch.zeros(grid, dtype=torch.bool)
    count, i = 0, 0
    while count < n_target:
        if i >= 10_000:  # degenerate grids: finish with random tokens
            new = (~chosen).reshape(-1).nonzero().squeeze(1)
        else:
            scale = scales[i % len(scales)]
            edge = [max(1, round(scale * s)) for s in grid]
            corner = [_randint(g, s - e + 1) for s, e in zip(grid, edge)]
            block = torch.zeros(grid, dtype=torch.bool)
            block[tuple(slice(c, c + e) for c, e in zip(corner, edge))] = True
            new = (block & ~chosen).reshape(-1).nonzero().squeeze(1)
        need = n_target - count
        if new.numel() > need:
            new = new[torch.randperm(new.numel(), generator=g)[:need]]
        chosen.view(-1)[new] = True
        count += new.numel()
        i += 1
    return chosen.reshape(-1)


class AnatCollator:
    """Batch MNI volumes ``{"x": [1, X, Y, Z], "subject", ...}`` with multiscale block masks.

    Volumes are centre-cropped / zero-padded to ``volume_shape`` and scaled by
    their 2nd-98th percentiles. A token is background when none of its voxels
    lies strictly inside (p2, p98) of its scan; background targets get weight
    ``background_weight`` and weights are normalised to mean 1 per sample.
    """

    def __init__(self, cfg: AnatMaskConfig, moe: MoEConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.meta = _Meta(moe)

    def _fit(self, x_XYZ: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.cfg.volume_shape, dtype=torch.float32)
        src, dst = [], []
        for have, want in zip(x_XYZ.shape, self.cfg.volume_shape):
            n = min(have, want)
            s0, d0 = (have - n) // 2, (want - n) // 2
            src.append(slice(s0, s0 + n))
            dst.append(slice(d0, d0 + n))
        out[tuple(dst)] = x_XYZ[tuple(src)]
        return out

    def __call__(self, samples: Sequence[dict], step: int) -> dict[str, torch.Tensor]:
        from pipeline.pretrain.struct_jepa import patchify_3d

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        p, lo_q, hi_q = self.cfg.patch, self.cfg.percentiles[0] / 100, self.cfg.percentiles[1] / 100
        vols, fg = [], []
        for s in samples:
            x = torch.as_tensor(s["x"], dtype=torch.float32)
            if x.ndim == 4:
                x = x[0]
            if x.ndim != 3:
                raise ValueError(f"anat sample {s.get('subject', '?')}: expected [1, X, Y, Z], got {tuple(x.shape)}")
            x = self._fit(x)
            flat = x.reshape(-1)
            q = torch.quantile(flat[:: max(1, flat.numel() // 2_000_000)], torch.tensor([lo_q, hi_q]))
            inside = (x > q[0]) & (x < q[1])
            vols.append(((x - q[0]) / (q[1] - q[0]).clamp_min(1e-6)).clamp(-1.0, 2.0))
            fg.append(patchify_3d(inside[None].float(), p)[0].amax(-1) > 0)
        grid = tuple(s // p for s in self.cfg.volume_shape)
        L = math.prod(grid)
        n_target = round(self.cfg.target_ratio * L)
        ctx, tgt, weight = [], [], []
        for fg_L in fg:
            target_L = multiscale_block_mask(g, grid, n_target, self.cfg.block_scales)
            t_idx = target_L.nonzero().squeeze(1)
            w = torch.where(fg_L[t_idx], 1.0, self.cfg.background_weight)
            ctx.append((~target_L).nonzero().squeeze(1))
            tgt.append(t_idx)
            weight.append(w / w.mean())
        return {
            "x": torch.stack(vols)[:, None],
            "ctx_idx": torch.stack(ctx),
            "tgt_idx": torch.stack(tgt),
            "weight": torch.stack(weight),
            **self.meta(samples),
        }
