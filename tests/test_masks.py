"""Mask collators: Brain-JEPA ranges, disjoint context/targets, determinism, weights.

Shape legend: B samples, R ROIs, T time points, N time patches, L tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.pretrain.config import AnatMaskConfig, FMRIMaskConfig, MoEConfig
from pipeline.pretrain.masks import (
    TARGET_GROUPS,
    AnatCollator,
    FMRICollator,
    edge_zone_patches,
    fmri_block_sizes,
    fmri_mask_groups,
    multiscale_block_mask,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors on a shared 2-core machine: intra-op threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _fmri_samples(B: int, R: int, T: int, grads: bool = True, k: int = 30) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(B):
        s = {"x": torch.randn(R, T, generator=g), "subject": f"sub-{i}", "task": "rest"}
        if grads:
            s["gradients"] = torch.randn(R, k, generator=g)
        out.append(s)
    return out


def _rois(idx: torch.Tensor, N: int) -> set[int]:
    return set((idx // N).tolist())


@pytest.mark.parametrize("R,T,step", [(20, 64, 0), (20, 64, 7), (450, 160, 3), (200, 96, 11)])
def test_fmri_masks_stack_and_context_is_disjoint_from_targets(R, T, step):
    cfg = FMRIMaskConfig(num_frames=T, patch=16)
    N = T // 16
    col = FMRICollator(cfg, MoEConfig(), seed=5)
    batch = col(_fmri_samples(4, R, T + 7), step)
    ctx_BC, tgt_BM = batch["ctx_idx"], batch["tgt_idx"]
    counts = col.last_sizes
    assert ctx_BC.shape[0] == tgt_BM.shape[0] == 4
    assert tgt_BM.shape[1] == sum(counts[k] for k in TARGET_GROUPS) and ctx_BC.shape[1] > 0
    for ctx, tgt in zip(ctx_BC, tgt_BM):
        assert ctx.unique().numel() == ctx.numel()
        assert not set(ctx.tolist()) & set(tgt.tolist())
        assert 0 <= int(min(ctx.min(), tgt.min())) and int(max(ctx.max(), tgt.max())) < R * N


@pytest.mark.parametrize("R,T", [(450, 160), (200, 160), (200, 96)])
def test_fmri_mask_ranges_follow_brain_jepa(R, T):
    """Block sizes within Brain-JEPA's ranges; beta/gamma drawn from the right ROI sets; empty edges allowed."""
    cfg = FMRIMaskConfig(num_frames=T, patch=16)
    N = T // 16
    zone = edge_zone_patches(N, cfg)
    edge_sizes, gamma_share = [], []
    for step in range(40):
        g = torch.Generator().manual_seed(step)
        sz = fmri_block_sizes(g, R, N, cfg)
        assert sz["obs_r"] == int(0.84 * R) and sz["obs_t"] == max(3, int(0.84 * N))
        assert int(0.45 * R) <= sz["a_r"] <= int(0.6 * R)
        assert max(1, int(0.2 * N)) <= sz["a_t"] <= int(0.6 * N)
        grp = fmri_mask_groups(g, R, N, sz, cfg)
        ctx_rois = _rois(grp["context"], N)
        alpha_rois = _rois(grp["alpha"], N)
        assert len(alpha_rois) == sz["a_r"] and not ctx_rois & alpha_rois
        # alpha lies inside the observation window; context times exclude every edge patch
        ctx_t, alpha_t = set((grp["context"] % N).tolist()), set((grp["alpha"] % N).tolist())
        assert len(alpha_t) == sz["a_t"]
        observed = ctx_rois | (set(range(R)) - alpha_rois - _rois(grp["gamma_left"], N) - _rois(grp["gamma_right"], N))
        for side in ("left", "right"):
            beta, gamma = grp[f"beta_{side}"], grp[f"gamma_{side}"]
            cols = set((torch.cat([beta, gamma]) % N).tolist())
            n = sz[side]
            assert 0 <= n <= min(zone, int(0.4 * N))
            edge_sizes.append(n)
            if n == 0:
                assert beta.numel() == 0 and gamma.numel() == 0
                continue
            allowed = range(zone) if side == "left" else range(N - zone, N)
            assert cols <= set(allowed) and not cols & ctx_t
            b_rois, c_rois = _rois(beta, N), _rois(gamma, N)
            # cross-time ROIs are observed, non-alpha ROIs; double-cross ROIs are unobserved or alpha ROIs
            assert b_rois <= ctx_rois and not b_rois & c_rois and not c_rois & ctx_rois
            u = sz[f"u_{side}"]
            assert len(b_rois) == max(1, int(len(ctx_rois) * (0.15 + 0.15 * u)))
            assert len(c_rois) == max(1, int((R - len(ctx_rois)) * (0.15 + 0.15 * u)))
            gamma_share.append(len(c_rois) / R)
        assert observed  # non-empty observation
    # empty and non-empty edge blocks both occur over 80 draws of (0, 0.4)
    assert 0 in edge_sizes and max(edge_sizes) >= 2
    # double-cross ROIs: 15-30 % of (unobserved + alpha) ROIs, i.e. well above the 4.7 % of the old masks
    assert min(gamma_share) >= 0.08


