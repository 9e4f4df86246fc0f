"""Small torch modules trained during evaluation: the attentive pooler and the 3D CNN baseline.

Shape legend: B samples, R tokens, D token width, O outputs, X/Y/Z voxels.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AttentivePooler", "SmallCNN3D"]


class AttentivePooler(nn.Module):
    """One learned query cross-attending over a sample's tokens, then LayerNorm + linear head.

    With ``n_tokens`` a learned embedding per token position (ROI) is added to
    the keys, so the query can select ROIs by identity and not only by content.
    """

    def __init__(self, dim: int, out_dim: int, heads: int = 1, n_tokens: int = 0):
        super().__init__()
        self.query_1D = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query_1D, std=0.02)
        self.pos_1RD = nn.Parameter(torch.zeros(1, n_tokens, dim)) if n_tokens > 0 else None
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, tok_BRD: torch.Tensor) -> torch.Tensor:
        q_B1D = self.query_1D.expand(tok_BRD.shape[0], -1, -1)
        key_BRD = tok_BRD if self.pos_1RD is None else tok_BRD + self.pos_1RD
        pooled_B1D, _ = self.attn(q_B1D, key_BRD, tok_BRD, need_weights=False)
        return self.head(self.norm(pooled_B1D[:, 0]))


class SmallCNN3D(nn.Module):
    """Three conv-BN-ReLU-pool stages, global average pooling and a linear head (trained from scratch)."""

    def __init__(self, out_dim: int, channels: int = 8):
        super().__init__()
        c = channels
        layers: list[nn.Module] = []
        for cin, cout in ((1, c), (c, 2 * c), (2 * c, 4 * c)):
            layers += [nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True), nn.MaxPool3d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(4 * c, out_dim)

    def forward(self, x_B1XYZ: torch.Tensor) -> torch.Tensor:
        h = self.features(x_B1XYZ)
        return self.head(h.mean(dim=(2, 3, 4)))
