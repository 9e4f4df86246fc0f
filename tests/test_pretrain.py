"""JEPA models, trainer, checkpoints, exact resume, config and the ``pretrain`` command."""

from __future__ import annotations

import re

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.config import ConfigError
from pipeline.core.errors import InputError
from pipeline.pretrain.checkpoint import latest_checkpoint, load_checkpoint
from pipeline.pretrain.config import PretrainConfig, config_from_dict, load_pretrain_config, named_configs
from pipeline.pretrain.train import Trainer, build_collator, build_model, lr_lambda


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors on a shared 2-core machine: intra-op threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _cfg(modality: str = "fmri", router: str = "topk", **train) -> PretrainConfig:
    cfg = load_pretrain_config("tiny")
    t = {"max_steps": 6, "checkpoint_every": 3, "log_every": 1, "warmup_steps": 2, **train}
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, modality=modality),
        anat=dataclasses.replace(cfg.anat, volume_shape=(16, 16, 24), patch=8, target_ratio=0.5),
        moe=dataclasses.replace(cfg.moe, router=router, capacity_factor=0.0, states=("rest", "task")),
        train=dataclasses.replace(cfg.train, **t),
    )


def _fmri_data(n: int = 10, R: int = 12, T: int = 70) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 6.28, T)
    out = []
    for i in range(n):
        phase = torch.rand(R, 1, generator=g) * 6.28
        x = torch.sin(t[None] * (1 + i % 3) + phase) + 0.1 * torch.randn(R, T, generator=g)
        out.append({"x": x, "gradients": torch.randn(R, 30, generator=g), "subject": f"sub-{i % 4}",
                    "task": ("rest", "task")[i % 2]})
    return out


