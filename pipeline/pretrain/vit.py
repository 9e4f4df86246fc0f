"""Transformer blocks, sin-cos position tables, the JEPA predictor and EMA wrapper.

Shape legend: B samples, L all tokens of a sample, N tokens fed to a stack,
C context tokens, M target tokens, D encoder width, P predictor width,
h heads, d head width.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import ConfigError
from pipeline.pretrain.config import MoEConfig
from pipeline.pretrain.moe import FeedForward, MoE, moe_layers

__all__ = [
    "JEPA",
    "Predictor",
    "Transformer",
    "TransformerConfig",
    "content_gain",
    "gather_tokens",
    "sincos_1d",
    "sincos_3d",
]


@dataclass(frozen=True)
class TransformerConfig:
    """A stack of pre-norm blocks; ``moe`` set means MoE FFN on every ``moe.every``-th block.

    ``distance_bias`` > 0 gives every attention layer a learnable position-distance bias (see
    :class:`Attention`) with that initial slope on its sharpest head; it acts when a forward's
    ``meta`` carries ``pos_dist`` (``[B, N, K]``: the first ``K`` tokens are then the only keys).
    """

    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    moe: MoEConfig | None = None
    distance_bias: float = 0.0


def sincos_1d(pos_N: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin-cos embedding ``[N, dim]`` of (possibly fractional) positions."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=pos_N.device) / max(half, 1))
    ang_NH = pos_N.float()[:, None] * freq[None, :]
    out = torch.cat([ang_NH.sin(), ang_NH.cos()], dim=-1)
    return F.pad(out, (0, dim - out.shape[-1]))


def sincos_3d(grid: tuple[int, int, int], dim: int, device: torch.device | None = None) -> torch.Tensor:
    """3D sin-cos table ``[gd*gh*gw, dim]``; a third of the channels per axis, rest zero."""
    per_axis = (dim // 6) * 2
    axes = torch.meshgrid(*[torch.arange(g, device=device) for g in grid], indexing="ij")
    parts = [sincos_1d(a.reshape(-1), per_axis) for a in axes]
    out = torch.cat(parts, dim=-1)
    return F.pad(out, (0, dim - out.shape[-1]))


def gather_tokens(x_BLD: torch.Tensor, idx_BN: torch.Tensor) -> torch.Tensor:
    """Tokens ``idx_BN`` of every sample: ``[B, N, D]``."""
    return torch.gather(x_BLD, 1, idx_BN[..., None].expand(-1, -1, x_BLD.shape[-1]))


class Attention(nn.Module):
    """Multi-head self-attention, optionally with a learnable position-distance bias.

    With ``distance_bias`` > 0 and squared distances ``dist_BNK`` between the position codes of
    the ``N`` tokens and of the first ``K`` (the keys), each head ``h`` adds ``-|beta_h| * dist``
    to its logits over those keys only; ``beta`` starts log-spaced from ``distance_bias`` down to
    a tenth of it over the heads (sharp to broad). A query then attends to the keys positioned
    nearest to it from the first step, as a convolution would, and learns from there; plain
    dot-product attention has to discover position matching from a near-uniform start, which a
    small JEPA predictor did not do in thousands of steps (benchmarks/README.md, issue 14).
    """

    def __init__(self, dim: int, heads: int, distance_bias: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.beta_h = nn.Parameter(distance_bias * torch.logspace(0, -1, heads)) if distance_bias > 0 else None

    def forward(self, x_BND: torch.Tensor, dist_BNK: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x_BND.shape
        qkv = self.qkv(x_BND).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q_BhNd, k_BhNd, v_BhNd = qkv.unbind(0)
        bias_BhNK = None
        if self.beta_h is not None and dist_BNK is not None:
            K = dist_BNK.shape[-1]
            k_BhNd, v_BhNd = k_BhNd[:, :, :K], v_BhNd[:, :, :K]
            bias_BhNK = (-self.beta_h.abs()[None, :, None, None] * dist_BNK[:, None]).to(q_BhNd.dtype)
        o_BhNd = F.scaled_dot_product_attention(q_BhNd, k_BhNd, v_BhNd, attn_mask=bias_BhNK)
        return self.proj(o_BhNd.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: nn.Module, distance_bias: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, distance_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn

    def forward(self, x_BND: torch.Tensor, meta: dict[str, torch.Tensor]) -> torch.Tensor:
        x_BND = x_BND + self.attn(self.norm1(x_BND), meta.get("pos_dist"))
        return x_BND + self.ffn(self.norm2(x_BND), meta)


class Transformer(nn.Module):
    """Pre-norm ViT stack; MoE FFN on alternating blocks when configured.

    With ``moe.hierarchical`` the expert count doubles at each successive MoE
    layer (MoRE-Brain's hierarchy).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        blocks = []
        n_moe = 0
        for i in range(cfg.depth):
            moe = cfg.moe
            if moe is not None and moe.enabled and i % moe.every == moe.every - 1:
                experts = moe.num_experts * (2**n_moe if moe.hierarchical else 1)
                if moe.router == "state_experts":
                    experts = len(moe.states)
                    if not 1 <= moe.top_k <= experts:
                        raise ConfigError(f"moe.top_k = {moe.top_k} but the state_experts router has {experts} "
                                          f"state expert(s) {list(moe.states)}; the states come from the index's "
                                          "task column (neurocurate pretrain) or moe.states")
                ffn: nn.Module = MoE(cfg.dim, experts, moe)
                n_moe += 1
            else:
                ffn = FeedForward(cfg.dim, hidden)
            blocks.append(Block(cfg.dim, cfg.heads, ffn, cfg.distance_bias))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x_BND: torch.Tensor, meta: dict[str, torch.Tensor]) -> torch.Tensor:
        for block in self.blocks:
            x_BND = block(x_BND, meta)
        return self.norm(x_BND)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the router regularisers of the last forward (None without any)."""
        losses = [m.aux_loss for m in moe_layers(self) if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None


class Predictor(nn.Module):
    """Narrow ViT predicting target-token embeddings from context embeddings.

    Position embeddings ``[B, L, P]`` come from the model (gradient + time for
    fMRI, 3D sin-cos for volumes) so this module is modality-agnostic.

    With ``cfg.distance_bias`` > 0 every attention layer is biased towards the
    tokens whose position codes lie nearest (:class:`Attention`), mask tokens
    are never keys (a mask token would otherwise attend mostly to itself, at
    distance 0, which carries no content), and the context embedding starts at
    Xavier scale rather than 0.02, so the context's content is not ~5x weaker
    than the position codes it is added to.
    """

    def __init__(self, enc_dim: int, cfg: TransformerConfig):
        super().__init__()
        self.distance_bias = cfg.distance_bias
        self.embed = nn.Linear(enc_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(cfg.dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.blocks = Transformer(cfg)
        self.proj = nn.Linear(cfg.dim, enc_dim)

    def forward(
        self,
        z_BCD: torch.Tensor,
        pos_BLP: torch.Tensor,
        ctx_BC: torch.Tensor,
        tgt_BM: torch.Tensor,
        meta: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        pos_ctx_BCP, pos_tgt_BMP = gather_tokens(pos_BLP, ctx_BC), gather_tokens(pos_BLP, tgt_BM)
        h_BCP = self.embed(z_BCD) + pos_ctx_BCP
        m_BMP = self.mask_token + pos_tgt_BMP
        if self.distance_bias > 0:  # every token attends to the context only
            pos_BNP = torch.cat([pos_ctx_BCP, pos_tgt_BMP], dim=1).float()
            meta = {**meta, "pos_dist": torch.cdist(pos_BNP, pos_ctx_BCP.float()).pow(2)}
        out_BNP = self.blocks(torch.cat([h_BCP, m_BMP], dim=1), meta)
        return self.proj(out_BNP[:, h_BCP.shape[1] :])

    def post_init(self) -> None:
        if self.distance_bias > 0:
            nn.init.xavier_uniform_(self.embed.weight)


def init_weights(module: nn.Module) -> None:
    """ViT-style init: truncated normal linears, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if callable(getattr(m, "post_init", None)):
            m.post_init()


