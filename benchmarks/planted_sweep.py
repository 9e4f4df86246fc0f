"""Which pretraining variant makes the per-ROI readouts carry ROI-to-ROI coupling? A sweep on planted data.

Synthetic data only (``tests/test_science.py``'s planted set: 100 subjects, 16 ROIs, the class lives only in the
coupling of ROI groups A and B), so nothing here is tuned on ABIDE. For each variant and seed the script pretrains
on the planted series, embeds them with the run's target encoder and with a randomly initialised encoder of the same
architecture (the evaluation's control), and prints the cross-validated AUROC of the two per-ROI readouts
(``roi``: time-pooled per-ROI embeddings; ``roi_similarity``: their ROI x ROI similarity), the gain of the better
one over the random encoder's better one (what the planted test asks for: > +0.05), and the run's last
``content_gain`` and per-token attention output of the encoder (beside the token embedding it is added to).

Variants: the test's recipe (``tiny``, 150 steps), longer runs with a faster teacher, the distance-biased predictor,
the CPU recipe's model size, and two probes of a hypothesis that need code outside the shipped configs:

* ``qk_content``: Xavier init of the encoder's query/key weights only, so its attention is content-selective from the
  start (the random control gets the same init);
* ``roi_local``: per-ROI random token masks (half of each ROI's patches are targets) and a predictor whose target
  tokens may attend only to context tokens of their own ROI, so what the other ROIs say about a masked patch can
  reach the prediction only through the encoder's attention.

Usage::

    python benchmarks/planted_sweep.py [--variants tiny,...] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import pipeline.pretrain.fmri_jepa as fmri_jepa  # noqa: E402
import pipeline.pretrain.masks as masks  # noqa: E402
from benchmarks.readout_diagnostics import block_outputs  # noqa: E402
from pipeline.evaluation.embed import embed_samples, load_encoder  # noqa: E402
from pipeline.evaluation.readouts import readout_features  # noqa: E402
from pipeline.pretrain.train import Trainer  # noqa: E402
from pipeline.pretrain.vit import Predictor, gather_tokens  # noqa: E402
from tests.test_science import R, _auroc, planted, planted_config, planted_inputs  # noqa: E402


class _QKContentEncoder(fmri_jepa.FMRIEncoder):
    def post_init(self) -> None:
        super().post_init()
        for block in self.vit.blocks:
            D = block.attn.proj.in_features
            nn.init.xavier_uniform_(block.attn.qkv.weight[: 2 * D])


def _roi_local_masks(g, R_, N, sz, cfg=None, batch=1):
    """Half of each ROI's time patches are targets, the other half context (per sample)."""
    m = max(1, min(N - 1, round(N / 2)))
    base_R1 = (torch.arange(R_) * N)[:, None]
    ctx, tgt = [], []
    for _ in range(batch):
        order_RN = torch.argsort(torch.rand(R_, N, generator=g), dim=1)
        tgt.append((base_R1 + order_RN[:, :m]).reshape(-1).sort().values)
        ctx.append((base_R1 + order_RN[:, m:]).reshape(-1).sort().values)
    counts = dict.fromkeys(masks.TARGET_GROUPS, 0) | {"alpha": R_ * m}
    return torch.stack(ctx), torch.stack(tgt), counts


