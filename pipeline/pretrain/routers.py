"""Routers for the Mixture-of-Experts FFN.

Every router maps tokens to a flat list of (token, expert, gate) assignments,
so one dispatch routine in :mod:`pipeline.pretrain.moe` serves them all.

Shape legend: T tokens (batch x sequence, flattened), D model width,
E experts, K experts per token, C tokens per expert, A assignments, B samples.

Routers
-------
``topk``
    Softmax scores times a routing scale; experts chosen by top-k of the
    scores plus a per-expert balancing bias (auxiliary-loss-free balancing as
    in Neuro-JEPA / DeepSeek-V3): the bias steers the choice only, the gate
    values use the unbiased scores.
``subject_prior``
    MIND's SADGate: token logits + a learned global expert prior + a learned
    per-subject bias, softmax, sparse top-k renormalised to sum 1; an L2
    penalty on the subject biases is returned as an auxiliary loss.
``expert_choice``
    MoRE-Brain: each expert takes its top-``capacity`` tokens. With capacity
    factor 1 the assignment is non-overlapping (experts pick in a random
    order among tokens not yet taken), so every token gets exactly one expert.
``state_experts``
    BrainMoE: one expert per cognitive state / task (``MoEConfig.states``);
    the expert of the sample's state (from the index's ``task``) is always
    selected and a learned router picks the remaining K-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.pretrain.config import MoEConfig

__all__ = [
    "ExpertChoiceRouter",
    "Routing",
    "StateExpertsRouter",
    "SubjectPriorRouter",
    "TopKRouter",
    "build_router",
]


@dataclass
class Routing:
    """Assignments of tokens to experts.

    Attributes
    ----------
    token_A, expert_A : LongTensor [A]
        Token and expert index of each assignment.
    gate_A : Tensor [A]
        Weight of the expert output for that token (carries gradients).
    probs_TE : Tensor [T, E]
        Routing distribution, for the entropy statistic.
    aux_loss : Tensor []
        Router regulariser (zero for routers without one).
    """

    token_A: torch.Tensor
    expert_A: torch.Tensor
    gate_A: torch.Tensor
    probs_TE: torch.Tensor
    aux_loss: torch.Tensor


class TopKRouter(nn.Module):
    """Token-choice top-k router with a balancing bias used for selection only."""

    balanced = True

    def __init__(self, dim: int, num_experts: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = cfg.top_k
        self.scale = cfg.routing_scale
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.post_init()
        # Balancing bias: changed by update_router_biases(), never by the optimizer.
        self.register_buffer("bias_E", torch.zeros(num_experts))
        # Token counts since the last bias update; rebuilt (zeros) on load.
        self.register_buffer("counts_E", torch.zeros(num_experts), persistent=False)

    def post_init(self) -> None:
        """Unit-variance logits at init so scores differ between tokens.

        With the ViT's 0.02 init every token gets almost the same scores, the
        balancing bias then moves all tokens at once and only rotates which
        expert is overloaded.
        """
        nn.init.normal_(self.gate.weight, std=self.gate.in_features**-0.5)

    def _probs(self, x_TD: torch.Tensor, meta: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits_TE = self.gate(x_TD).float()
        return logits_TE.softmax(-1), x_TD.new_zeros((), dtype=torch.float32)

    def _select(self, probs_TE: torch.Tensor, meta: dict[str, torch.Tensor]) -> torch.Tensor:
        return (probs_TE.detach() + self.bias_E).topk(self.top_k, dim=-1).indices

    def _gates(self, probs_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
        return probs_TE.gather(1, idx_TK) * self.scale

    def forward(self, x_TD: torch.Tensor, meta: dict[str, torch.Tensor]) -> Routing:
        T = x_TD.shape[0]
        probs_TE, aux = self._probs(x_TD, meta)
        idx_TK = self._select(probs_TE, meta)
        gate_TK = self._gates(probs_TE, idx_TK)
        if self.training:
            self.counts_E += torch.bincount(idx_TK.reshape(-1), minlength=self.num_experts).to(self.counts_E.dtype)
        token_A = torch.arange(T, device=x_TD.device).repeat_interleave(idx_TK.shape[1])
        return Routing(token_A, idx_TK.reshape(-1), gate_TK.reshape(-1), probs_TE, aux)


def _tokens_of(per_sample_B: torch.Tensor, T: int) -> torch.Tensor:
    """Broadcast a per-sample id to every token of its sample (tokens are sample-major)."""
    return per_sample_B.repeat_interleave(T // per_sample_B.shape[0], dim=0)


class SubjectPriorRouter(TopKRouter):
    """SADGate: token router + global expert prior + per-subject bias, renormalised top-k."""

    def __init__(self, dim: int, num_experts: int, cfg: MoEConfig):
        super().__init__(dim, num_experts, cfg)
        self.prior_E = nn.Parameter(torch.zeros(num_experts))
        self.subject_bias = nn.Embedding(cfg.subject_slots, num_experts)
        nn.init.zeros_(self.subject_bias.weight)
        self.l2 = cfg.subject_l2

    def _probs(self, x_TD, meta):
        T = x_TD.shape[0]
        subject_B = meta["subject"]
        sbias_BE = self.subject_bias(subject_B)
        logits_TE = self.gate(x_TD).float() + self.prior_E + _tokens_of(sbias_BE, T)
        aux = self.l2 * sbias_BE.pow(2).sum(-1).mean()
        return logits_TE.softmax(-1), aux

    def _gates(self, probs_TE, idx_TK):
        gate_TK = probs_TE.gather(1, idx_TK)
        return gate_TK / gate_TK.sum(-1, keepdim=True).clamp_min(1e-9) * self.scale


class StateExpertsRouter(TopKRouter):
    """One expert per cognitive state; the sample's own state expert is always chosen."""

    def _select(self, probs_TE, meta):
        T = probs_TE.shape[0]
        select_TE = probs_TE.detach() + self.bias_E
        state_T = _tokens_of(meta["state"], T)
        known_T = state_T >= 0
        forced_TE = F.one_hot(state_T.clamp_min(0), self.num_experts).bool() & known_T[:, None]
        select_TE = select_TE.masked_fill(forced_TE, float("inf"))
        return select_TE.topk(self.top_k, dim=-1).indices

    def _gates(self, probs_TE, idx_TK):
        gate_TK = probs_TE.gather(1, idx_TK)
        return gate_TK / gate_TK.sum(-1, keepdim=True).clamp_min(1e-9) * self.scale


