"""Mixture-of-Experts feed-forward layer and auxiliary-loss-free balancing.

Shape legend: B samples, N tokens per sample, T = B*N tokens, D model width,
H expert hidden width, E experts, C tokens per expert (padded), A assignments.

Dispatch sorts the assignments by expert, scatters the tokens into a padded
``[E, C, D]`` buffer and runs every expert at once with two batched matmuls;
outputs are weighted by the gates and summed back per token with
``index_add_``. No Python loop touches individual tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.pretrain.config import MoEConfig
from pipeline.pretrain.routers import Routing, build_router

__all__ = ["FeedForward", "MoE", "bias_update", "moe_layers", "moe_stats", "update_router_biases"]


class FeedForward(nn.Module):
    """Dense GELU MLP (also the shared experts and the dense baseline)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x_BND: torch.Tensor, meta: dict | None = None) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BND)))


class MoE(nn.Module):
    """Shared experts (always active) plus routed experts.

    Parameters
    ----------
    dim : int
        Model width D.
    num_experts : int
        Routed experts E in this layer.
    cfg : MoEConfig
        Router kind, top-k, expert width, capacity, shared experts.
    """

    def __init__(self, dim: int, num_experts: int, cfg: MoEConfig):
        super().__init__()
        H = cfg.expert_hidden
        self.num_experts = num_experts
        self.router = build_router(dim, num_experts, cfg)
        self.w1_EDH = nn.Parameter(torch.randn(num_experts, dim, H) * (1.0 / math.sqrt(dim)))
        self.b1_EH = nn.Parameter(torch.zeros(num_experts, 1, H))
        self.w2_EHD = nn.Parameter(torch.randn(num_experts, H, dim) * (1.0 / math.sqrt(H)))
        self.shared = FeedForward(dim, cfg.num_shared * H) if cfg.num_shared > 0 else None
        # Token-choice capacity; 0 keeps every assignment (no drops).
        self.capacity_factor = cfg.capacity_factor if cfg.router != "expert_choice" else 0.0
        self.top_k = cfg.top_k
        self.last_stats: dict[str, torch.Tensor] = {}
        self.last_load_E = torch.zeros(num_experts)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x_BND: torch.Tensor, meta: dict[str, torch.Tensor]) -> torch.Tensor:
        B, N, D = x_BND.shape
        x_TD = x_BND.reshape(B * N, D)
        routing = self.router(x_TD, meta)
        self.aux_loss = routing.aux_loss
        y_TD = self._dispatch(x_TD, routing)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.reshape(B, N, D)

    def _dispatch(self, x_TD: torch.Tensor, r: Routing) -> torch.Tensor:
        T, D = x_TD.shape
        E = self.num_experts
        order_A = torch.argsort(r.expert_A, stable=True)
        token_A, expert_A, gate_A = r.token_A[order_A], r.expert_A[order_A], r.gate_A[order_A]
        counts_E = torch.bincount(expert_A, minlength=E)
        offsets_E = torch.cumsum(counts_E, 0) - counts_E
        pos_A = torch.arange(expert_A.numel(), device=x_TD.device) - offsets_E[expert_A]
        if self.capacity_factor > 0:
            C = max(1, math.ceil(self.capacity_factor * T * self.top_k / E))
            keep_A = pos_A < C
            token_A, expert_A, gate_A, pos_A = token_A[keep_A], expert_A[keep_A], gate_A[keep_A], pos_A[keep_A]
        else:
            C = max(1, int(counts_E.max()))
        buf_ECD = x_TD.new_zeros(E, C, D)
        buf_ECD = buf_ECD.index_put((expert_A, pos_A), x_TD[token_A])
        h_ECH = F.gelu(torch.bmm(buf_ECD, self.w1_EDH.to(buf_ECD.dtype)) + self.b1_EH.to(buf_ECD.dtype))
        out_ECD = torch.bmm(h_ECH, self.w2_EHD.to(h_ECH.dtype))
        y_AD = out_ECD[expert_A, pos_A] * gate_A[:, None].to(out_ECD.dtype)
        y_TD = x_TD.new_zeros(T, D, dtype=y_AD.dtype).index_add_(0, token_A, y_AD)
        self._record(r, expert_A, token_A, T)
        return y_TD.to(x_TD.dtype)

    @torch.no_grad()
    def _record(self, r: Routing, expert_A: torch.Tensor, token_A: torch.Tensor, T: int) -> None:
        load_E = torch.bincount(expert_A, minlength=self.num_experts).float()
        p_TE = r.probs_TE.detach().float()
        entropy = -(p_TE * p_TE.clamp_min(1e-12).log()).sum(-1).mean()
        served_T = torch.bincount(token_A, minlength=T) > 0
        self.last_load_E = load_E
        self.last_stats = {
            "load_max_mean": load_E.max() / load_E.mean().clamp_min(1e-9),
            "entropy": entropy,
            "dropped": (~served_T).float().sum(),
        }


def moe_layers(module: nn.Module) -> list[MoE]:
    """All MoE layers of ``module`` in definition order."""
    return [m for m in module.modules() if isinstance(m, MoE)]


def moe_stats(module: nn.Module, prefix: str = "moe") -> dict[str, float]:
    """Latest per-layer expert load (max/mean), routing entropy and dropped tokens."""
    out: dict[str, float] = {}
    for i, layer in enumerate(moe_layers(module)):
        for key, value in layer.last_stats.items():
            out[f"{prefix}/{i}/{key}"] = float(value)
    return out


def bias_update(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float, clip: float) -> torch.Tensor:
    """New balancing bias from the token counts of one step.

    ``error = mean(count) - count``; the correction is token-averaged
    (``error / mean(count)``), scaled by ``rate``, projected to zero mean so
    the biases cannot drift together, and clipped to ``[-clip, clip]``.
    """
    counts_E = counts_E.float()
    mean = counts_E.mean()
    if mean <= 0:
        return bias_E.clone()
    correction_E = (mean - counts_E) / mean
    new_E = bias_E + rate * correction_E
    new_E = new_E - new_E.mean()
    return new_E.clamp(-clip, clip)


@torch.no_grad()
def update_router_biases(module: nn.Module, rate: float, clip: float, enabled: bool = True) -> None:
    """Apply :func:`bias_update` to every balanced router after an optimizer step.

    Counts of all layers are all-reduced across ranks in one call so every
    rank applies the same update; the counts are then reset.
    """
    routers = [m.router for m in moe_layers(module) if getattr(m.router, "balanced", False)]
    if not routers:
        return
    counts = torch.cat([r.counts_E for r in routers])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    offset = 0
    for r in routers:
        E = r.num_experts
        if enabled:
            r.bias_E.copy_(bias_update(r.bias_E, counts[offset : offset + E], rate, clip))
        r.counts_E.zero_()
        offset += E
