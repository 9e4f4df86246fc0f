"""Neuro-JEPA: JEPA on MNI-space structural volumes with a 3D ViT.

Shape legend: B samples, X/Y/Z voxels per axis, p patch edge, S = p**3 voxels
per patch, L tokens (patch grid flattened in x, y, z order), D encoder width,
P predictor width, C context / M target tokens.

Positions are fixed 3D sin-cos tables (a third of the channels per axis). The
foreground-weighted loss weights come from the collator
(:class:`pipeline.pretrain.masks.AnatCollator`).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.pretrain.config import PretrainConfig
from pipeline.pretrain.vit import JEPA, Predictor, Transformer, TransformerConfig, gather_tokens, sincos_3d

__all__ = ["StructEncoder", "StructPositions", "build_struct_jepa", "patchify_3d"]


def patchify_3d(x_BXYZ: torch.Tensor, p: int) -> torch.Tensor:
    """Cut ``[B, X, Y, Z]`` volumes into ``[B, L, p**3]`` patches (grid in x, y, z order)."""
    B, X, Y, Z = x_BXYZ.shape
    x = x_BXYZ.reshape(B, X // p, p, Y // p, p, Z // p, p)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, (X // p) * (Y // p) * (Z // p), p**3)


class StructPositions(nn.Module):
    """Fixed 3D sin-cos position table ``[B, L, dim]`` for the batch's patch grid."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.patch, self.dim = patch, dim

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["x"]
        grid = tuple(s // self.patch for s in x.shape[-3:])
        pos_LD = sincos_3d(grid, self.dim, device=x.device).to(x.dtype)
        return pos_LD[None].expand(x.shape[0], -1, -1)


class StructEncoder(nn.Module):
    """Linear patch embedding of p**3 voxels + 3D sin-cos + ViT (MoE on alternating blocks)."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        m = cfg.model
        self.patch = cfg.anat.patch
        self.patch_embed = nn.Linear(self.patch**3, m.dim)
        self.pos = StructPositions(self.patch, m.dim)
        self.vit = Transformer(TransformerConfig(m.dim, m.depth, m.heads, m.mlp_ratio, cfg.moe))

    def post_init(self) -> None:
        """Xavier init of the patch embedding (as MAE) so voxel content, not position, dominates tokens."""
        nn.init.xavier_uniform_(self.patch_embed.weight)

    def forward(self, batch: dict[str, torch.Tensor], idx_BN: torch.Tensor | None, meta: dict) -> torch.Tensor:
        x_BLS = patchify_3d(batch["x"][:, 0], self.patch)
        tok_BLD = self.patch_embed(x_BLS) + self.pos(batch)
        if idx_BN is not None:
            tok_BLD = gather_tokens(tok_BLD, idx_BN)
        return self.vit(tok_BLD, meta)

    def aux_loss(self) -> torch.Tensor | None:
        return self.vit.aux_loss()


def build_struct_jepa(cfg: PretrainConfig) -> JEPA:
    """Neuro-JEPA model for ``cfg``."""
    m = cfg.model
    predictor = Predictor(m.dim, TransformerConfig(m.pred_dim, m.pred_depth, m.pred_heads, m.mlp_ratio, None,
                                                   m.pred_distance_bias))
    return JEPA(StructEncoder(cfg), predictor, StructPositions(cfg.anat.patch, m.pred_dim), m.loss, m.var_reg, m.cov_reg)