class ExpertChoiceRouter(nn.Module):
    """Expert-choice routing: each expert takes its top-capacity tokens."""

    balanced = False

    def __init__(self, dim: int, num_experts: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = num_experts
        self.scale = cfg.routing_scale
        self.capacity_factor = cfg.capacity_factor if cfg.capacity_factor > 0 else 1.0
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.post_init()

    post_init = TopKRouter.post_init

    def capacity(self, T: int) -> int:
        """Tokens each expert takes for ``T`` tokens."""
        return max(1, min(T, math.ceil(self.capacity_factor * T / self.num_experts)))

    def forward(self, x_TD: torch.Tensor, meta: dict[str, torch.Tensor]) -> Routing:
        T, E = x_TD.shape[0], self.num_experts
        probs_TE = self.gate(x_TD).float().softmax(-1)
        C = self.capacity(T)
        if self.capacity_factor == 1.0:
            token_A, expert_A = self._non_overlapping(probs_TE.detach(), C)
        else:
            idx_CE = probs_TE.detach().topk(C, dim=0).indices
            token_A = idx_CE.t().reshape(-1)
            expert_A = torch.arange(E, device=x_TD.device).repeat_interleave(C)
        gate_A = probs_TE[token_A, expert_A] * self.scale
        zero = x_TD.new_zeros((), dtype=torch.float32)
        return Routing(token_A, expert_A, gate_A, probs_TE, zero)

    def _non_overlapping(self, probs_TE: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Experts pick in a random order so no expert is always served first;
        # the loop runs over experts (a handful), never over tokens.
        T, E = probs_TE.shape
        taken_T = torch.zeros(T, dtype=torch.bool, device=probs_TE.device)
        tokens, experts = [], []
        remaining = T
        for e in torch.randperm(E).tolist():
            k = min(C, remaining)
            if k <= 0:
                break
            score_T = probs_TE[:, e].masked_fill(taken_T, -1.0)
            pick = score_T.topk(k).indices
            taken_T[pick] = True
            tokens.append(pick)
            experts.append(torch.full((k,), e, dtype=torch.long, device=probs_TE.device))
            remaining -= k
        return torch.cat(tokens), torch.cat(experts)


def build_router(dim: int, num_experts: int, cfg: MoEConfig) -> nn.Module:
    """Router named by ``cfg.router``."""
    kinds = {
        "topk": TopKRouter,
        "subject_prior": SubjectPriorRouter,
        "expert_choice": ExpertChoiceRouter,
        "state_experts": StateExpertsRouter,
    }
    return kinds[cfg.router](dim, num_experts, cfg)