class _ROILocalPredictor(Predictor):
    """The distance-biased predictor with every other ROI's context tokens pushed out of reach."""

    def forward(self, z_BCD, pos_BLP, ctx_BC, tgt_BM, meta):
        if self.distance_bias <= 0:  # the other ROIs are pushed away through the distance bias
            raise ValueError("the roi_local probe needs model.pred_distance_bias > 0")
        P = pos_BLP.shape[-1]
        pos_ctx_BCP, pos_tgt_BMP = gather_tokens(pos_BLP, ctx_BC), gather_tokens(pos_BLP, tgt_BM)
        pos_BNP = torch.cat([pos_ctx_BCP, pos_tgt_BMP], dim=1).float()
        other_roi_BNC = torch.cdist(pos_BNP[..., : P // 2], pos_ctx_BCP[..., : P // 2].float()) > 1e-5
        dist_BNC = torch.cdist(pos_BNP, pos_ctx_BCP.float()).pow(2) + 1e6 * other_roi_BNC
        h_BCP = self.embed(z_BCD) + pos_ctx_BCP
        m_BMP = self.mask_token + pos_tgt_BMP
        out_BNP = self.blocks(torch.cat([h_BCP, m_BMP], dim=1), {**meta, "pos_dist": dist_BNC})
        return self.proj(out_BNP[:, h_BCP.shape[1]:])


@contextlib.contextmanager
def _probe(name: str | None):
    saved = fmri_jepa.FMRIEncoder, fmri_jepa.Predictor, masks.fmri_masks
    try:
        if name == "qk_content":
            fmri_jepa.FMRIEncoder = _QKContentEncoder
        elif name == "roi_local":
            fmri_jepa.Predictor, masks.fmri_masks = _ROILocalPredictor, _roi_local_masks
        yield
    finally:
        fmri_jepa.FMRIEncoder, fmri_jepa.Predictor, masks.fmri_masks = saved


CPU_MODEL = {"dim": 64, "depth": 4, "mlp_ratio": 4.0, "pred_dim": 32, "pred_depth": 2}
# name: (steps, ema, model overrides, probe)
VARIANTS = {
    "tiny": (150, (0.996, 1.0), {}, None),
    "tiny_distance": (150, (0.996, 1.0), {"pred_distance_bias": 3.0}, None),
    "long": (600, (0.99, 1.0), {}, None),
    "long_distance": (600, (0.99, 1.0), {"pred_distance_bias": 3.0}, None),
    "qk_content": (600, (0.99, 1.0), {}, "qk_content"),
    "roi_local": (600, (0.99, 1.0), {"pred_distance_bias": 3.0}, "roi_local"),
    "cpu_model": (1500, (0.99, 1.0), {**CPU_MODEL, "pred_distance_bias": 3.0}, None),
    "cpu_model_roi_local": (1500, (0.99, 1.0), {**CPU_MODEL, "pred_distance_bias": 3.0}, "roi_local"),
}


def run_one(name: str, seed: int, workdir: Path) -> dict[str, float]:
    steps, ema, model, probe = VARIANTS[name]
    data, y = planted(seed=seed)
    grads = np.random.default_rng(5 + seed).standard_normal((R, 4)).astype(np.float32)
    ds, samples = planted_inputs(data, grads)
    run = Path(tempfile.mkdtemp(prefix=f"{name}_{seed}_", dir=workdir))
    out: dict[str, float] = {}
    with _probe(probe):
        Trainer(planted_config(steps, seed, ema, **model), ds, run, progress=False).fit()
        for kind in ("pretrained", "random"):
            enc = load_encoder(run, random_init=kind == "random")
            e = embed_samples(enc, samples, gradients_Rk=grads, max_windows=2)
            for r in ("roi", "roi_similarity"):
                out[f"{kind}_{r}"] = _auroc(readout_features(r, e.pooled_ND, e.tokens_NRD), y)
            out[f"{kind}_embed"], blocks = block_outputs(enc, samples, grads)
            out[f"{kind}_attn"] = max(attn for attn, _ffn in blocks)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    out["content_gain"] = float(last.get("content_gain", float("nan")))
    out["gain"] = max(out["pretrained_roi"], out["pretrained_roi_similarity"]) - max(out["random_roi"],
                                                                                     out["random_roi_similarity"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'variant':<20} {'seed':>4} {'pre roi':>8} {'pre sim':>8} {'rnd roi':>8} {'rnd sim':>8} {'gain':>7} "
          f"{'c_gain':>7} {'attn/emb pre':>13} {'attn/emb rnd':>13} {'s':>5}")
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="planted_sweep_") as tmp:
        for name in names:
            gains = []
            for seed in seeds:
                t = time.time()
                o = run_one(name, seed, Path(tmp))
                gains.append(o["gain"])
                print(f"{name:<20} {seed:>4} {o['pretrained_roi']:>8.3f} {o['pretrained_roi_similarity']:>8.3f} "
                      f"{o['random_roi']:>8.3f} {o['random_roi_similarity']:>8.3f} {o['gain']:>+7.3f} "
                      f"{o['content_gain']:>7.3f} {o['pretrained_attn']:>6.2f}/{o['pretrained_embed']:<6.2f} "
                      f"{o['random_attn']:>6.2f}/{o['random_embed']:<6.2f} {time.time() - t:>5.0f}", flush=True)
            print(f"{name:<20} mean gain {np.mean(gains):+.3f} (min {min(gains):+.3f}, max {max(gains):+.3f})",
                  flush=True)
    print(f"total wall time: {time.time() - t_all:.0f} s; load average at end: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
