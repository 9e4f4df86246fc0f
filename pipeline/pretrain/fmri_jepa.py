"""Brain-JEPA: JEPA on ROI x time fMRI series with gradient positioning.

Shape legend: B samples, R ROIs, T time points, N = T / patch time patches,
L = R * N tokens (ROI-major: token ``r * N + n``), S patch length, k gradient
coordinates, D encoder width, P predictor width, C context / M target tokens.

Tokens are patches of ``patch`` time points of one ROI. A token's position is
``Linear(gradient coordinates k -> D/2)`` of its ROI concatenated with a fixed
sin-cos embedding (D/2) of its time patch, so any ROI count works.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.pretrain.config import PretrainConfig
from pipeline.pretrain.vit import JEPA, Predictor, Transformer, TransformerConfig, gather_tokens, sincos_1d

__all__ = ["FMRIEncoder", "FMRIPositions", "build_fmri_jepa"]


class FMRIPositions(nn.Module):
    """Gradient (ROI) + sin-cos (time) position table ``[B, L, dim]``.

    The ROI half is ``Linear(k -> dim/2)`` of the gradient coordinates,
    min-max scaled per sample to [-1, 1] as Brain-JEPA's ``GradTs_2dPE``
    (``add_w="mapping"``) does. Diffusion-map coordinates are small (their
    standard deviation is ~0.02-0.06 for CC200), so without the scaling the
    ROI code is ~30x weaker than the unit-amplitude time code and the patch
    embedding: tokens carry no usable ROI identity and the predictor's mask
    tokens for different ROIs of one time patch are nearly the same.
    """

    def __init__(self, gradient_dim: int, dim: int, patch: int):
        super().__init__()
        self.dim, self.patch = dim, patch
        self.roi = nn.Linear(gradient_dim, dim // 2, bias=False)  # a per-channel offset carries no ROI identity

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        grad_BRk = batch["gradients"]
        B, R, _ = grad_BRk.shape
        N = batch["x"].shape[-1] // self.patch
        roi_BRH = self.roi(grad_BRk)
        lo_B11 = roi_BRH.amin(dim=(1, 2), keepdim=True)
        hi_B11 = roi_BRH.amax(dim=(1, 2), keepdim=True)
        roi_BRH = (roi_BRH - lo_B11) / (hi_B11 - lo_B11).clamp_min(1e-6) * 2 - 1
        time_NH = sincos_1d(torch.arange(N, device=grad_BRk.device), self.dim - self.dim // 2).to(roi_BRH.dtype)
        roi_BLH = roi_BRH[:, :, None, :].expand(B, R, N, -1).reshape(B, R * N, -1)
        time_BLH = time_NH[None, None].expand(B, R, N, -1).reshape(B, R * N, -1)
        return torch.cat([roi_BLH, time_BLH], dim=-1)


class FMRIEncoder(nn.Module):
    """Patch embedding + positions + ViT (MoE on alternating blocks)."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        m = cfg.model
        self.patch = cfg.fmri.patch
        self.patch_embed = nn.Linear(cfg.fmri.patch, m.dim)
        self.pos = FMRIPositions(cfg.fmri.gradient_dim, m.dim, cfg.fmri.patch)
        self.vit = Transformer(TransformerConfig(m.dim, m.depth, m.heads, m.mlp_ratio, cfg.moe))

    def post_init(self) -> None:
        """Xavier init of the patch and ROI-position embeddings (as MAE).

        With the ViT's 0.02 init the tokens are dominated by the unit-amplitude
        sin-cos time code, so tokens of one time patch look alike and the
        routers send them all to the same experts.
        """
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.xavier_uniform_(self.pos.roi.weight)

    def forward(self, batch: dict[str, torch.Tensor], idx_BN: torch.Tensor | None, meta: dict) -> torch.Tensor:
        x_BRT = batch["x"]
        B, R, T = x_BRT.shape
        x_BLS = x_BRT.reshape(B, R * (T // self.patch), self.patch)
        tok_BLD = self.patch_embed(x_BLS) + self.pos(batch)
        if idx_BN is not None:
            tok_BLD = gather_tokens(tok_BLD, idx_BN)
        return self.vit(tok_BLD, meta)

    def aux_loss(self) -> torch.Tensor | None:
        return self.vit.aux_loss()


def build_fmri_jepa(cfg: PretrainConfig) -> JEPA:
    """Brain-JEPA model for ``cfg`` (predictor dense and narrow)."""
    m = cfg.model
    predictor = Predictor(m.dim, TransformerConfig(m.pred_dim, m.pred_depth, m.pred_heads, m.mlp_ratio, None,
                                                   m.pred_distance_bias))
    return JEPA(FMRIEncoder(cfg), predictor, FMRIPositions(cfg.fmri.gradient_dim, m.pred_dim, cfg.fmri.patch), m.loss, m.var_reg, m.cov_reg)
