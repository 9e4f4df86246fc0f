"""Mask collators: exact token counts, disjoint context/targets, determinism, weights.

Shape legend: B samples, R ROIs, T time points, N time patches, L tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.pretrain.config import AnatMaskConfig, FMRIMaskConfig, MoEConfig
from pipeline.pretrain.masks import AnatCollator, FMRICollator, multiscale_block_mask


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors on a shared 2-core machine: intra-op threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _fmri_samples(B: int, R: int, T: int, grads: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(B):
        s = {"x": torch.randn(R, T, generator=g), "subject": f"sub-{i}", "task": "rest"}
        if grads:
            s["gradients"] = torch.randn(R, 3, generator=g)
        out.append(s)
    return out


@pytest.mark.parametrize("R,T,step", [(20, 64, 0), (20, 64, 7), (450, 160, 3), (116, 160, 11)])
def test_fmri_mask_counts_exact_and_disjoint(R, T, step):
    cfg = FMRIMaskConfig(num_frames=T, patch=16)
    N = T // 16
    col = FMRICollator(cfg, MoEConfig(), seed=5)
    batch = col(_fmri_samples(4, R, T + 7), step)
    sizes = col.last_sizes
    ctx_BC, tgt_BM = batch["ctx_idx"], batch["tgt_idx"]
    assert ctx_BC.shape[0] == tgt_BM.shape[0] == 4
    n_ctx = (sizes["obs_r"] - sizes["a_r"]) * (sizes["obs_t"] - sizes["left"] - sizes["right"])
    n_tgt = sizes["a_r"] * sizes["a_t"] + (sizes["b_r"] + sizes["c_r"]) * (sizes["left"] + sizes["right"])
    assert ctx_BC.shape[1] == n_ctx and tgt_BM.shape[1] == n_tgt
    for ctx, tgt in zip(ctx_BC, tgt_BM):
        assert ctx.unique().numel() == ctx.numel() and tgt.unique().numel() == tgt.numel()
        assert not set(ctx.tolist()) & set(tgt.tolist())
        assert 0 <= int(ctx.min()) and int(max(ctx.max(), tgt.max())) < R * N
    # block sizes follow the configured scales
    assert 0.84 * R - 1 <= sizes["obs_r"] <= R
    assert sizes["a_r"] <= math.ceil(0.6 * sizes["obs_r"]) and sizes["a_r"] >= math.floor(0.45 * sizes["obs_r"])


def test_fmri_targets_have_cross_roi_and_edge_structure():
    R, T = 30, 160
    cfg = FMRIMaskConfig(num_frames=T, patch=16, obs_scale=(0.84, 0.84))
    batch = FMRICollator(cfg, MoEConfig(), seed=0)(_fmri_samples(2, R, T), 0)
    N = T // 16
    for ctx, tgt in zip(batch["ctx_idx"], batch["tgt_idx"]):
        ctx_rois = set((ctx // N).tolist())
        ctx_times = set((ctx % N).tolist())
        tgt_rois = (tgt // N).tolist()
        tgt_times = (tgt % N).tolist()
        # some targets are ROIs the context never sees (cross-ROI / double-cross)
        assert set(tgt_rois) - ctx_rois
        # some targets are time patches the context never sees (cross-time edges)
        assert set(tgt_times) - ctx_times
        # the context is a full ROI x time grid
        assert len(ctx) == len(ctx_rois) * len(ctx_times)


def test_fmri_collator_deterministic_per_step_and_normalises():
    col = FMRICollator(FMRIMaskConfig(num_frames=64), MoEConfig(states=("rest",)), seed=3)
    samples = _fmri_samples(3, 12, 100)
    a, b, c = col(samples, 4), col(samples, 4), col(samples, 5)
    assert torch.equal(a["ctx_idx"], b["ctx_idx"]) and torch.equal(a["x"], b["x"])
    assert not (torch.equal(a["ctx_idx"], c["ctx_idx"]) and torch.equal(a["x"], c["x"]))
    torch.testing.assert_close(a["x"].mean(-1), torch.zeros(3, 12), atol=1e-5, rtol=0)
    assert a["x"].shape == (3, 12, 64) and a["gradients"].shape == (3, 12, 3)
    assert a["state"].tolist() == [0, 0, 0]
    assert len(set(a["subject"].tolist())) == 3


def test_fmri_collator_short_runs_missing_gradients_and_errors():
    col = FMRICollator(FMRIMaskConfig(num_frames=64), MoEConfig(), seed=0)
    short = _fmri_samples(2, 10, 40, grads=False)
    short[0]["n_frames"] = 30  # loader zero-padding past frame 30
    short[0]["x"][:, 30:] = 0.0
    batch = col(short, 0)
    assert batch["x"].shape == (2, 10, 64)
    assert batch["gradients"].shape == (2, 10, 3) and batch["gradients"][0].std(0).min() > 0
    with pytest.raises(ValueError, match="share the ROI count"):
        col(_fmri_samples(1, 10, 64) + _fmri_samples(1, 11, 64), 0)
    bad = _fmri_samples(1, 10, 64)
    bad[0]["gradients"] = torch.zeros(10, 2)
    with pytest.raises(ValueError, match="do not give 3 coordinates"):
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