_LOSSES = {
    "smooth_l1": lambda a, b: F.smooth_l1_loss(a, b, reduction="none"),
    "l1": lambda a, b: (a - b).abs(),
    "mse": lambda a, b: (a - b).pow(2),
}


def token_spread(h_ND: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the standard deviation over tokens: 0 when every token is the same vector.

    On layer-normed tokens a value near 0 means the representation has collapsed (the JEPA loss can then
    be near 0 with nothing learned); a randomly initialised encoder gives roughly 0.5-1.
    """
    return h_ND.float().std(0).mean()


def content_gain(pred_ND: torch.Tensor, target_ND: torch.Tensor, baseline_ND: torch.Tensor,
                 baseline_n: int | None = None) -> torch.Tensor:
    """``1 - |pred - target|^2 / |baseline - target|^2``: how much better the predictions are than ``baseline``.

    With the baseline set to the mean target of each token position over the ``baseline_n`` *other*
    samples of the batch, this is the share of the subject- and time-specific content of the masked
    tokens that the predictor explains: 0 when it has learnt only what every sample has at that
    position (a JEPA loss can fall a long way that way), 1 for perfect predictions, negative when
    worse. A mean of ``n`` samples misses the population mean by ``1 / n`` of the spread on average,
    so with ``baseline_n`` the reference error is divided by ``1 + 1 / baseline_n``: a predictor
    that knows the population mean exactly then scores 0 whatever the batch size, not ``1 / B``.
    """
    err = (pred_ND.float() - target_ND.float()).pow(2).sum()
    ref = (baseline_ND.float() - target_ND.float()).pow(2).sum()
    if baseline_n is not None:
        ref = ref / (1.0 + 1.0 / baseline_n)
    return 1.0 - err / ref.clamp_min(1e-12)


def vicreg_terms(z_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's variance hinge and covariance penalty over ``N`` token embeddings of width ``D``.

    Variance: mean over channels of ``relu(1 - std)``; covariance: sum of the squared off-diagonal
    covariances divided by ``D`` (Bardes, Ponce & LeCun, ICLR 2022). Added to a JEPA objective they keep
    the context encoder's tokens from collapsing onto one vector (C-JEPA, Mo & Tong, NeurIPS 2024).
    """
    z_ND = z_ND.float()
    z_ND = z_ND - z_ND.mean(0)
    var = F.relu(1.0 - torch.sqrt(z_ND.var(0) + 1e-4)).mean()
    cov_DD = z_ND.T @ z_ND / max(z_ND.shape[0] - 1, 1)
    off_DD = cov_DD - torch.diag(torch.diag(cov_DD))
    cov = off_DD.pow(2).sum() / z_ND.shape[1]
    return var, cov


class JEPA(nn.Module):
    """Context encoder, EMA target encoder and predictor.

    ``encoder(batch, idx_BN | None)`` embeds the tokens of a batch (positions
    included) and encodes those in ``idx_BN`` (all when None);
    ``predictor_pos(batch)`` gives the predictor's position table ``[B, L, P]``.
    Batches carry ``ctx_idx`` ``[B, C]``, ``tgt_idx`` ``[B, M]`` and optionally
    ``weight`` ``[B, M]`` (per-target-token loss weights, mean 1 per sample).
    ``var_reg`` / ``cov_reg`` weight :func:`vicreg_terms` of the context tokens
    (0 = the plain I-JEPA objective). Every step logs ``target_spread``
    (:func:`token_spread` of the layer-normed targets), the collapse monitor,
    and with more than one sample ``content_gain`` (:func:`content_gain` against
    each position's mean target over the other samples), whether the predictor
    has learnt anything beyond the population mean of a position.
    """

    def __init__(self, encoder: nn.Module, predictor: Predictor, predictor_pos: nn.Module, loss: str,
                 var_reg: float = 0.0, cov_reg: float = 0.0):
        super().__init__()
        self.var_reg = float(var_reg)
        self.cov_reg = float(cov_reg)
        self.encoder = encoder
        self.predictor = predictor
        self.predictor_pos = predictor_pos
        init_weights(self)
        self.target_encoder = copy.deepcopy(encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)
        self.loss_name = loss

    def train(self, mode: bool = True) -> JEPA:
        super().train(mode)
        # The target encoder never trains: keeps its routers from counting tokens.
        self.target_encoder.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        meta = {"subject": batch["subject"], "state": batch["state"]}
        ctx_BC, tgt_BM = batch["ctx_idx"], batch["tgt_idx"]
        z_BCD = self.encoder(batch, ctx_BC, meta)
        with torch.no_grad():
            h_BLD = self.target_encoder(batch, None, meta)
            h_BLD = F.layer_norm(h_BLD.float(), (h_BLD.shape[-1],))
            target_BMD = gather_tokens(h_BLD, tgt_BM)
        pred_BMD = self.predictor(z_BCD, self.predictor_pos(batch), ctx_BC, tgt_BM, meta)
        loss_BM = _LOSSES[self.loss_name](pred_BMD.float(), target_BMD).mean(-1)
        if "weight" in batch:
            loss_BM = loss_BM * batch["weight"]
        jepa_loss = loss_BM.mean()
        aux = self.encoder.aux_loss()
        total = jepa_loss if aux is None else jepa_loss + aux
        logs = {"jepa_loss": jepa_loss.detach(), "target_spread": token_spread(h_BLD.flatten(0, 1)).detach()}
        if h_BLD.shape[0] > 1:
            with torch.no_grad():  # the position's mean target over the other samples of the batch
                total_BMD = gather_tokens(h_BLD.sum(0, keepdim=True).expand_as(h_BLD), tgt_BM)
                others_BMD = (total_BMD - target_BMD) / (h_BLD.shape[0] - 1)
                logs["content_gain"] = content_gain(pred_BMD.detach(), target_BMD, others_BMD, baseline_n=h_BLD.shape[0] - 1)
        if aux is not None:
            logs["aux_loss"] = aux.detach()
        if self.var_reg > 0 or self.cov_reg > 0:
            var, cov = vicreg_terms(z_BCD.flatten(0, 1))
            total = total + self.var_reg * var + self.cov_reg * cov
            logs["var_loss"], logs["cov_loss"] = var.detach(), cov.detach()
        return total, logs

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA of the context encoder's parameters; buffers (router biases) are copied."""
        tgt = list(self.target_encoder.parameters())
        src = [p.detach() for p in self.encoder.parameters()]
        torch._foreach_mul_(tgt, momentum)
        torch._foreach_add_(tgt, src, alpha=1.0 - momentum)
        for b_t, b_s in zip(self.target_encoder.buffers(), self.encoder.buffers()):
            b_t.copy_(b_s)
