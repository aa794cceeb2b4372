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
import functools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bmtard_ray.config import RunConfig, build_config, to_dict  # noqa: E402
from bmtard_ray.errors import BmtardError  # noqa: E402
from bmtard_ray.launch.local import run_local  # noqa: E402
from bmtard_ray.runtime import fileio  # noqa: E402
from bmtard_ray.training.teachers import ensure_teachers  # noqa: E402

METHODS = ("sat", "trades", "rslad", "mtard", "bmtard")
FULL_SUITE = ("clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "autoattack", "bb_pgd", "bb_cw")

# Per scale: base preset, overrides for every run, seeds, and test examples for the suite (AutoAttack, by
# far the slowest attack on CPU - 200 s per 500 images for a small CNN on 2 cores - gets its own count).
SCALES: dict[str, dict[str, Any]] = {
    "smoke": {"preset": "smoke", "set": ["optim.epochs=1"], "seeds": 2, "suite_n": 64, "aa_n": 32},
    "cpu": {"preset": "cpu", "set": ["val_every=0"], "seeds": 3, "suite_n": 500, "aa_n": 200},
    "gpu": {"preset": "gpu-small", "set": ["optim.epochs=30", "optim.milestones=[22,27]",
                                           "teachers.clean.checkpoint=pyautoattack"],
            "seeds": 3, "suite_n": 2000, "aa_n": 1000},
}

KEEP = "<!-- reproduce.py writes the text above this line; what follows is kept when it rewrites this file -->"

OTHER_SCALES = {
    "smoke": "python bench/reproduce.py --scale smoke --out runs/reproduce-smoke",
    "cpu": "python bench/reproduce.py --scale cpu --out runs/reproduce-cpu",
    "gpu": "python bench/reproduce.py --scale gpu --device cuda --out runs/reproduce-gpu",
}

# docs/algorithm.md §9.1, CIFAR-10 ResNet-18 student, 300 epochs with the paper's teachers (percent).
PUBLISHED = {
    "sat": {"clean": 84.20, "fgsm": 55.59, "pgd_sat": 45.95, "pgd_trades": 48.12, "cw_inf": 45.97},
    "trades": {"clean": 83.00, "fgsm": 58.35, "pgd_sat": 52.35, "pgd_trades": 53.83, "cw_inf": 50.23},
    "rslad": {"clean": 83.99, "fgsm": 60.41, "pgd_sat": 53.94, "pgd_trades": 55.73, "cw_inf": 52.67},
    "mtard": {"clean": 87.36, "fgsm": 61.20, "pgd_sat": 50.73, "pgd_trades": 53.60, "cw_inf": 48.57},
    "bmtard": {"clean": 88.20, "pgd_sat": 51.68, "pgd_trades": 54.40, "cw_inf": 49.88, "autoattack": 47.44},
}


def base_config(args: argparse.Namespace, method: str, seed: int) -> RunConfig:
    scale = SCALES[args.scale]
    # The run's own final evaluation stays cheap (clean + PGD-20); the suite runs afterwards, on test only.
    overrides = [f"data.root={args.data_root}", f"output_dir={args.out / 'runs'}", f"device={args.device}",
                 f"teachers.cache_dir={args.out / 'teachers'}", f"method.name={method}", f"seed={seed}",
                 f"name={method}-seed{seed}", "eval.attacks=[clean,pgd_sat]", f"eval.n_examples={args.suite_n}",
                 *scale["set"], *args.set]
    return build_config(scale["preset"], overrides=overrides)


@functools.lru_cache(maxsize=1)
def exact_pixel_test_images(shared: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The 1,017 test images whose pixels are exact (no JPEG loss) and their labels; read once."""
    import numpy as np

    prefix, jpeg = shared / "data" / "cifar10_exact_prefix.npz", shared / "data" / "cifar10_jpeg.npz"
    if not prefix.is_file() or not jpeg.is_file():
        return None
    x = torch.from_numpy(np.load(prefix)["test_exact"].reshape(-1, 3, 32, 32)).float() / 255
    y = torch.from_numpy(np.load(jpeg)["test_labels"][: x.shape[0]].astype("int64"))
    return x, y


def exact_pixel_clean_accuracy(model_file: Path, shared: Path) -> float | None:
    """Clean accuracy on the exact-pixel test images, for comparison with the JPEG-based test split."""
    from bmtard_ray.models import build_model

    data = exact_pixel_test_images(shared)
    if data is None:
        return None
    x, y = data
    record = torch.load(model_file, weights_only=True)
    model = build_model(record["arch"], record["num_classes"])
    model.load_state_dict(record["state_dict"])
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return 100 * (pred == y).float().mean().item()


def suite(args: argparse.Namespace, run: Path, robust_ckpt: str) -> tuple[dict[str, Any], float]:
    """The full suite on the test split with ``run_eval`` (reports kept in ``run/suite``); AutoAttack on
    its own, smaller subset, its W-Robust against the clean accuracy of that same subset. Finished
    evaluations are read back, not redone. Returns the merged result and the evaluation seconds."""
    from bmtard_ray.cli.evaluate import main as run_eval

    def evaluate(name: str, attacks: list[str], n: int) -> dict[str, Any]:
        report = run / "suite" / name / "model_test.json"  # run_eval names its reports after model.pt
        if not report.is_file():
            argv = [str(run / "model.pt"), "--attacks", ",".join(attacks), "--n-examples", str(n),
                    "--data-root", str(args.data_root), "--device", args.device, "--out", str(report.parent),
                    "--name", run.name, "--no-progress"]
            if any(a.startswith("bb_") for a in attacks):
                argv += ["--source-checkpoint", robust_ckpt]
            if run_eval(argv) != 0:
                raise SystemExit(f"error: evaluating {run / 'model.pt'} failed")
        return json.loads(report.read_text())

    others = [a for a in args.attacks if a != "autoattack"]
    base = evaluate("suite", others if "clean" in others else ["clean", *others], args.suite_n)
    result = {"n_examples": base["n_examples"], "accuracy": dict(base["accuracy"]), "w_robust": dict(base["w_robust"])}
    seconds = sum(base["seconds"].values())
    if "autoattack" in args.attacks:
        aa = evaluate("autoattack", ["clean", "autoattack"], args.aa_n)
        result["accuracy"]["autoattack"] = aa["accuracy"]["autoattack"]
        result["w_robust"]["autoattack"] = aa["w_robust"]["autoattack"]
        result["aa_n_examples"] = aa["n_examples"]
        seconds += sum(aa["seconds"].values())
    return result, seconds


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt(m: float, s: float) -> str:
    return "-" if math.isnan(m) else f"{m:.2f} ± {s:.2f}"


def plots(out: Path, prefix: str, rows: dict[str, list[dict[str, Any]]], bmtard_run: Path | None) -> list[str]:
    """Write the PNGs into ``out`` (named ``<prefix>_*.png``); returns their file names."""
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
    fileio.atomic_figure(fig, out / f"{prefix}_clean_vs_robust.png", dpi=120)
    files.append(f"{prefix}_clean_vs_robust.png")
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
        fileio.atomic_figure(fig, out / f"{prefix}_bmtard_balance.png", dpi=120)
        files.append(f"{prefix}_bmtard_balance.png")
    return files


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def setup_text(cfg: RunConfig) -> list[str]:
    """What every run shares, and why the numbers cannot match the paper's, from the config itself
    (before the teachers are resolved, so that a given checkpoint reads as given)."""
    o, t = cfg.optim, cfg.teachers
    train = f"a stratified {cfg.data.train_subset:,}-image subset" if cfg.data.train_subset else "all"
    return [
        f"Every run: student `{cfg.student}`, {o.epochs} epochs, batch {o.batch_size}, SGD lr {o.lr} "
        f"(x0.1 after epochs {list(o.milestones)}), {train} of the 45,000 training images (5,000 held out "
        f"for validation), training attack PGD-{cfg.attack.steps} eps 8/255; the same two teachers, data "
        f"and seeds for every method. The distillation loss scale is {cfg.loss.scale} (affects MTARD and "
        f"B-MTARD only; SAT, TRADES and RSLAD use their own losses).",
        "Teachers, shared by every run: " + "; ".join(
            f"{role} `{getattr(t, role).checkpoint}` (given)" if getattr(t, role).checkpoint else
            f"{role} `{getattr(t, role).arch}` ({getattr(t, role).train_method}, {getattr(t, role).epochs} epochs, "
            "trained by the toolkit on the same split)" for role in ("clean", "robust")) + ".",
        "Why these numbers differ from the paper's: the paper trains a ResNet-18 student for 300 epochs on all "
        "50,000 original images with the public TRADES WRN-34-10 as robust teacher (~85 % clean, ~57 % PGD-20) "
        "and a ResNet-56 clean teacher (~93 %); here the students, teachers, epochs and data are far smaller, "
        "so every method is weaker and the gaps between methods need not match. Our CIFAR-10 copy is "
        "JPEG-based (quality ~75, exact labels) but for the first 1,017 images of each batch; the exact-pixel "
        "column is the clean accuracy on those 1,017 test images.",
    ]


def compare_to_bmtard(rows: dict[str, list[dict[str, Any]]], attacks: list[str]) -> list[str]:
    """B-MTARD minus each baseline, mean over seeds ± the standard error of that difference; a gap is
    called clear only beyond twice its standard error (seeds are few: this is a rough screen, not a test)."""
    def diff(method: str, key: str, attack: str) -> str:
        a = [r[key][attack] for r in rows["bmtard"] if attack in r[key]]
        b = [r[key][attack] for r in rows[method] if attack in r[key]]
        if len(a) < 2 or len(b) < 2:
            return "-"
        d = statistics.mean(a) - statistics.mean(b)
        se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
        verdict = "clear" if abs(d) > 2 * se else "within noise"
        return f"{d:+.2f} ± {se:.2f} ({verdict})"

    cols = [("accuracy", "clean", "clean acc")] + [("w_robust", a, f"W-Robust {a}") for a in attacks]
    out = ["B-MTARD minus each baseline (mean difference ± its standard error over seeds; \"clear\" = beyond "
           "two standard errors):", "", "| baseline | " + " | ".join(c[2] for c in cols) + " |",
           "|---|" + "---:|" * len(cols)]
    for method in rows:
        if method != "bmtard":
            out.append(f"| {method} | " + " | ".join(diff(method, k, a) for k, a, _ in cols) + " |")
    return out


def hardware() -> str:
    parts = [f"{cpu_model()}, {torch.get_num_threads()} threads", f"torch {torch.__version__}",
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
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--results", type=Path, default=None, help="Markdown file to write (default: OUT/RESULTS.md)")
    p.add_argument("--figures", type=Path, default=None,
                   help="folder for the PNGs, linked relative to the results file (default: beside it)")
    p.add_argument("--set", action="append", default=[], help="extra dotted override for every run")
    p.add_argument("--n-examples", type=int, dest="suite_n", help="test examples per attack (default: the scale's)")
    p.add_argument("--aa-examples", type=int, dest="aa_n", help="test examples for AutoAttack (default: the scale's)")
    args = p.parse_args()
    scale = SCALES[args.scale]
    # "is None", not "or": an explicit 0 is an error below, not a request for the default.
    args.suite_n = scale["suite_n"] if args.suite_n is None else args.suite_n
    args.aa_n = min(scale["aa_n"] if args.aa_n is None else args.aa_n, args.suite_n)
    args.seeds = scale["seeds"] if args.seeds is None else args.seeds
    args.methods = [m for m in args.methods.split(",") if m]
    args.attacks = [a for a in args.attacks.split(",") if a]
    if not args.methods:
        print("error: --methods is empty", file=sys.stderr)
        return 2
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        print(f"error: unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    from bmtard_ray.evaluation import ATTACK_NAMES

    bad = [a for a in args.attacks if a not in ATTACK_NAMES]
    if bad or not args.attacks:
        print(f"error: unknown attack(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(ATTACK_NAMES)}",
              file=sys.stderr)
        return 2
    for flag, value in (("--n-examples", args.suite_n), ("--aa-examples", args.aa_n), ("--seeds", args.seeds)):
        if value < 1:
            print(f"error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    created = not args.out.exists()
    try:
        for method in args.methods:  # every run's config is valid before anything is written
            base_config(args, method, 0)
        return compare(args)
    except BmtardError as e:
        print(f"error: {e}", file=sys.stderr)
        if created and args.out.exists() and not any(f.is_file() for f in args.out.rglob("*")):
            shutil.rmtree(args.out)  # nothing but empty folders: leave no trace of the failed start
        return 2


def compare(args: argparse.Namespace) -> int:
    """Teachers, then every method x seed (trained, then evaluated), then the report."""
    seeds = list(range(args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    shared = Path(__file__).resolve().parents[2] / "shared"

    # Teachers once, for every method and seed (the seed of a student run must not retrain them).
    teacher_cfg = ensure_teachers(base_config(args, "bmtard", 0), lambda c: run_local(c, overwrite=True))
    teacher_sets = [f"teachers.{r}.checkpoint={getattr(teacher_cfg.teachers, r).checkpoint}" for r in ("clean",
                                                                                                       "robust")]
    teachers: dict[str, Any] = {}
    for role in ("clean", "robust"):
        ckpt = Path(getattr(teacher_cfg.teachers, role).checkpoint)
        summary = ckpt.parent / "summary.json"
        teachers[role] = (json.loads(summary.read_text())["results"]["test"] if summary.is_file()
                          else {"checkpoint": str(ckpt)})

    rows: dict[str, list[dict[str, Any]]] = {}
    wall: dict[str, list[float]] = {}
    exact: dict[str, list[float]] = {}
    commands: list[str] = [f"python bench/reproduce.py {' '.join(sys.argv[1:])}"]
    robust_ckpt = teacher_cfg.teachers.robust.checkpoint
    for method in args.methods:
        for seed in seeds:
            cfg = base_config(args, method, seed)
            cfg = build_config(None, overrides=[*teacher_sets], extra=to_dict(cfg))
            run = Path(cfg.output_dir) / cfg.name
            if (run / "summary.json").is_file():
                summary = json.loads((run / "summary.json").read_text())
            else:
                start = time.perf_counter()
                summary = run_local(cfg, overwrite=True)
                summary["wall_seconds"] = time.perf_counter() - start
                fileio.atomic_text(json.dumps(summary, indent=2, default=str), run / "summary.json")
            result, eval_seconds = suite(args, run, robust_ckpt)
            rows.setdefault(method, []).append(result)
            wall.setdefault(method, []).append(summary.get("wall_seconds", summary["train_seconds"]) + eval_seconds)
            acc = exact_pixel_clean_accuracy(run / "model.pt", shared)
            if acc is not None:
                exact.setdefault(method, []).append(acc)

    attacks = [a for a in args.attacks]
    lines = [f"# Reproduction at `{args.scale}` scale", "",
             f"Hardware: {hardware()}. Seeds per method: {len(seeds)}. Test examples per attack: "
             f"{next(iter(rows.values()))[0]['n_examples']} (a seeded, class-stratified subset of the 10,000; the "
             f"same images for every model)" + (f", AutoAttack (standard) on {args.aa_n} of them, its W-Robust "
             "against the clean accuracy of those same images" if "autoattack" in args.attacks else "") + ".",
             "", "Commands:", "", "```sh", *commands, "```", "",
             *[ln for para in setup_text(base_config(args, "bmtard", 0)) for ln in (para, "")],
             "Other scales (same script): " + "; ".join(f"`{c}`" for sc,
                                                        c in OTHER_SCALES.items() if sc != args.scale) + ".",
             "",
             "Teachers (test split): " + "; ".join(
                 f"{role}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.get("accuracy", {}).items()) for role,
                 t in teachers.items()),
             "", "## Accuracy (%), mean ± std over seeds", "",
             "| method | " + " | ".join(attacks)
             + " | clean (exact-pixel subset) | wall-clock per run (s), train + eval |",
             "|---|" + "---:|" * (len(attacks) + 2)]
    for method, runs in rows.items():
        cells = [fmt(*mean_std([r["accuracy"].get(a, math.nan) for r in runs])) for a in attacks]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {fmt(*mean_std(exact.get(method, [])))} | "
                     "{:.0f} ± {:.0f} |".format(*mean_std(wall[method])))
    lines += ["", "## W-Robust Acc = (clean + robust) / 2, mean ± std", "",
              "| method | " + " | ".join(a for a in attacks if a != "clean") + " |",
              "|---|" + "---:|" * (len(attacks) - 1)]
    for method, runs in rows.items():
        cells = [fmt(*mean_std([r["w_robust"].get(a, math.nan) for r in runs])) for a in attacks if a != "clean"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["",
              "## Published (docs/algorithm.md §9: 300 epochs, WRN-34-10 / ResNet-56 teachers, original CIFAR-10)", "",
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
              + ("B-MTARD ranks first at this scale." if best == "bmtard"
                 else f"B-MTARD does not rank first at this scale ({best} does).")]
    if "bmtard" in rows and len(rows) > 1:
        lines += ["", *compare_to_bmtard(rows, [a for a in (headline, "autoattack") if a in attacks])]
    target = args.results or args.out / "RESULTS.md"
    figures = args.figures or target.parent
    bm = args.out / "runs" / "bmtard-seed0"
    files = plots(figures, args.scale, rows, bm if bm.is_dir() else None)
    rel = Path(os.path.relpath(figures.resolve(), target.parent.resolve()))
    lines += ["", *[f"![{f}]({(rel / f).as_posix()})" for f in files]]
    text = "\n".join(lines) + "\n"
    # Sections other scripts own (the balance study) follow the KEEP line; a rewrite leaves them as they are.
    if target.is_file() and KEEP in (old := target.read_text()):
        text += "\n" + KEEP + old.split(KEEP, 1)[1]
    fileio.atomic_text(text, target)
    print("\n".join(lines))
    print(f"\nwrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
