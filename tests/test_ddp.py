"""Two-process DDP smoke run on gloo (CPU, localhost only): training, checkpoint, resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _cfg():
    from pipeline.pretrain.config import load_pretrain_config

    cfg = load_pretrain_config("tiny")
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, batch_size=2, max_steps=4, checkpoint_every=2, log_every=1, warmup_steps=1),
    )


def _data(rank: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own partition
    return [
        {"x": torch.randn(10, 64, generator=g), "gradients": torch.randn(10, 30, generator=g), "subject": f"sub-{rank}-{i}"}
        for i in range(5)
    ]


def _worker(rank: int, root: str) -> None:
    from pipeline.pretrain.train import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=WORLD)
    try:
        cfg = _cfg()
        full = Trainer(cfg, _data(rank), f"{root}/full", progress=False).fit()
        part = Trainer(cfg, _data(rank), f"{root}/split", progress=False).fit(2)
        resumed = Trainer(cfg, _data(rank), f"{root}/split", progress=False)
        start = resumed.step
        rest = resumed.fit()
        params = torch.cat([p.detach().reshape(-1) for p in resumed.model.parameters()])
        biases = torch.cat([b.reshape(-1) for n, b in resumed.model.named_buffers() if n.endswith("bias_E")])
        torch.save(
            {
                "full": torch.tensor([h["loss"] for h in full]),
                "split": torch.tensor([h["loss"] for h in part + rest]),
                "start": start,
                "params": params,
                "biases": biases,
            },
            f"{root}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_smoke_and_resume(tmp_path: Path):
    from pipeline.pretrain.checkpoint import latest_checkpoint, load_checkpoint

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    # gradients are all-reduced: both ranks hold the same weights and router biases
    torch.testing.assert_close(r0["params"], r1["params"])
    torch.testing.assert_close(r0["biases"], r1["biases"])
    assert r0["biases"].abs().sum() > 0
    # ranks see different data, so their local losses differ
    assert not torch.equal(r0["full"], r1["full"])
    # resume from the step-2 checkpoint reproduces the uninterrupted run on every rank
    assert r0["start"] == r1["start"] == 2
    for r in (r0, r1):
        assert torch.equal(r["full"], r["split"])
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    assert ckpt["step"] == 4 and len(ckpt["ranks"]) == WORLD
    assert [r["loader"] for r in ckpt["ranks"]] == [{"epoch": 1, "offset": 3}] * WORLD  # 8 of 5 samples each
    assert len((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()) == 4  # rank 0 logs once per step