def _anat_data(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.zeros(1, 18, 18, 22)
        x[0, 3:15, 3:15, 4:18] = 1.0 + 0.2 * torch.randn(12, 12, 14, generator=g)
        out.append({"x": x, "subject": f"sub-{i}"})
    return out


@pytest.mark.parametrize("modality,data", [("fmri", _fmri_data), ("anat", _anat_data)])
def test_one_optimizer_step_lowers_loss_on_fixed_batch(modality, data):
    cfg = _cfg(modality)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = build_collator(cfg, 0)(data()[:4], 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss0, logs = model(batch)
    assert torch.isfinite(loss0) and "jepa_loss" in logs
    loss0.backward()
    frozen = [p.grad for p in model.target_encoder.parameters()]
    assert all(g is None for g in frozen)  # the target encoder gets no gradient
    opt.step()
    with torch.no_grad():
        loss1, _ = model(batch)
    assert loss1 < loss0


def test_ema_update_is_foreach_lerp():
    cfg = _cfg()
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    src = [p.clone() for p in model.encoder.parameters()]
    model.encoder.vit.blocks[1].ffn.router.bias_E.fill_(0.25)
    model.update_target(0.9)
    for b, s, t in zip(before, src, model.target_encoder.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    assert torch.all(model.target_encoder.vit.blocks[1].ffn.router.bias_E == 0.25)


def test_lr_schedule_warmup_then_cosine():
    assert lr_lambda(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert lr_lambda(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_lambda(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_lambda(12, 4, 20, 0.1) == pytest.approx(0.55)
    assert lr_lambda(20, 4, 20, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("router", ["topk", "expert_choice", "subject_prior", "state_experts"])
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, router):
    cfg = _cfg(router=router)
    full = Trainer(cfg, _fmri_data(), tmp_path / "full", progress=False).fit()
    first = Trainer(cfg, _fmri_data(), tmp_path / "split", progress=False).fit(3)
    assert latest_checkpoint(tmp_path / "split").name == "step-00000003.pt"
    resumed = Trainer(cfg, _fmri_data(), tmp_path / "split", progress=False)
    assert resumed.step == 3
    rest = resumed.fit()
    assert [h["loss"] for h in first + rest] == [h["loss"] for h in full]
    a = load_checkpoint(latest_checkpoint(tmp_path / "full"))["model"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "split"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_contents_and_weights_only(tmp_path):
    cfg = _cfg(max_steps=3)
    Trainer(cfg, _fmri_data(), tmp_path, progress=False).fit()
    path = latest_checkpoint(tmp_path)
    payload = torch.load(path, weights_only=True)
    assert {"step", "model", "optimizer", "scheduler", "config", "ranks"} <= set(payload)
    assert any(k.startswith("target_encoder.") for k in payload["model"])
    assert any(k.endswith("router.bias_E") for k in payload["model"])
    assert payload["ranks"][0]["loader"] == {"epoch": 1, "offset": 2}  # 12 samples of 10 taken
    assert isinstance(payload["ranks"][0]["rng"]["torch"], torch.Tensor)
    bias = payload["model"]["encoder.vit.blocks.1.ffn.router.bias_E"]
    assert bias.abs().sum() > 0 and abs(float(bias.sum())) < 1e-6  # balancing ran, zero-mean
    assert not list(tmp_path.glob("checkpoints/.*"))  # no temp files left behind
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=48, heads=2))
    with pytest.raises(InputError, match="does not fit the model of this config"):
        Trainer(wider, _fmri_data(), tmp_path, progress=False)
    bad = tmp_path / "checkpoints" / "step-00000009.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a loadable checkpoint"):
        Trainer(cfg, _fmri_data(), tmp_path, progress=False)


def test_metrics_and_resolved_config(tmp_path):
    cfg = _cfg("anat", router="subject_prior", max_steps=2)
    hist = Trainer(cfg, _anat_data(), tmp_path, progress=False).fit()
    assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)
    assert load_pretrain_config(tmp_path / "pretrain_config.toml") == cfg
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "lr", "tokens_per_s", "moe/0/load_max_mean", "moe/0/entropy", "moe/0/dropped", "aux_loss"):
        assert key in rec


def test_config_errors(tmp_path):
    assert {"tiny", "small", "base", "cpu", "cpu_dense", "gpu", "anat_tiny", "anat_small"} <= set(named_configs())
    # structural runs need no hand-written TOML; every fMRI recipe uses Brain-JEPA's 30 gradient coordinates
    assert {n for n in named_configs() if load_pretrain_config(n).model.modality == "anat"} == {"anat_tiny", "anat_small"}
    assert all(load_pretrain_config(n).fmri.gradient_dim == 30 for n in named_configs())
    cpu, dense = load_pretrain_config("cpu"), load_pretrain_config("cpu_dense")
    assert not dense.moe.enabled and dense.model == cpu.model  # equal active FFN width: 4 x 64 = (1 + 1) x 128
    assert cpu.model.dim * cpu.model.mlp_ratio == (cpu.moe.num_shared + cpu.moe.top_k) * cpu.moe.expert_hidden
    with pytest.raises(ConfigError, match="no such named config"):
        load_pretrain_config("huge")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ndimm = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml.*unknown key"):
        load_pretrain_config(bad)
    with pytest.raises(ConfigError, match="multiple of fmri.patch"):
        config_from_dict({"fmri": {"num_frames": 100, "patch": 16}})
    with pytest.raises(ConfigError, match="must have 2 value"):
        config_from_dict({"fmri": {"obs_scale": [0.8]}})
    with pytest.raises(ConfigError, match=r"var_reg and model.cov_reg must be >= 0"):
        config_from_dict({"model": {"var_reg": -1.0}})


def test_empty_dataset_is_an_error(tmp_path):
    from pipeline.core.errors import NeurocurateError

    with pytest.raises(NeurocurateError, match="no samples"):
        Trainer(_cfg(), [], tmp_path, progress=False).fit(1)


def _write_fmri_shards(shards_dir: Path, n: int = 8, R: int = 12, T: int = 90, tasks=("rest",),
                       splits=("train",)) -> None:
    import pandas as pd

    from pipeline.store.write import write_shards

    rng = np.random.default_rng(0)
    arrays = {f"s{i}": rng.standard_normal((T, R)).astype(np.float32) for i in range(n)}
    samples = pd.DataFrame(
        {
            "sample_id": list(arrays),
            "subject": [f"sub-{i}" for i in range(n)],
            "store": "fmri-toy",
            "kind": "fmri",
            "atlas": "toy",
            "task": [tasks[i % len(tasks)] for i in range(n)],
            "split": [splits[i % len(splits)] for i in range(n)],
        }
    )
    names = [f"roi{r}" for r in range(R)]
    write_shards(samples, shards_dir, read_sample=lambda row: {"x_TR": arrays[row["sample_id"]], "roi_names": names})


def _pretrain(argv: list[str]) -> int:
    """Run the ``pretrain`` sub-command the way ``neurocurate`` does."""
    from pipeline.cli import main

    return main(["pretrain", *argv])


def test_pretrain_command_on_shards(tmp_path, capsys):
    shards = tmp_path / "shards"
    _write_fmri_shards(shards)
    config = tmp_path / "toy.toml"
    config.write_text(
        "[model]\ndim = 16\ndepth = 2\nheads = 2\npred_dim = 8\npred_depth = 1\npred_heads = 2\n"
        "[fmri]\nnum_frames = 64\n[moe]\nnum_experts = 4\nexpert_hidden = 16\n"
        "[train]\nbatch_size = 2\nmax_steps = 3\nwarmup_steps = 1\ncheckpoint_every = 2\nlog_every = 1\n"
    )
    run = tmp_path / "run"
    assert _pretrain([str(shards), "--config", str(config), "--out", str(run), "--no-progress"]) == 0
    assert "step 3" in capsys.readouterr().out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert latest_checkpoint(run).name == "step-00000003.pt"
    # the loader position is saved in the checkpoint and a rerun resumes at the end
    assert load_checkpoint(latest_checkpoint(run))["ranks"][0]["loader"]["dataset"]["consumed"] == [6]
    assert _pretrain([str(shards), "--config", str(config), "--out", str(run), "--no-progress", "--max-steps", "4"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def test_pretrain_command_bad_inputs(tmp_path, capsys):
    assert _pretrain([str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    assert re.search("no index.parquet", capsys.readouterr().err)
    assert _pretrain([str(tmp_path), "--config", "gigantic", "--out", str(tmp_path / "run")]) == 2
    assert re.search("no such named config", capsys.readouterr().err)
    shards = tmp_path / "shards"
    _write_fmri_shards(shards, n=2)
    anat = tmp_path / "anat.toml"
    anat.write_text('[model]\nmodality = "anat"\n')
    assert _pretrain([str(shards), "--config", str(anat), "--store", "fmri-toy", "--out", str(tmp_path / "r")]) == 2
    assert re.search("holds fmri data", capsys.readouterr().err)
    assert _pretrain([str(shards), "--store", "fmri-other", "--out", str(tmp_path / "r")]) == 2
    assert re.search("not in the index", capsys.readouterr().err)


def test_bf16_autocast_step_runs(tmp_path):
    # The GPU path (bf16 autocast) exercised on the CPU: dtypes in the MoE dispatch must line up.
    cfg = _cfg(precision="bf16", max_steps=2, checkpoint_every=0)
    trainer = Trainer(cfg, _fmri_data(), tmp_path, progress=False)
    assert trainer.bf16
    hist = trainer.fit()
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


TOY = ("[model]\ndim = 16\ndepth = 2\nheads = 2\npred_dim = 8\npred_depth = 1\npred_heads = 2\n"
       "[fmri]\nnum_frames = 64\n[moe]\nnum_experts = 4\nexpert_hidden = 16\n{moe}"
       "[train]\nbatch_size = 2\nmax_steps = 3\nwarmup_steps = 1\ncheckpoint_every = 2\nlog_every = 1\n")


def test_state_experts_take_the_tasks_of_the_training_split_and_check_top_k(tmp_path, capsys):
    from pipeline.pretrain.moe import moe_layers

    shards = tmp_path / "shards"
    # train: rest and nback; the motor runs are all in the validation split
    _write_fmri_shards(shards, n=9, tasks=("rest", "nback", "motor"), splits=("train", "train", "val"))
    config = tmp_path / "state.toml"
    config.write_text(TOY.format(moe='router = "state_experts"\ntop_k = 2\n'))
    run = tmp_path / "run"
    assert _pretrain([str(shards), "--config", str(config), "--out", str(run), "--no-progress"]) == 0
    saved = config_from_dict(load_checkpoint(latest_checkpoint(run))["config"])
    assert saved.moe.states == ("nback", "rest")  # not the config's default, not the val-only task
    assert load_pretrain_config(run / "pretrain_config.toml").moe.states == ("nback", "rest")
    model = build_model(saved)
    assert [m.num_experts for m in moe_layers(model.encoder)] == [2]
    # more experts per token than tasks: refused before any model is built or checkpoint written
    config.write_text(TOY.format(moe='router = "state_experts"\ntop_k = 3\n'))
    capsys.readouterr()
    assert _pretrain([str(shards), "--config", str(config), "--out", str(tmp_path / "r3"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "index.parquet" in err and "moe.top_k = 3" in err and "['nback', 'rest']" in err and "\n" not in err
    assert not (tmp_path / "r3" / "checkpoints").exists()
    # explicit states must cover the training tasks; the config alone is checked at load time
    config.write_text(TOY.format(moe='router = "state_experts"\ntop_k = 1\nstates = ["rest"]\n'))
    assert _pretrain([str(shards), "--config", str(config), "--out", str(tmp_path / "r4"), "--no-progress"]) == 2
    assert "['nback'] of the training split are not in moe.states" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="moe.top_k = 2 but the state_experts router has 1 expert"):
        config_from_dict({"moe": {"router": "state_experts", "states": ["rest"], "top_k": 2}})


def test_resuming_on_other_data_is_refused(tmp_path, capsys):
    shards, other = tmp_path / "shards", tmp_path / "other"
    _write_fmri_shards(shards)
    _write_fmri_shards(other, R=10)
    config = tmp_path / "toy.toml"
    config.write_text(TOY.format(moe=""))
    run = tmp_path / "run"
    assert _pretrain([str(shards), "--config", str(config), "--out", str(run), "--no-progress", "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert _pretrain([str(other), "--config", str(config), "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "training_data.json" in err and "differs in n_rois, roi_names_sha256" in err and "--no-resume" in err
    # a new model on the other data is fine, and the record follows it
    assert _pretrain([str(other), "--config", str(config), "--out", str(run), "--no-progress", "--no-resume"]) == 0
    assert json.loads((run / "training_data.json").read_text())["n_rois"] == 10


def test_gradient_positions_carry_roi_identity_at_any_coordinate_scale():
    """Diffusion-map coordinates are ~0.05 in scale: the ROI code is min-max mapped to [-1, 1] (Brain-JEPA)."""
    from pipeline.pretrain.fmri_jepa import FMRIPositions

    torch.manual_seed(0)
    pos = FMRIPositions(gradient_dim=6, dim=32, patch=4)
    grad_BRk = 0.05 * torch.randn(2, 10, 6)
    table_BLD = pos({"gradients": grad_BRk, "x": torch.zeros(2, 10, 16)})
    roi_BRH = table_BLD.reshape(2, 10, 4, 32)[:, :, 0, :16]
    assert torch.allclose(roi_BRH.amin((1, 2)), torch.tensor(-1.0)) and torch.allclose(roi_BRH.amax((1, 2)), torch.tensor(1.0))
    # ROIs differ as much as time patches do (the sin-cos half has unit amplitude)
    assert roi_BRH.std(1).mean() > 0.2
    # a rescaled coordinate set gives the same code: only the geometry of the gradients matters
    assert torch.allclose(pos({"gradients": 10 * grad_BRk, "x": torch.zeros(2, 10, 16)}), table_BLD, atol=1e-5)


def test_collapse_monitor_and_vicreg_terms():
    from pipeline.pretrain.vit import token_spread, vicreg_terms

    g = torch.Generator().manual_seed(0)
    same = torch.ones(64, 8)
    spread = torch.randn(4096, 8, generator=g)
    assert float(token_spread(same)) == 0.0 and 0.95 < float(token_spread(spread)) < 1.05
    var, cov = vicreg_terms(same)
    assert float(var) == pytest.approx(0.99) and float(cov) == 0.0  # collapsed: the hinge is fully on
    var, cov = vicreg_terms(spread)
    assert float(var) < 0.03 and float(cov) < 0.01  # isotropic unit tokens: nothing to penalise
    correlated = torch.cat([spread[:, :1]] * 8, dim=1)
    assert float(vicreg_terms(correlated)[1]) > 5.0  # every channel the same: covariance penalised


def test_regulariser_is_trained_and_logged(tmp_path):
    base = _cfg(max_steps=2)
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, var_reg=1.0, cov_reg=0.04))
    hist = Trainer(cfg, _fmri_data(), tmp_path, progress=False).fit()
    assert all({"target_spread", "var_loss", "cov_loss"} <= set(h) for h in hist)
    assert all(h["loss"] > h["jepa_loss"] for h in hist)  # the terms are part of the objective
    plain = Trainer(base, _fmri_data(), tmp_path / "plain", progress=False).fit()
    assert all("target_spread" in h and "var_loss" not in h for h in plain)


def test_teacher_init_share_is_the_product_of_the_momenta(tmp_path):
    from pipeline.pretrain.train import ema_momentum, stale_teacher_warning, teacher_init_share

    # I-JEPA's schedule trains the teacher; the slow teacher over 1600 steps leaves it two thirds initialisation
    assert teacher_init_share((0.996, 1.0), 1600, 1600) == pytest.approx(0.0405, abs=1e-3)
    assert teacher_init_share((0.9995, 1.0), 1600, 1600) == pytest.approx(0.670, abs=1e-3)
    assert teacher_init_share((0.9, 1.0), 10, 0) == 1.0
    assert teacher_init_share((0.9, 1.0), 10, 3) == pytest.approx(0.9 * 0.91 * 0.92)
    assert ema_momentum((0.9, 1.0), 10, 3) == pytest.approx(0.93) and ema_momentum((0.9, 1.0), 10, 50) == 1.0
    # the trainer logs the same running product, also across a resume
    cfg = _cfg(max_steps=4)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema=(0.9, 1.0), checkpoint_every=2))
    Trainer(cfg, _fmri_data(), tmp_path, progress=False).fit(max_steps=2)
    hist = Trainer(cfg, _fmri_data(), tmp_path, progress=False).fit()
    assert [h["step"] for h in hist] == [3, 4]
    assert hist[-1]["teacher_init"] == pytest.approx(teacher_init_share((0.9, 1.0), 4, 4))
    assert stale_teacher_warning(hist, (0.9, 1.0)) is not None  # 0.9 * 0.925 * 0.95 * 0.975 = 0.77
    text = stale_teacher_warning([{"step": 1600, "teacher_init": 0.67}], (0.9995, 1.0))
    assert "still 67% its random initialisation after 1600 steps" in text and "[0.9995, 1.0]" in text
    assert stale_teacher_warning([{"step": 1600, "teacher_init": 0.04}], (0.996, 1.0)) is None


@pytest.mark.parametrize("name", ["small", "base", "cpu", "cpu_dense", "gpu", "anat_small"])
def test_recipes_end_with_a_trained_teacher(name):
    # evaluate reads the EMA target encoder: a recipe must not leave it mostly its random initialisation
    # (the smoke configs tiny / anat_tiny run 50 steps and are exempt)
    from pipeline.pretrain.train import STALE_TEACHER_SHARE, teacher_init_share

    t = load_pretrain_config(name).train
    assert teacher_init_share(t.ema, t.max_steps, t.max_steps) <= STALE_TEACHER_SHARE


def test_content_gain_against_the_position_mean(tmp_path):
    from pipeline.pretrain.vit import content_gain

    g = torch.Generator().manual_seed(0)
    target = torch.randn(50, 8, generator=g)
    mean = target + torch.randn(50, 8, generator=g)
    assert float(content_gain(target, target, mean)) == pytest.approx(1.0)
    assert float(content_gain(mean, target, mean)) == pytest.approx(0.0)
    assert float(content_gain(target + 2 * (mean - target), target, mean)) == pytest.approx(-3.0)
    # the mean of 15 other samples: a predictor that knows the population mean scores 0, not 1/16
    pop = torch.zeros(20000, 4)
    sample = torch.randn(20000, 4, generator=g)
    others = pop + torch.randn(20000, 4, generator=g) / 15 ** 0.5
    assert float(content_gain(pop, sample, others, baseline_n=15)) == pytest.approx(0.0, abs=0.02)
    assert float(content_gain(pop, sample, others)) == pytest.approx(1 / 16, abs=0.02)
    # every training step with more than one sample logs it
    hist = Trainer(_cfg(max_steps=2), _fmri_data(), tmp_path, progress=False).fit()
    assert all("content_gain" in h and h["content_gain"] < 1.0 for h in hist)


def test_collapse_warning_names_the_spread():
    from pipeline.pretrain.train import collapse_warning

    healthy = [{"step": i, "target_spread": 0.8} for i in range(30)]
    collapsed = healthy + [{"step": 30 + i, "target_spread": 0.02} for i in range(20)]
    assert collapse_warning(healthy) is None and collapse_warning([{"step": 1, "loss": 0.1}]) is None
    text = collapse_warning(collapsed)
    assert text is not None and "collapsed (target_spread 0.020 < 0.1" in text and "var_reg" in text and "ema" in text


def test_distance_bias_attends_to_the_nearest_position_and_never_to_mask_tokens():
    from pipeline.pretrain.vit import Attention, Predictor, TransformerConfig, init_weights

    g = torch.Generator().manual_seed(0)
    attn = Attention(8, 2, distance_bias=200.0)
    x_BND = torch.randn(1, 6, 8, generator=g)
    pos_NP = torch.tensor([[0.0], [1.0], [2.0], [3.0], [0.1], [2.9]])
    # keys are the first 4 tokens only
    out_BND = attn(x_BND, torch.cdist(pos_NP, pos_NP[:4])[None].pow(2))
    v_BND = attn.qkv(x_BND)[..., 16:]
    # a very sharp kernel: each token reads the value of the nearest unmasked key (itself or 0 / 3 for 4 / 5)
    nearest = [0, 1, 2, 3, 0, 3]
    assert torch.allclose(out_BND, attn.proj(v_BND[:, nearest]), atol=1e-4)
    assert attn.beta_h.detach().tolist() == pytest.approx([200.0, 20.0])
    # a soft kernel equals softmax(q k^T / sqrt(d) - beta * dist) v over the 4 keys, per head
    soft = Attention(8, 2, distance_bias=0.5)
    dist_NK = torch.cdist(pos_NP, pos_NP[:4]).pow(2)
    q, k, v = soft.qkv(x_BND)[0].reshape(6, 3, 2, 4).unbind(1)  # each [N, h, d]
    logits_hNK = torch.einsum("nhd,khd->hnk", q, k[:4]) / 2.0 - soft.beta_h.abs()[:, None, None] * dist_NK
    ref_NhD = torch.einsum("hnk,khd->nhd", logits_hNK.softmax(-1), v[:4]).reshape(1, 6, 8)
    assert torch.allclose(soft(x_BND, dist_NK[None]), soft.proj(ref_NhD), atol=1e-5)
    # in the predictor a target's prediction depends on the context and its own position only
    pred = Predictor(16, TransformerConfig(8, 2, 2, 2.0, None, distance_bias=3.0))
    init_weights(pred)
    pos_BLP = torch.randn(1, 30, 8, generator=g)
    z_BCD = torch.randn(1, 10, 16, generator=g)
    ctx_BC = torch.arange(10)[None]
    both = pred(z_BCD, pos_BLP, ctx_BC, torch.tensor([[12, 20]]), {})
    alone = pred(z_BCD, pos_BLP, ctx_BC, torch.tensor([[12]]), {})
    assert torch.allclose(both[:, :1], alone, atol=1e-5)
    plain = Predictor(16, TransformerConfig(8, 2, 2, 2.0, None))
    init_weights(plain)
    assert not torch.allclose(plain(z_BCD, pos_BLP, ctx_BC, torch.tensor([[12, 20]]), {})[:, :1],
                              plain(z_BCD, pos_BLP, ctx_BC, torch.tensor([[12]]), {}), atol=1e-5)


@pytest.mark.parametrize("distance_bias", [0.0, 3.0])
def test_predictor_learns_a_target_from_its_neighbours_only_with_the_distance_bias(distance_bias):
    """The defect behind issue 14's 'no better than random': plain attention does not learn to route content.

    Each target is a fixed linear map of the mean content of the context tokens nearest to its position.
    In 150 Adam steps the plain predictor explains none of it (R2 ~ 0); with the distance bias it does.
    """
    from pipeline.pretrain.vit import Predictor, TransformerConfig, init_weights, sincos_1d

    torch.manual_seed(0)
    L, C, M, D, P, B = 240, 100, 40, 32, 16, 8
    pred = Predictor(D, TransformerConfig(P, 2, 2, 4.0, None, distance_bias=distance_bias))
    init_weights(pred)
    roi = torch.rand(40, P // 2) * 2 - 1
    pos_LP = torch.cat([roi[:, None].expand(40, 6, -1), sincos_1d(torch.arange(6), P // 2)[None].expand(40, 6, -1)],
                       -1).reshape(L, P)
    A_DD = torch.randn(D, D) / D**0.5
    opt = torch.optim.AdamW(pred.parameters(), lr=2e-3)
    r2 = []
    for _ in range(150):
        perm = torch.stack([torch.randperm(L)[: C + M] for _ in range(B)])
        ctx_BC, tgt_BM = perm[:, :C], perm[:, C:]
        z_BCD = torch.nn.functional.layer_norm(torch.randn(B, C, D), (D,))
        near_BMk = torch.cdist(pos_LP[tgt_BM], pos_LP[ctx_BC]).topk(3, largest=False).indices
        target = torch.nn.functional.layer_norm(
            torch.stack([z_BCD[b, near_BMk[b]].mean(1) for b in range(B)]) @ A_DD, (D,))
        out = pred(z_BCD, pos_LP[None].expand(B, -1, -1), ctx_BC, tgt_BM, {})
        loss = torch.nn.functional.smooth_l1_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        r2.append(1 - float((out - target).detach().pow(2).sum() / target.pow(2).sum()))
    if distance_bias:
        assert np.mean(r2[-20:]) > 0.15
    else:
        assert np.mean(r2[-20:]) < 0.05
