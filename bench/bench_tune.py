#!/usr/bin/env python
"""Benchmark of the tuning layer: what a trial costs, and what TPE + ASHA buys over random search.

1. **Trial overhead** (CPU): the same one-epoch configuration run (a) in this process with the core
   Trainer, (b) as Tune trials, each a Ray Train run, one at a time. Overhead per trial = Tune's time of
   the trial (first to last report) minus (a); wall per trial = the experiment's wall time / trials.
2. **Sample efficiency** at an equal budget of epochs, on a small real problem (the CIFAR-10 copy, a tiny
   student, a subset of the images): TPE + ASHA (``--epoch-budget B``: as many trials as ASHA's early
   stopping lets fit in B epochs) against random search without early stopping (B / epochs trials run to
   the end), a few seeds each. Reported: best validation W-Robust found, trials run, epochs used, wall
   time, and the test W-Robust of each search's selected student.

Every run goes through ``run_tune.py`` in a subprocess (a fresh Ray each time); teachers are trained once
into a shared cache. Prints tables with the hardware and versions; it is never run by the tests.

    python bench/bench_tune.py --data-root data                       # the default (about an hour on 2 CPUs)
    python bench/bench_tune.py --data-root data --seeds 0 1 --budget 16 --overhead-trials 3   # a small one
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The small real problem: the small CNN (student and both teachers) on 4,096 CIFAR-10 training images,
# 3-step training PGD, validation (PGD-20) on 256 images. The joint space (both balances, learning rate,
# weight decay) has knobs that matter at this scale.
PROBLEM = ["--preset", "smoke", "--student", "small_cnn", "--set", "data.train_subset=4096",
           "--set", "val_examples=256", "--set", "attack.steps=3", "--set", "optim.batch_size=64",
           "--set", "optim.milestones=[100]", "--set", "teachers.clean.arch=small_cnn",
           "--set", "teachers.robust.arch=small_cnn", "--set", "teachers.clean.epochs=4",
           "--set", "teachers.robust.epochs=4", "--set", "teachers.clean.batch_size=64",
           "--set", "teachers.robust.batch_size=64"]
# Trial overhead is measured on the smoke preset as is (tiny model, 256 images): almost no work to time.
OVERHEAD_PROBLEM = ["--preset", "smoke"]


def run_cli(args: list[str], log: Path) -> tuple[int, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, str(REPO / "run_tune.py"), *args], env=env, stdout=f,
                              stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - start


def rows_of(exp: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(exp / "trials.parquet").to_pylist()


def local_run_seconds(common: list[str], epochs: int) -> float:
    """The same configuration trained in this process (data loading, model, teachers, epochs, validation)."""
    import torch

    from bmtard_ray.cli.tune import base_config, tune_parser
    from bmtard_ray.training.trainer import Trainer
    from bmtard_ray.tuning.space import load_space

    torch.set_num_threads(1)  # a trial's worker gets one CPU
    args = tune_parser().parse_args(["--space", "smoke", *common, "--epochs", str(epochs)])
    cfg = base_config(args, load_space("smoke"))
    from rich.console import Console

    from bmtard_ray.launch.local import run_local
    from bmtard_ray.training.teachers import ensure_teachers

    # In this process (the search itself trains missing teachers as Ray tasks; this timing has no Ray).
    cfg = ensure_teachers(cfg, lambda t: run_local(t, overwrite=True, console=Console(quiet=True)), log=lambda s: None)
    start = time.perf_counter()
    Trainer(cfg).fit()
    return time.perf_counter() - start


def overhead(args: argparse.Namespace, out: Path, common: list[str]) -> dict[str, float]:
    local = local_run_seconds(common, 1)
    exp = out / "overhead"
    code, wall = run_cli(["--space", "smoke", *common, "--epochs", "1", "--num-samples", str(args.overhead_trials),
                          "--max-concurrent", "1", "--scheduler", "fifo", "--output-dir", str(out), "--name",
                          "overhead", "--final-attacks", "clean", "--final-examples", "64", "--quiet",
                          "--overwrite", "--num-cpus", str(args.num_cpus)], out / "overhead.log")
    if code != 0:
        raise SystemExit(f"the overhead run failed (exit {code}); see {out / 'overhead.log'}")
    times = [r["time_s"] for r in rows_of(exp)]
    return {"local_s": local, "trial_s": statistics.mean(times), "trial_sd": statistics.pstdev(times),
            "overhead_s": statistics.mean(times) - local, "wall_per_trial_s": wall / len(times), "wall_s": wall,
            "trials": len(times)}


def search(args: argparse.Namespace, out: Path, common: list[str], method: str, seed: int) -> dict[str, Any]:
    name = f"{method}-s{seed}"
    budget, epochs = args.budget, args.epochs
    if method == "tpe+asha":
        extra = ["--sampler", "tpe", "--scheduler", "asha", "--grace-period", "1", "--reduction-factor", "2",
                 "--num-samples", str(budget), "--epoch-budget", str(budget), "--n-startup-trials",
                 str(args.startup)]
    else:
        extra = ["--sampler", "random", "--scheduler", "fifo", "--num-samples", str(budget // epochs)]
    code, wall = run_cli(["--space", args.space, *common, "--epochs", str(epochs), "--search-seed", str(seed),
                          "--output-dir", str(out), "--name", name, "--final-attacks", "clean,pgd_sat",
                          "--final-examples", str(args.test_examples), "--quiet", "--overwrite",
                          "--num-cpus", str(args.num_cpus), *extra], out / f"{name}.log")
    if code != 0:
        raise SystemExit(f"search {name} failed (exit {code}); see {out / (name + '.log')}")
    rows = [r for r in rows_of(out / name) if r["val_w_robust"] is not None]
    summary = json.loads((out / name / "summary.json").read_text())
    best = summary["best"] or {}
    return {"method": method, "seed": seed, "best_val": max(r["val_w_robust"] for r in rows),
            "test": (best.get("test") or {}).get("w_robust", {}).get("pgd_sat"),
            "trials": len(rows), "epochs": sum(r["epochs"] for r in rows),
            "stopped": sum(bool(r["stopped_early"]) for r in rows), "wall_s": wall}


def fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default="runs/bench_tune")
    p.add_argument("--space", default="joint")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4, help="epochs of a full trial")
    p.add_argument("--budget", type=int, default=24, help="epochs per search (random: budget/epochs trials)")
    p.add_argument("--startup", type=int, default=3, help="TPE's random startup trials")
    p.add_argument("--overhead-trials", type=int, default=4)
    p.add_argument("--test-examples", type=int, default=500)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--skip-overhead", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shared = ["--data-root", str(Path(args.data_root).resolve()), "--set", f"teachers.cache_dir={out / 'teachers'}"]
    common = [*shared, *PROBLEM]

    import optuna
    import ray
    import torch

    print(f"# bench_tune: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (Ray: {args.num_cpus}), "
          f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
          f"optuna {optuna.__version__}")
    print(f"search problem: {' '.join(PROBLEM)}; space {args.space}; {args.epochs} epochs per full trial\n")
    if not args.skip_overhead:
        o = overhead(args, out, [*shared, *OVERHEAD_PROBLEM])
        print(f"## Trial overhead ({' '.join(OVERHEAD_PROBLEM)}, one-epoch trials, one at a time, 1 worker x 1 CPU)\n")
        print("| in-process run (s) | Tune trial (s) | overhead per trial (s) | wall per trial (s) | trials |")
        print("|---:|---:|---:|---:|---:|")
        print(f"| {o['local_s']:.1f} | {o['trial_s']:.1f} ± {o['trial_sd']:.1f} | {o['overhead_s']:.1f} | "
              f"{o['wall_per_trial_s']:.1f} | {o['trials']} |\n", flush=True)

    results = []
    for seed in args.seeds:
        for method in ("tpe+asha", "random"):
            r = search(args, out, common, method, seed)
            results.append(r)
            print(f"  {method} seed {seed}: best val W-Robust {r['best_val']:.2f}, test {r['test']}, "
                  f"{r['trials']} trials, {r['epochs']} epochs, {r['wall_s']:.0f} s", flush=True)
    print(f"\n## Sample efficiency at {args.budget} epochs per search (seeds {', '.join(map(str, args.seeds))})\n")
    print("| search | best val W-Robust | test W-Robust (selected) | trials | epochs used | stopped early | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method in ("tpe+asha", "random"):
        rs = [r for r in results if r["method"] == method]
        print(f"| {method} | {fmt([r['best_val'] for r in rs])} | {fmt([r['test'] for r in rs])} | "
              f"{fmt([r['trials'] for r in rs])} | {fmt([r['epochs'] for r in rs])} | "
              f"{fmt([r['stopped'] for r in rs])} | {fmt([r['wall_s'] for r in rs])} |")
    from bmtard_ray.runtime.fileio import atomic_text

    atomic_text(json.dumps(results, indent=2), out / "bench_tune.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