@pytest.mark.parametrize("R", [12, 200])
def test_double_cross_never_empty_when_ranges_demand_it(R):
    # Edge time and ROI ranges start above 0 and every ROI is observed: gamma still comes from the alpha ROIs.
    cfg = FMRIMaskConfig(num_frames=160, patch=16, obs_scale=(1.0, 1.0), edge_time_scale=(0.1, 0.4),
                         edge_roi_scale=(0.15, 0.3))
    col = FMRICollator(cfg, MoEConfig(), seed=0)
    samples = _fmri_samples(3, R, 160)
    for step in range(25):
        col(samples, step)
        c = col.last_sizes
        assert c["left"] >= 1 and c["right"] >= 1
        assert c["gamma_left"] >= 1 and c["gamma_right"] >= 1 and c["beta_left"] >= 1 and c["beta_right"] >= 1


def test_fmri_mask_config_is_validated():
    from pipeline.core.config import ConfigError
    from pipeline.pretrain.config import config_from_dict

    with pytest.raises(ConfigError, match="edge_zone"):
        config_from_dict({"fmri": {"edge_zone": 0.6}})
    with pytest.raises(ConfigError, match="at least 3 time patches"):
        config_from_dict({"fmri": {"num_frames": 32, "patch": 16}})
    assert config_from_dict({}).fmri.gradient_dim == 30  # Brain-JEPA's 30 gradient components


def test_fmri_collator_deterministic_per_step_and_normalises():
    col = FMRICollator(FMRIMaskConfig(num_frames=64), MoEConfig(states=("rest",)), seed=3)
    samples = _fmri_samples(3, 12, 100)
    a, b, c = col(samples, 4), col(samples, 4), col(samples, 5)
    assert torch.equal(a["ctx_idx"], b["ctx_idx"]) and torch.equal(a["x"], b["x"])
    assert not (torch.equal(a["ctx_idx"], c["ctx_idx"]) and torch.equal(a["x"], c["x"]))
    torch.testing.assert_close(a["x"].mean(-1), torch.zeros(3, 12), atol=1e-5, rtol=0)
    assert a["x"].shape == (3, 12, 64) and a["gradients"].shape == (3, 12, 30)
    assert a["state"].tolist() == [0, 0, 0]
    assert len(set(a["subject"].tolist())) == 3


