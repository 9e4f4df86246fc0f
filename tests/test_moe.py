"""Mixture-of-Experts layer, routers and auxiliary-loss-free balancing.

Shape legend: T tokens, D width, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.pretrain.config import MoEConfig
from pipeline.pretrain.moe import MoE, bias_update, moe_layers, update_router_biases
from pipeline.pretrain.vit import Transformer, TransformerConfig

D = 16


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors on a shared 2-core machine: intra-op threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _moe(**kw) -> MoE:
    torch.manual_seed(0)
    cfg = dataclasses.replace(MoEConfig(num_experts=4, num_shared=1, top_k=2, expert_hidden=8), **kw)
    return MoE(D, cfg.num_experts, cfg)


def _meta(B: int, subject=None, state=None) -> dict[str, torch.Tensor]:
    return {
        "subject": torch.tensor(subject if subject is not None else list(range(B))),
        "state": torch.tensor(state if state is not None else [-1] * B),
    }


def test_bias_update_on_known_counts():
    counts = torch.tensor([10.0, 30.0, 20.0, 40.0])  # mean 25
    bias = bias_update(torch.zeros(4), counts, rate=0.1, clip=0.3)
    # correction (25 - c) / 25 = [0.6, -0.2, 0.2, -0.6], already zero-mean
    torch.testing.assert_close(bias, torch.tensor([0.06, -0.02, 0.02, -0.06]))
    # zero-mean projection of (previous bias + update)
    bias = bias_update(torch.tensor([0.1, 0.0, 0.0, 0.0]), counts, rate=0.1, clip=0.3)
    torch.testing.assert_close(bias, torch.tensor([0.135, -0.045, -0.005, -0.085]))
    # clipping at +-clip after the projection
    bias = bias_update(torch.tensor([0.5, -0.5, 0.0, 0.0]), counts, rate=0.1, clip=0.3)
    torch.testing.assert_close(bias, torch.tensor([0.3, -0.3, 0.02, -0.06]))
    # no tokens at all: nothing to learn from
    torch.testing.assert_close(bias_update(torch.ones(4), torch.zeros(4), 0.1, 0.3), torch.ones(4))


def test_update_router_biases_uses_forward_counts_and_resets():
    moe = _moe(bias_update_rate=0.1)
    moe.train()
    x = torch.randn(2, 12, D)
    moe(x, _meta(2))
    counts = moe.router.counts_E.clone()
    assert counts.sum() == 2 * 12 * 2  # every token counted K times
    update_router_biases(moe, rate=0.1, clip=0.3)
    torch.testing.assert_close(moe.router.bias_E, bias_update(torch.zeros(4), counts, 0.1, 0.3))
    assert moe.router.counts_E.sum() == 0
    # in eval mode (the EMA target encoder) nothing is counted
    moe.eval()
    moe(x, _meta(2))
    assert moe.router.counts_E.sum() == 0


def test_topk_respected_and_gates_ignore_bias():
    moe = _moe()
    moe.router.bias_E.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    x_TD = torch.randn(40, D)
    r = moe.router(x_TD, _meta(1))
    idx_TK = r.expert_A.reshape(40, 2)
    assert (idx_TK[:, 0] != idx_TK[:, 1]).all()
    assert (idx_TK == 0).any(1).all()  # the bias forces expert 0 into every choice
    probs_TE = F.softmax(moe.router.gate(x_TD).float(), -1)
    torch.testing.assert_close(r.gate_A.reshape(40, 2), probs_TE.gather(1, idx_TK))  # unbiased gates
    assert torch.equal(r.token_A, torch.arange(40).repeat_interleave(2))


def _reference(moe: MoE, x_TD: torch.Tensor, meta) -> torch.Tensor:
    """Per-token loop over assignments: what the batched dispatch must reproduce."""
    r = moe.router(x_TD, meta)
    out = moe.shared(x_TD).clone()
    for t, e, g in zip(r.token_A.tolist(), r.expert_A.tolist(), r.gate_A):
        h = F.gelu(x_TD[t] @ moe.w1_EDH[e] + moe.b1_EH[e, 0])
        out[t] = out[t] + g * (h @ moe.w2_EHD[e])
    return out


@pytest.mark.parametrize("router", ["topk", "subject_prior", "state_experts"])
def test_batched_dispatch_matches_per_token_loop(router):
    moe = _moe(router=router, states=("a", "b", "c", "d"))
    moe.eval()
    x = torch.randn(2, 10, D)
    meta = _meta(2, subject=[3, 7], state=[1, -1])
    torch.testing.assert_close(moe(x, meta).reshape(20, D), _reference(moe, x.reshape(20, D), meta), atol=1e-5, rtol=1e-5)


def test_token_choice_capacity_drops_overflow():
    moe = _moe(capacity_factor=0.5)
    moe.router.bias_E.copy_(torch.tensor([0.3, 0.3, 0.0, -0.3]))  # skew choices so experts 0, 1 overflow
    moe.eval()
    x = torch.randn(1, 32, D)
    wanted_E = torch.bincount(moe.router(x.reshape(32, D), _meta(1)).expert_A, minlength=4)
    moe(x, _meta(1))
    C = math.ceil(0.5 * 32 * 2 / 4)
    assert wanted_E.max() > C
    torch.testing.assert_close(moe.last_load_E, wanted_E.clamp(max=C).float())
    assert moe.last_stats["dropped"] >= 0
    no_cap = _moe()
    no_cap.eval()
    no_cap.router.bias_E.copy_(moe.router.bias_E)
    no_cap(x, _meta(1))
    torch.testing.assert_close(no_cap.last_load_E, wanted_E.float())
    assert no_cap.last_stats["dropped"] == 0


def test_expert_choice_non_overlapping_and_capacity():
    moe = _moe(router="expert_choice", capacity_factor=1.0)
    x_TD = torch.randn(30, D)
    r = moe.router(x_TD, _meta(1))
    C = math.ceil(30 / 4)
    assert sorted(r.token_A.tolist()) == list(range(30))  # each token exactly once
    assert torch.bincount(r.expert_A, minlength=4).max() <= C
    moe2 = _moe(router="expert_choice", capacity_factor=2.0)
    r2 = moe2.router(x_TD, _meta(1))
    C2 = math.ceil(2.0 * 30 / 4)
    assert torch.equal(torch.bincount(r2.expert_A, minlength=4), torch.full((4,), C2))
    for e in range(4):  # an expert takes distinct tokens
        assert r2.token_A[r2.expert_A == e].unique().numel() == C2
    moe.eval()
    y = moe(x_TD[None], _meta(1))
    assert y.shape == (1, 30, D) and moe.last_stats["dropped"] == 0


def test_subject_prior_renormalised_and_penalised():
    moe = _moe(router="subject_prior", routing_scale=2.0, subject_l2=0.5)
    with torch.no_grad():
        moe.router.subject_bias.weight[3] = torch.tensor([1.0, 0.0, 0.0, -1.0])
    r = moe.router(torch.randn(20, D), _meta(2, subject=[3, 4]))
    torch.testing.assert_close(r.gate_A.reshape(20, 2).sum(-1), torch.full((20,), 2.0))
    # mean over the two samples of 0.5 * ||bias||^2 = 0.5 * (2 + 0) / 2
    torch.testing.assert_close(r.aux_loss, torch.tensor(0.5))
    r.aux_loss.backward()
    assert moe.router.subject_bias.weight.grad[3].abs().sum() > 0


def test_state_expert_always_selected():
    moe = _moe(router="state_experts", states=("rest", "nback", "motor", "gambling"), top_k=2)
    r = moe.router(torch.randn(24, D), _meta(3, state=[2, 0, -1]))
    idx_TK = r.expert_A.reshape(24, 2)
    assert (idx_TK[:8] == 2).any(1).all()
    assert (idx_TK[8:16] == 0).any(1).all()


def test_hierarchical_expert_count_doubles():
    cfg = MoEConfig(num_experts=2, expert_hidden=8, router="expert_choice", hierarchical=True, every=1)
    stack = Transformer(TransformerConfig(D, 3, 2, 2.0, cfg))
    assert [m.num_experts for m in moe_layers(stack)] == [2, 4, 8]
    flat = Transformer(TransformerConfig(D, 4, 2, 2.0, dataclasses.replace(cfg, hierarchical=False, every=2)))
    assert [m.num_experts for m in moe_layers(flat)] == [2, 2]  # alternating blocks 1 and 3
    assert [i for i, b in enumerate(flat.blocks) if isinstance(b.ffn, MoE)] == [1, 3]


def test_balancing_evens_out_a_skewed_router():
    moe = _moe(top_k=1)
    with torch.no_grad():
        moe.router.gate.weight.normal_(0.0, 0.3)
        moe.router.gate.weight[0] += 0.15  # tokens with positive features prefer expert 0
    moe.train()
    x = torch.randn(1, 128, D).abs()
    ratios = []
    for _ in range(100):
        moe(x, _meta(1))
        counts = moe.router.counts_E.clone()
        ratios.append(float(counts.max() / counts.mean()))
        update_router_biases(moe, rate=0.01, clip=0.3)
    assert ratios[0] > 2.0
    assert max(ratios[-10:]) < 1.2
