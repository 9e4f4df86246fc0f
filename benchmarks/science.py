"""Does pretraining learn something a probe can use? ABIDE leave-site-out figures of issue 14.

Everything runs through the CLI a user has (``neurocurate import-timeseries``, ``qc``, ``gradients``,
``shards``, ``pretrain``, ``evaluate``); this script only chains the commands, reads the reports they
write (``results.json``, ``predictions.tsv``) and prints:

1. per target (diagnosis, sex), leave-site-out over the six ABIDE dev sites: AUROC [95 % subject-bootstrap
   interval] of the pretrained MoE-JEPA for each readout (mean, per-ROI, ROI similarity, attentive probe,
   and fine-tuning when ``--finetune-epochs`` > 0, against a random encoder fine-tuned alike; that evaluation
   goes to ``eval_finetune<N>/``), the random encoder with the same readouts, Fisher-z and
   tangent connectivity; paired permutation p of pretrained vs random (same readout) and vs the best
   connectivity baseline, and the ratio to the best connectivity baseline (goal >= 0.95);
2. MoE vs the dense twin with equal active parameters (``cpu`` vs ``cpu_dense``), same readouts, paired p;
3. the learning curve: AUROC of each readout at 0 (random encoder), 1/4, 1/2 and all of the budget.

Budget: ``--steps`` pretraining steps (default: the ``cpu`` config's ``train.max_steps``). The two
pretraining runs (MoE, dense) run at the same time, one torch thread each (``--pretrain-threads``); the two
targets are evaluated at the same time. ``--dense-config '' --pretrain-threads 2`` times the MoE recipe alone on
two cores, as a user runs it. ``--steps 200`` gives a quick development run (about 10 minutes on 2 cores).

Usage::

    python benchmarks/science.py --workdir /tmp/nc_science            # full budget (see benchmarks/README.md)
    python benchmarks/science.py --workdir /tmp/nc_dev --steps 200     # development budget
    python benchmarks/science.py --shards OUT/shards ...               # reuse shards built before
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEUROCURATE_SHARED_DATA", REPO.parent / "shared" / "data"))
CLI = str(Path(sys.executable).with_name("neurocurate"))
READOUTS = {"linear": "mean", "roi": "per-ROI", "roi_similarity": "ROI similarity", "token_similarity": "token similarity"}
FC = ("fc_pearson", "fc_tangent")


def _run(args: list[str], log: Path, threads: int = 1) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1")
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _wait(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    for p, log in procs:
        if p.wait() != 0:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise SystemExit(f"command failed ({p.args[1:4]}), see {log}:\n{tail}")


def _cli(args: list[str], log: Path, threads: int = 2) -> None:
    _wait([(_run([CLI, *args], log, threads), log)])


def prepare_shards(work: Path, sites: list[str] | None = None) -> Path:
    """ABIDE CC200 of the six dev sites (or ``sites``) -> import -> group QC -> gradients -> shards, all through the CLI."""
    out = work / "abide_out"
    shards = out / "shards"
    if (shards / "index.parquet").is_file():
        return shards
    abide = SHARED / "abide"
    logs = work / "logs"
    _cli(["import-timeseries", str(abide / "rois_cc200"), "--phenotypes", str(abide / "Phenotypic_V1_0b_preprocessed1.csv"),
          "-o", str(out), *(["--sites", *sites] if sites else [])], logs / "import.log")
    _cli(["qc", str(out)], logs / "qc.log")
    _cli(["gradients", str(out), "--atlas", "CC200"], logs / "gradients.log")
    _cli(["shards", str(out)], logs / "shards.log")
    return shards


def budget_config(name: str, steps: int | None, work: Path) -> tuple[Path, int]:
    """The named config with ``max_steps = steps`` and checkpoints at 1/4, 1/2, 3/4 and all of it (a TOML file)."""
    from pipeline.core.config import dump_config
    from pipeline.pretrain.config import load_pretrain_config

    cfg = load_pretrain_config(name)
    steps = steps or cfg.train.max_steps
    quarter = max(1, steps // 4)
    train = dataclasses.replace(cfg.train, max_steps=steps, checkpoint_every=quarter, keep_checkpoints=0,
                                warmup_steps=min(cfg.train.warmup_steps, max(1, steps // 10)))
    path = work / f"pretrain_{name}_{steps}.toml"
    path.write_text(dump_config(dataclasses.replace(cfg, train=train)))
    return path, steps


def eval_config(work: Path, name: str, baselines: tuple[str, ...], attentive: bool, finetune_epochs: int,
                bootstrap: int, permutations: int) -> Path:
    path = work / f"evaluate_{name}.toml"
    lines = ["[evaluate]", f"baselines = {json.dumps(list(baselines))}", f"attentive_probe = {str(attentive).lower()}",
             f"finetune_epochs = {finetune_epochs}", f"bootstrap_resamples = {bootstrap}", f"permutations = {permutations}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}.pt"


def _eval_dir(work: Path, target: str, tag: str, finetune_epochs: int) -> Path:
    """Where one evaluation writes; the full one with fine-tuning has its own folder (the others do not change)."""
    root = work / ("eval" if tag != "moe" or finetune_epochs == 0 else f"eval_finetune{finetune_epochs}")
    return root / target / tag.replace("/", "_").replace("@", "_at_")


def _preds(eval_dir: Path) -> tuple[pd.DataFrame, dict]:
    table = pd.read_csv(eval_dir / "predictions.tsv", sep="\t", dtype={"subject": str})
    res = json.loads((eval_dir / "results.json").read_text())
    return table, res


def _paired(table_a: pd.DataFrame, col_a: str, table_b: pd.DataFrame, col_b: str, positive: str, n: int) -> dict:
    from pipeline.evaluation.metrics import paired_permutation_test

    a = table_a.set_index("sample_id")
    b = table_b.set_index("sample_id").loc[a.index]
    y = (a["y_true"].astype(str) == positive).to_numpy().astype(int)
    return paired_permutation_test(y, a[col_a].to_numpy(), b[col_b].to_numpy(), "classification", "auroc",
                                   groups=a["subject"].astype(str).to_numpy(), n_permutations=n, seed=0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/nc_science")
    ap.add_argument("--shards", help="existing shards folder (skips import/QC/gradients/shards)")
    ap.add_argument("--sites", nargs="+", help="import only these ABIDE sites (development; default all six)")
    ap.add_argument("--config", default="cpu", help="MoE pretraining config (default cpu)")
    ap.add_argument("--dense-config", default="cpu_dense", help="dense twin with equal active parameters ('' to skip)")
    ap.add_argument("--steps", type=int, help="pretraining budget (default: the config's train.max_steps)")
    ap.add_argument("--pretrain-threads", type=int, default=1,
                    help="torch threads per pretraining run (1: MoE and dense share 2 cores; 2 with --dense-config '' "
                         "times the recipe alone on 2 cores)")
    ap.add_argument("--targets", nargs="+", default=["diagnosis", "sex"])
    ap.add_argument("--finetune-epochs", type=int, default=0, help="add end-to-end fine-tuning (epochs per fold)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--permutations", type=int, default=1000)
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    shards = Path(args.shards) if args.shards else prepare_shards(work, args.sites)
    print(f"data: {shards} ({time.perf_counter() - t0:.0f} s)")

    # -- pretraining: MoE and dense at the same time, --pretrain-threads each
    runs: dict[str, tuple[Path, int]] = {}
    procs = []
    t0 = time.perf_counter()
    for kind, name in (("moe", args.config), ("dense", args.dense_config)):
        if not name:
            continue
        cfg_path, steps = budget_config(name, args.steps, work)
        run = work / f"run_{name}_{steps}"
        runs[kind] = (run, steps)
        if _checkpoint(run, steps).is_file():
            continue
        log = work / "logs" / f"pretrain_{kind}.log"
        procs.append((_run([CLI, "pretrain", str(shards), "--config", str(cfg_path), "--out", str(run), "--no-progress"],
                           log, args.pretrain_threads), log))
    _wait(procs)
    t_pre = time.perf_counter() - t0
    for kind, (run, steps) in runs.items():
        m = pd.read_json(run / "metrics.jsonl", lines=True)
        print(f"pretraining {kind}: {steps} steps, loss {m['loss'].iloc[0]:.4f} -> {m['loss'].iloc[-1]:.4f}, "
              f"{m['tokens_per_s'].median():.0f} tokens/s (median)")
    print(f"pretraining wall time ({len(procs)} run(s) trained at once, {args.pretrain_threads} thread(s) each): {t_pre:.0f} s")

    # -- evaluation: per target, the full comparison on the final MoE checkpoint, readouts only elsewhere
    moe_run, steps = runs["moe"]
    full = eval_config(work, "full", ("fc_pearson", "fc_tangent", "random_encoder"), True, args.finetune_epochs,
                       args.bootstrap, args.permutations)
    light = eval_config(work, "readouts", (), False, 0, args.bootstrap, args.permutations)
    jobs: list[tuple[str, list[tuple[str, Path, Path, Path]]]] = []  # target, [(tag, run, checkpoint, eval config)]
    t0 = time.perf_counter()
    for target in args.targets:
        evals = [("moe", moe_run, _checkpoint(moe_run, steps), full)]
        evals += [(f"moe@{f}", moe_run, _checkpoint(moe_run, max(1, steps // 4) * k), light) for f, k in (("1/4", 1), ("1/2", 2))]
        if "dense" in runs:
            evals.append(("dense", runs["dense"][0], _checkpoint(runs["dense"][0], runs["dense"][1]), light))
        jobs.append((target, evals))
    # One process per target; each target's evaluations run one after the other (embeddings are cached per run).
    procs = []
    for target, evals in jobs:
        script = ["set -e"]
        for tag, run, ckpt, cfg in evals:
            out = _eval_dir(work, target, tag, args.finetune_epochs)
            if (out / "results.json").is_file():
                continue
            script.append(" ".join([CLI, "evaluate", str(run), "--shards", str(shards), "--target", target, "--split", "site",
                                    "--checkpoint", str(ckpt), "--config", str(cfg), "--out", str(out),
                                    "--atlas-image", str(SHARED / "abide" / "CC200_ROIs_3mm.nii.gz")]))
        log = work / "logs" / f"evaluate_{target}.log"
        procs.append((_run(["bash", "-c", "\n".join(script)], log), log))
    _wait(procs)
    t_eval = time.perf_counter() - t0
    print(f"evaluation wall time ({len(args.targets)} targets in parallel): {t_eval:.0f} s")

    for target, evals in jobs:
        _report(target, evals, work, args.permutations, args.finetune_epochs)
    print(f"\ntotal wall time: {time.perf_counter() - t_all:.0f} s; load average at end: "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))


def _sign(difference: float) -> str:
    return "better" if difference > 0 else "worse" if difference < 0 else "equal"


def _report(target: str, evals, work: Path, permutations: int, finetune_epochs: int) -> None:
    from pipeline.evaluation.metrics import holm_adjust

    out = {tag: _eval_dir(work, target, tag, finetune_epochs) for tag, *_ in evals}
    main_table, res = _preds(out["moe"])
    classes = res["classes"]
    positive = classes[-1]
    col = lambda model: f"{model}__p_{positive}"
    models = res["models"]
    auc = lambda m: m["metrics"]["auroc"]
    best_fc = max((m for m in FC if m in models), key=lambda m: auc(models[m])["value"])
    best_val = auc(models[best_fc])["value"]
    print(f"\n== {target}: leave-site-out over {', '.join(f['name'].removeprefix('site-') for f in res['folds'])}; "
          f"{res['n_tested']} subjects; positive class {positive}; checkpoint step {res['step']}; "
          f"evaluation {res['seconds']['total']:.0f} s")
    print(f"{'model':32s} {'AUROC [95% CI]':22s} {'/best FC':>8s} {'p vs random (same readout)':>27s} {'Holm':>6s} "
          f"{'p vs ' + best_fc:>18s}")
    rows, vs_random = [], {}
    for name, info in models.items():
        a = auc(info)
        line = f"{name:32s} {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}] {a['value'] / best_val:8.2f}"
        p_rand = p_fc = ""
        if name.startswith("moe_jepa_"):
            readout = name.removeprefix("moe_jepa_")
            # the same readout (fine-tuning: the random encoder fine-tuned alike); the attentive probe: per-ROI
            rand = f"random_encoder_{readout}" if f"random_encoder_{readout}" in models else "random_encoder_roi"
            if rand in models:
                t = _paired(main_table, col(name), main_table, col(rand), positive, permutations)
                vs_random[name] = t
                p_rand = f"{t['p_value']:.4f} ({_sign(t['difference'])} vs {rand.removeprefix('random_encoder_')})"
            t = _paired(main_table, col(name), main_table, col(best_fc), positive, permutations)
            p_fc = f"{t['p_value']:.4f} ({_sign(t['difference'])})"
        rows.append((name, line, p_rand, p_fc))
    # every readout is a try at beating the random encoder: Holm over them (family-wise, per target)
    holm = dict(zip(vs_random, holm_adjust([t["p_value"] for t in vs_random.values()]))) if vs_random else {}
    for name, line, p_rand, p_fc in rows:
        print(f"{line} {p_rand:>27s} {f'{holm[name]:.3f}' if name in holm else '':>6s} {p_fc:>18s}")
    wins = [n.removeprefix("moe_jepa_") for n, t in vs_random.items() if t["difference"] > 0 and holm[n] < 0.05]
    print(f"pretrained beats the random encoder (Holm-adjusted p < 0.05 over {len(vs_random)} readouts): "
          f"{', '.join(wins) if wins else 'no readout'}")
    if "dense" in out:
        dense_table, dres = _preds(out["dense"])
        print(f"-- MoE vs dense (equal active parameters), same readouts, step {dres['step']}")
        for r in READOUTS:
            m, d = f"moe_jepa_{r}", f"moe_jepa_{r}"
            if m not in models or d not in dres["models"]:
                continue
            t = _paired(main_table, col(m), dense_table, col(d), positive, permutations)
            da = auc(dres["models"][d])
            print(f"{READOUTS[r]:16s} MoE {auc(models[m])['value']:.3f}  dense {da['value']:.3f} [{da['low']:.3f}, {da['high']:.3f}]  "
                  f"difference {t['difference']:+.3f}, p = {t['p_value']:.4f}")
    print("-- learning curve (AUROC; step 0 = random encoder)")
    steps = {"0": ("random", models)}
    for tag in ("moe@1/4", "moe@1/2"):
        if tag in out and (out[tag] / "results.json").is_file():
            r = json.loads((out[tag] / "results.json").read_text())
            steps[tag.removeprefix("moe@")] = (r["step"], r["models"])
    steps["all"] = (res["step"], models)
    print(f"{'readout':16s} " + " ".join(f"{k + ' (' + str(v[0]) + ')':>14s}" for k, v in steps.items()))
    for r in READOUTS:
        vals = []
        for k, (_, ms) in steps.items():
            name = f"random_encoder_{r}" if k == "0" else f"moe_jepa_{r}"
            vals.append(f"{auc(ms[name])['value']:14.3f}" if name in ms else f"{'n/a':>14s}")
        print(f"{READOUTS[r]:16s} " + " ".join(vals))


if __name__ == "__main__":
    main()
