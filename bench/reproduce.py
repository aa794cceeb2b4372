#!/usr/bin/env python
"""The paper's comparison at reduced scale: SAT, TRADES, RSLAD, MTARD and B-MTARD on the same teachers,
student, data, epochs and seeds, each evaluated with the full suite on the test set; writes RESULTS.md.

    python bench/reproduce.py --scale smoke                 # seconds per method (CI)
    python bench/reproduce.py --scale cpu                   # 2-core CPU, a few hours
    python bench/reproduce.py --scale gpu --device cuda     # one H100/H200, ResNet-18 student

Finished runs are reused (a run folder with summary.json is skipped), so an interrupted comparison
continues where it stopped. Nothing here tunes anything toward a hoped-for ordering: every method gets
the same budget, and the table reports mean and standard deviation over seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bmtard_ray.config import RunConfig, build_config, to_dict  # noqa: E402
from bmtard_ray.runner import run_local  # noqa: E402
from bmtard_ray.teachers import ensure_teachers  # noqa: E402

METHODS = ("sat", "trades", "rslad", "mtard", "bmtard")
FULL_SUITE = ("clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "autoattack", "bb_pgd", "bb_cw")

# Per scale: base preset, overrides for every run, number of test examples for the suite.
SCALES: dict[str, dict[str, Any]] = {
    "smoke": {"preset": "smoke", "set": ["optim.epochs=1", "eval.n_examples=64"], "seeds": 2},
    "cpu": {"preset": "cpu", "set": ["eval.n_examples=1000"], "seeds": 3},
    "gpu": {"preset": "gpu-small", "set": ["optim.epochs=30", "optim.milestones=[22,27]", "eval.n_examples=2000",
                                           "teachers.clean.checkpoint=pyautoattack"], "seeds": 3},
}

# REFERENCE §6, CIFAR-10 ResNet-18 student, 300 epochs with the paper's teachers (percent).
PUBLISHED = {
    "sat": {"clean": 84.20, "fgsm": 55.59, "pgd_sat": 45.95, "pgd_trades": 48.12, "cw_inf": 45.97},
    "trades": {"clean": 83.00, "fgsm": 58.35, "pgd_sat": 52.35, "pgd_trades": 53.83, "cw_inf": 50.23},
    "rslad": {"clean": 83.99, "fgsm": 60.41, "pgd_sat": 53.94, "pgd_trades": 55.73, "cw_inf": 52.67},
    "mtard": {"clean": 87.36, "fgsm": 61.20, "pgd_sat": 50.73, "pgd_trades": 53.60, "cw_inf": 48.57},
    "bmtard": {"clean": 88.20, "pgd_sat": 51.68, "pgd_trades": 54.40, "cw_inf": 49.88, "autoattack": 47.44},
}


def base_config(args: argparse.Namespace, method: str, seed: int) -> RunConfig:
    scale = SCALES[args.scale]
    overrides = [f"data.root={args.data_root}", f"output_dir={args.out / 'runs'}", f"device={args.device}",
                 f"teachers.cache_dir={args.out / 'teachers'}", f"method.name={method}", f"seed={seed}",
                 f"name={method}-seed{seed}", f"eval.attacks=[{','.join(args.attacks)}]", *scale["set"], *args.set]
    return build_config(scale["preset"], overrides=overrides)


def exact_pixel_clean_accuracy(model_file: Path, shared: Path) -> float | None:
    """Clean accuracy on the 1,017 test images whose pixels are exact (no JPEG loss), for comparison."""
    import numpy as np

    from bmtard_ray.models import build_model

    prefix, jpeg = shared / "data" / "cifar10_exact_prefix.npz", shared / "data" / "cifar10_jpeg.npz"
    if not prefix.is_file() or not jpeg.is_file():
        return None
    x = torch.from_numpy(np.load(prefix)["test_exact"].reshape(-1, 3, 32, 32)).float() / 255
    y = torch.from_numpy(np.load(jpeg)["test_labels"][: x.shape[0]].astype("int64"))
    record = torch.load(model_file, weights_only=True)
    model = build_model(record["arch"], record["num_classes"])
    model.load_state_dict(record["state_dict"])
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return 100 * (pred == y).float().mean().item()


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt(m: float, s: float) -> str:
    return "-" if math.isnan(m) else f"{m:.2f} ± {s:.2f}"


def plots(out: Path, rows: dict[str, list[dict[str, Any]]], bmtard_run: Path | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    files = []
    fig, ax = plt.subplots(figsize=(5, 4))
    for method, runs in rows.items():
        clean = [r["accuracy"]["clean"] for r in runs]
        rob = [r["accuracy"]["pgd_sat"] for r in runs]
        ax.scatter(clean, rob, label=method)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("PGD-20 accuracy (%)")
    ax.legend()
    ax.set_title("Clean vs robust accuracy, one point per seed")
    fig.tight_layout()
    fig.savefig(out / "clean_vs_robust.png", dpi=120)
    files.append("clean_vs_robust.png")
    if bmtard_run is not None and (bmtard_run / "trace.parquet").is_file():
        t = pq.read_table(bmtard_run / "trace.parquet").to_pydict()
        it = t["iteration"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        axes[0].plot(it, t["tau_adv"], label="tau_adv (robust teacher)")
        axes[0].plot(it, t["tau_nat"], label="tau_nat (clean teacher)")
        axes[0].set_title("EBB temperatures")
        axes[1].plot(it, t["w_adv"], label="w_adv")
        axes[1].plot(it, t["w_nat"], label="w_nat")
        axes[1].set_title("NLB weights")
        r_adv = [v / t["L_adv"][0] for v in t["L_adv"]]
        r_nat = [v / t["L_nat"][0] for v in t["L_nat"]]
        axes[2].plot(it, r_adv, label="L_adv / L_adv(0)")
        axes[2].plot(it, r_nat, label="L_nat / L_nat(0)")
        axes[2].set_title("relative losses")
        for a in axes:
            a.set_xlabel("iteration")
            a.legend()
        fig.tight_layout()
        fig.savefig(out / "bmtard_balance.png", dpi=120)
        files.append("bmtard_balance.png")
    return files


def hardware() -> str:
    parts = [f"{platform.machine()} CPU, {torch.get_num_threads()} threads", f"torch {torch.__version__}",
             f"python {platform.python_version()}"]
    if torch.cuda.is_available():
        parts.insert(0, torch.cuda.get_device_name())
    return ", ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--seeds", type=int, help="seeds per method (default: the scale's)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--attacks", default=",".join(FULL_SUITE))
    p.add_argument("--data-root", default="data")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--results", type=Path, default=None, help="Markdown file to write (default: OUT/RESULTS.md)")
    p.add_argument("--set", action="append", default=[], help="extra dotted override for every run")
    args = p.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    args.attacks = [a for a in args.attacks.split(",") if a]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        print(f"error: unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    seeds = list(range(args.seeds or SCALES[args.scale]["seeds"]))
    args.out.mkdir(parents=True, exist_ok=True)
    shared = Path(__file__).resolve().parents[2] / "shared"

    # Teachers once, for every method and seed (the seed of a student run must not retrain them).
    teacher_cfg = ensure_teachers(base_config(args, "bmtard", 0), lambda c: run_local(c, overwrite=True))
    teacher_sets = [f"teachers.{r}.checkpoint={getattr(teacher_cfg.teachers, r).checkpoint}" for r in ("clean", "robust")]
    teachers: dict[str, Any] = {}
    for role in ("clean", "robust"):
        ckpt = Path(getattr(teacher_cfg.teachers, role).checkpoint)
        summary = ckpt.parent / "summary.json"
        teachers[role] = json.loads(summary.read_text())["results"]["test"] if summary.is_file() else {"checkpoint": str(ckpt)}

    rows: dict[str, list[dict[str, Any]]] = {}
    wall: dict[str, list[float]] = {}
    exact: dict[str, list[float]] = {}
    commands: list[str] = [f"python bench/reproduce.py {' '.join(sys.argv[1:])}"]
    for method in args.methods:
        for seed in seeds:
            cfg = base_config(args, method, seed)
            cfg = build_config(None, overrides=[*teacher_sets], extra=to_dict(cfg))
            run = Path(cfg.output_dir) / cfg.name
            if (run / "summary.json").is_file():
                summary = json.loads((run / "summary.json").read_text())
                seconds = summary.get("wall_seconds", summary["train_seconds"])
            else:
                start = time.perf_counter()
                summary = run_local(cfg, overwrite=True)
                seconds = time.perf_counter() - start
                summary["wall_seconds"] = seconds
                (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            rows.setdefault(method, []).append(summary["results"]["test"])
            wall.setdefault(method, []).append(seconds)
            acc = exact_pixel_clean_accuracy(run / "model.pt", shared)
            if acc is not None:
                exact.setdefault(method, []).append(acc)

    attacks = [a for a in args.attacks]
    lines = [f"# Reproduction at `{args.scale}` scale", "",
             f"Hardware: {hardware()}. Seeds per method: {len(seeds)}. Test examples per attack: "
             f"{next(iter(rows.values()))[0]['n_examples']}.", "", "Commands:", "", "```sh", *commands, "```", "",
             "Teachers (test split): " + "; ".join(
                 f"{role}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.get("accuracy", {}).items()) for role, t in teachers.items()),
             "", "## Accuracy (%), mean ± std over seeds", "",
             "| method | " + " | ".join(attacks) + " | clean (exact-pixel subset) | wall-clock per run (s) |",
             "|---|" + "---:|" * (len(attacks) + 2)]
    for method, runs in rows.items():
        cells = [fmt(*mean_std([r["accuracy"].get(a, math.nan) for r in runs])) for a in attacks]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {fmt(*mean_std(exact.get(method, [])))} | "
                     f"{statistics.mean(wall[method]):.0f} |")
    lines += ["", "## W-Robust Acc = (clean + robust) / 2, mean ± std", "",
              "| method | " + " | ".join(a for a in attacks if a != "clean") + " |",
              "|---|" + "---:|" * (len(attacks) - 1)]
    for method, runs in rows.items():
        cells = [fmt(*mean_std([r["w_robust"].get(a, math.nan) for r in runs])) for a in attacks if a != "clean"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "## Published (REFERENCE §6: 300 epochs, WRN-34-10 / ResNet-56 teachers, original CIFAR-10)", "",
              "| method | " + " | ".join(attacks) + " |", "|---|" + "---:|" * len(attacks)]
    for method in rows:
        pub = PUBLISHED.get(method, {})
        lines.append(f"| {method} | " + " | ".join(f"{pub[a]:.2f}" if a in pub else "" for a in attacks) + " |")
    # Ordering by the headline W-Robust, stated as measured.
    headline = "pgd_sat"
    order = sorted(rows, key=lambda m: -mean_std([r["w_robust"].get(headline, math.nan) for r in rows[m]])[0])
    best = order[0]
    lines += ["", "## Ordering", "",
              f"By mean W-Robust under {headline}: " + " > ".join(order) + ". "
              + ("B-MTARD ranks first at this scale." if best == "bmtard" else f"B-MTARD does not rank first at this scale ({best} does).")]
    bm = args.out / "runs" / "bmtard-seed0"
    files = plots(args.out, rows, bm if bm.is_dir() else None)
    lines += ["", *[f"![{f}]({f})" for f in files]]
    target = args.results or args.out / "RESULTS.md"
    target.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