def test_fmri_collator_short_runs_missing_gradients_and_errors():
    col = FMRICollator(FMRIMaskConfig(num_frames=64), MoEConfig(), seed=0)
    short = _fmri_samples(2, 10, 40, grads=False)
    short[0]["n_frames"] = 30  # loader zero-padding past frame 30
    short[0]["x"][:, 30:] = 0.0
    batch = col(short, 0)
    assert batch["x"].shape == (2, 10, 64)
    assert batch["gradients"].shape == (2, 10, 30)
    dist = torch.cdist(batch["gradients"][0], batch["gradients"][0]) + torch.eye(10)
    assert dist.min() > 1e-3  # every ROI gets a distinct fallback position
    with pytest.raises(ValueError, match="share the ROI count"):
        col(_fmri_samples(1, 10, 64) + _fmri_samples(1, 11, 64), 0)
    bad = _fmri_samples(1, 10, 64)
    bad[0]["gradients"] = torch.zeros(10, 2)
    with pytest.raises(ValueError, match="do not give 30 coordinates"):
        col(bad, 0)


@pytest.mark.parametrize("ratio", [0.1, 0.37, 0.6, 0.9])
def test_multiscale_block_mask_exact(ratio):
    grid = (6, 7, 5)
    L = math.prod(grid)
    n = round(ratio * L)
    for seed in range(5):
        m = multiscale_block_mask(torch.Generator().manual_seed(seed), grid, n, (0.15, 0.3, 0.5))
        assert m.shape == (L,) and int(m.sum()) == n


def test_multiscale_block_mask_is_blocky():
    grid = (12, 12, 12)
    m = multiscale_block_mask(torch.Generator().manual_seed(0), grid, 300, (0.15, 0.3, 0.5)).reshape(grid)
    # blocks, not scattered tokens: most target tokens have a target neighbour along x
    neighbours = (m[1:] & m[:-1]).sum()
    assert neighbours > 0.6 * m.sum()


def _volume(shape=(34, 30, 32)) -> torch.Tensor:
    x = torch.zeros(shape)
    x[8:26, 6:24, 8:24] = torch.linspace(1.0, 2.0, 18)[:, None, None]  # bright "brain" in the middle
    return x[None]


def test_anat_collator_counts_weights_and_background():
    cfg = AnatMaskConfig(volume_shape=(32, 32, 32), patch=8, target_ratio=0.5, background_weight=0.1)
    col = AnatCollator(cfg, MoEConfig(), seed=0)
    batch = col([{"x": _volume(), "subject": "a"}, {"x": _volume(), "subject": "b"}], 0)
    L = 4**3
    assert batch["x"].shape == (2, 1, 32, 32, 32)
    assert batch["tgt_idx"].shape == (2, 32) and batch["ctx_idx"].shape == (2, L - 32)
    for ctx, tgt, w in zip(batch["ctx_idx"], batch["tgt_idx"], batch["weight"]):
        assert sorted(ctx.tolist() + tgt.tolist()) == list(range(L))
        torch.testing.assert_close(w.mean(), torch.tensor(1.0))
        levels = sorted(set(round(v, 5) for v in w.tolist()))
        assert len(levels) == 2 and math.isclose(levels[0] / levels[1], 0.1, rel_tol=1e-4)
    # a corner patch holds only zeros: background; the centre patch is brain
    fg = AnatCollator(cfg, MoEConfig(), seed=0)
    b = fg([{"x": _volume(), "subject": "a"}], 1)
    w_of = dict(zip(b["tgt_idx"][0].tolist(), b["weight"][0].tolist()))
    hi = max(w_of.values())
    corner, centre = 0, (1 * 4 + 1) * 4 + 1
    if corner in w_of:
        assert w_of[corner] < hi
    if centre in w_of:
        assert w_of[centre] == hi


def test_anat_collator_rejects_bad_shape():
    col = AnatCollator(AnatMaskConfig(volume_shape=(16, 16, 16)), MoEConfig(), seed=0)
    with pytest.raises(ValueError, match=r"expected \[1, X, Y, Z\]"):
        col([{"x": torch.zeros(4, 4), "subject": "a"}], 0)
