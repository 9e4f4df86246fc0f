"""Pretraining figures: MoE vs dense throughput, expert balance, ABIDE loss curve, GPU utilisation.

Usage::

    python benchmarks/pretrain.py [--abide-seconds 150] [--threads 1] [--out DIR]

1. Train-step tokens/s of the MoE encoder against a dense FFN with equal active
   FLOPs (hidden = (shared + top_k) x expert_hidden); goal: MoE step <= 1.2x dense.
2. Expert load max/mean after warmup with auxiliary-loss-free balancing on
   and off (goal <= 1.5 with it on), on ABIDE CC200 series.
3. Loss curve of a time-bounded CPU run on ABIDE shards built from
   ``../shared/data/abide`` (``write_shards`` of the .1D series).
4. With a GPU: tokens/s and model FLOPs utilisation in bf16.

Shape legend: B samples, R ROIs, T frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.pretrain.config import PretrainConfig, load_pretrain_config
from pipeline.pretrain.moe import moe_layers, update_router_biases
from pipeline.pretrain.train import Trainer, build_collator, build_model

REPO = Path(__file__).resolve().parents[1]
ABIDE = REPO.parent / "shared" / "data" / "abide"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def _bench_cfg(dense: bool, R_frames: int = 160) -> PretrainConfig:
    cfg = load_pretrain_config("tiny")
    moe = dataclasses.replace(cfg.moe, enabled=not dense, num_experts=8, top_k=2, num_shared=1, expert_hidden=128, every=2)
    # Dense baseline: hidden = (num_shared + top_k) * expert_hidden = 384 = dim * mlp_ratio on every block.
    model = dataclasses.replace(cfg.model, dim=128, depth=4, heads=4, mlp_ratio=3.0, pred_dim=64, pred_depth=2, pred_heads=4)
    return dataclasses.replace(cfg, model=model, moe=moe, fmri=dataclasses.replace(cfg.fmri, num_frames=R_frames))


def _synthetic(n: int, R: int, T: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(R, T, generator=g), "subject": f"sub-{i}", "task": "rest"} for i in range(n)]


class _Stepper:
    """One model + optimizer + fixed batch; ``step()`` times one training step."""

    def __init__(self, cfg: PretrainConfig, batch: dict, device: str):
        torch.manual_seed(0)
        self.model = build_model(cfg).to(device)
        self.model.train()
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.cuda = device.startswith("cuda")

    def step(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda" if self.cuda else "cpu", dtype=torch.bfloat16, enabled=self.cuda):
            loss, _ = self.model(self.batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        # Part of every training step: keeps the expert loads (and so the padded
        # expert buffers) balanced, as in a real run.
        update_router_biases(self.model.encoder, rate=0.01, clip=0.3)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _step_time(cfg: PretrainConfig, batch: dict, device: str, steps: int) -> float:
    s = _Stepper(cfg, batch, device)
    return statistics.median([s.step() for _ in range(steps + 3)][3:])


def throughput(device: str, B: int, R: int, steps: int, warmup: int = 10) -> dict[str, float]:
    """Median train-step time of MoE vs dense with equal active FLOPs.

    Steps of the two models alternate so load from other processes on a
    shared machine hits both alike; the first ``warmup`` steps, while the
    balancing biases settle, are not timed.
    """
    steppers = {}
    for name, dense in (("moe", False), ("dense", True)):
        cfg = _bench_cfg(dense)
        steppers[name] = _Stepper(cfg, build_collator(cfg, 0)(_synthetic(B, R, 160), 0), device)
    times: dict[str, list[float]] = {"moe": [], "dense": []}
    for i in range(steps + warmup):
        for name, s in steppers.items():
            dt = s.step()
            if i >= warmup:  # warmup steps (routing not yet balanced) excluded
                times[name].append(dt)
    tokens = B * R * 10
    out = {}
    for name, ts in times.items():
        out[f"{name}_step_s"] = statistics.median(ts)
        out[f"{name}_tokens_per_s"] = tokens / out[f"{name}_step_s"]
    out["moe_over_dense"] = out["moe_step_s"] / out["dense_step_s"]
    return out


def _read_1d(path: str) -> np.ndarray:
    return np.loadtxt(path, comments="#", dtype=np.float32, ndmin=2)


def abide_shards(root: Path, limit: int | None) -> Path:
    """Write the ABIDE CC200 series into fMRI shards (one store, splits by subject)."""
    import pandas as pd

    from pipeline.store.write import write_shards

    files = sorted((ABIDE / "rois_cc200").glob("*_rois_cc200.1D"))[:limit]
    pheno = pd.read_csv(ABIDE / "Phenotypic_V1_0b_preprocessed1.csv")
    site = dict(zip(pheno["FILE_ID"].astype(str), pheno["SITE_ID"].astype(str)))
    ids = [f.name.removesuffix("_rois_cc200.1D") for f in files]
    samples = pd.DataFrame(
        {
            "sample_id": ids,
            "subject": ids,
            "store": "fmri-CC200",
            "kind": "fmri",
            "atlas": "CC200",
            "task": "rest",
            "site": [site.get(i, "") for i in ids],
            "path": [str(f) for f in files],
        }
    )
    names = [f"#{i + 1}" for i in range(200)]
    shards = root / "shards"
    write_shards(samples, shards, read_sample=lambda row: {"x_TR": _read_1d(row["path"]), "roi_names": names})
    return shards


def _abide_cfg(balance: bool, rate: float) -> PretrainConfig:
    cfg = load_pretrain_config("tiny")
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dim=64, depth=4, heads=4, pred_dim=32, pred_depth=2, pred_heads=4),
        fmri=dataclasses.replace(cfg.fmri, num_frames=96),
        moe=dataclasses.replace(cfg.moe, num_experts=8, top_k=2, expert_hidden=64, balance=balance, bias_update_rate=rate),
        train=dataclasses.replace(cfg.train, batch_size=4, max_steps=2000, warmup_steps=20, lr=1e-3, log_every=10, checkpoint_every=0),
    )


def _dataset(shards: Path, cfg: PretrainConfig):
    from pipeline.core.config import LoaderConfig
    from pipeline.store.loader import ShardDataset

    return ShardDataset(shards, LoaderConfig(window_length=cfg.fmri.num_frames, seed=0), split="train", training=True)


def balance(shards: Path, steps: int, warmup: int, rate: float) -> dict[str, float]:
    """Expert load max/mean after ``warmup`` steps, balancing on and off.

    ``<on|off>``: per-step max/mean (what sets the padded expert buffers),
    averaged over steps and MoE layers; ``<on|off>_total``: max/mean of the
    loads summed over all steps after warmup, averaged over layers.
    """
    out = {}
    for on in (True, False):
        cfg = _abide_cfg(on, rate)
        with tempfile.TemporaryDirectory() as run:
            trainer = Trainer(cfg, _dataset(shards, cfg), run, progress=False)
            layers = moe_layers(trainer.model.encoder)
            per_step, totals = [], [torch.zeros(m.num_experts) for m in layers]
            for _ in range(steps):
                trainer.train_step(trainer.next_batch())
                if trainer.step > warmup:
                    per_step.append(statistics.mean(float(m.last_stats["load_max_mean"]) for m in layers))
                    for tot, m in zip(totals, layers):
                        tot += m.last_load_E
        key = "on" if on else "off"
        out[key] = statistics.mean(per_step)
        out[f"{key}_total"] = statistics.mean(float(t.max() / t.mean()) for t in totals)
    return out


def loss_curve(shards: Path, seconds: float, out_dir: Path) -> list[tuple[int, float, float]]:
    """Train until ``seconds`` elapse; returns (step, seconds, loss) every 10 steps."""
    cfg = _abide_cfg(True, 0.001)
    curve = []
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(cfg, _dataset(shards, cfg), run, progress=False)
        t0 = time.perf_counter()
        window = []
        while time.perf_counter() - t0 < seconds:
            window.append(trainer.train_step(trainer.next_batch())["loss"])
            if trainer.step % 10 == 0:
                curve.append((trainer.step, time.perf_counter() - t0, statistics.mean(window)))
                window = []
    out_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([c[0] for c in curve], [c[2] for c in curve])
    ax.set_xlabel("step")
    ax.set_ylabel("JEPA loss (mean of 10 steps)")
    ax.set_title("Brain-JEPA MoE on ABIDE CC200 (CPU)")
    fig.tight_layout()
    fig.savefig(out_dir / "pretrain_abide_loss.png", dpi=120)
    (out_dir / "pretrain_abide_loss.json").write_text(json.dumps(curve))
    return curve


def gpu_figures(B: int, R: int, steps: int, device: str = "cuda") -> dict[str, float]:
    """bf16 tokens/s and model FLOPs utilisation of the MoE model on this GPU."""
    cfg = _bench_cfg(False)
    batch = build_collator(cfg, 0)(_synthetic(B, R, 160), 0)
    dt = _step_time(cfg, batch, device, steps)
    model = build_model(cfg)
    L = R * 10
    C, M = batch["ctx_idx"].shape[1], batch["tgt_idx"].shape[1]
    enc = model.encoder
    routed = sum(p.numel() for m in moe_layers(enc) for p in (m.w1_EDH, m.w2_EHD))
    active_routed = sum(p.numel() * cfg.moe.top_k // m.num_experts for m in moe_layers(enc) for p in (m.w1_EDH, m.w2_EHD))
    enc_active = sum(p.numel() for p in enc.parameters()) - routed + active_routed
    pred = sum(p.numel() for p in model.predictor.parameters())
    # 6 FLOPs per parameter and token for fwd+bwd of the context encoder and predictor,
    # 2 for the no-grad target encoder pass over all tokens; attention matmuls added.
    D, Dp, depth, pdepth = cfg.model.dim, cfg.model.pred_dim, cfg.model.depth, cfg.model.pred_depth
    flops = B * (6 * enc_active * C + 2 * enc_active * L + 6 * pred * (C + M))
    keys = C if cfg.model.pred_distance_bias > 0 else C + M  # with the distance bias only the context is keys
    flops += B * (3 * 4 * depth * C * C * D + 4 * depth * L * L * D + 3 * 4 * pdepth * (C + M) * keys * Dp)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    out = {"tokens_per_s": B * L / dt, "step_s": dt, "tflops": flops / dt / 1e12}
    if peak:
        out["mfu"] = flops / dt / peak
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--abide-seconds", type=float, default=150.0)
    ap.add_argument("--abide-limit", type=int, default=None, help="use only the first N ABIDE files")
    ap.add_argument("--balance-steps", type=int, default=100)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "neurocurate_pretrain_bench"), help="where the loss plot goes")
    ap.add_argument("--only", choices=["all", "throughput", "abide"], default="all", help="run one part only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in ("all", "throughput"):
        _print_throughput()
    if args.only in ("all", "abide"):
        _abide_figures(args)
    if torch.cuda.is_available():
        g = gpu_figures(B=16, R=450, steps=10)
        print(f"\n== GPU ({torch.cuda.get_device_name()}), bf16, B=16, 450 ROIs x 160 frames")
        print(f"{g['tokens_per_s']:.0f} tokens/s, {g['tflops']:.1f} TFLOP/s" + (f", MFU {g['mfu'] * 100:.1f}%" if "mfu" in g else ""))
    else:
        print("\n(no GPU: tokens/s and MFU on GPU not measured)")


def _print_throughput() -> None:
    t = throughput("cpu", B=2, R=116, steps=8)
    print("== MoE vs dense FFN (equal active FLOPs), CPU train step after 10 balancing steps, B=2, 116 ROIs x 160 frames")
    print(f"dense: {t['dense_step_s'] * 1e3:.1f} ms/step  {t['dense_tokens_per_s']:.0f} tokens/s")
    print(f"moe:   {t['moe_step_s'] * 1e3:.1f} ms/step  {t['moe_tokens_per_s']:.0f} tokens/s")
    print(f"moe / dense step time: {t['moe_over_dense']:.2f}x (goal <= 1.2x)")


def _abide_figures(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shards = abide_shards(Path(tmp), args.abide_limit)
        print(f"\n(ABIDE CC200 shards written in {time.perf_counter() - t0:.1f} s)")
        b = balance(shards, args.balance_steps, warmup=args.balance_steps // 2, rate=0.01)
        print(f"== expert load max/mean after warmup ({args.balance_steps} steps, mean over steps > {args.balance_steps // 2} and layers)")
        print(f"balancing on:  {b['on']:.2f} per step, {b['on_total']:.2f} over all steps after warmup (goal <= 1.5)")
        print(f"balancing off: {b['off']:.2f} per step, {b['off_total']:.2f} over all steps after warmup")
        print(f"off / on: {b['off'] / b['on']:.2f}x")

        curve = loss_curve(shards, args.abide_seconds, Path(args.out))
        print(f"\n== ABIDE loss curve, {args.abide_seconds:.0f} s CPU run ({curve[-1][0] if curve else 0} steps)")
        shown = curve[:: max(1, len(curve) // 10)]
        for step, sec, loss in shown + ([curve[-1]] if curve and shown[-1] != curve[-1] else []):
            print(f"step {step:5d}  {sec:6.1f} s  loss {loss:.4f}")
        if curve:
            print(f"loss last / first: {curve[-1][2] / curve[0][2]:.2f}; plot: {Path(args.out) / 'pretrain_abide_loss.png'}")


if __name__ == "__main__":
    main()
