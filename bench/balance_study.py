#!/usr/bin/env python
"""Does the balance matter? MTARD (no EBB) against B-MTARD's paper step, a large step, the exact solve and a
balance tuned on the validation split, with SAT and TRADES as reference points: same student, data, epochs,
seeds and teachers (the pyautoattack ResNet-18 as clean teacher), each run evaluated once on the test split.

    python bench/balance_study.py --scale cpu --out runs/balance-study --results RESULTS.md --figures results
    python bench/balance_study.py --scale smoke --out /tmp/balance-smoke       # seconds per arm (CI)
    python bench/balance_study.py --scale cpu --out runs/balance-study --report-only   # table of what finished

Resumable: a run with summary.json, an evaluation with its report and a finished search are reused; a run
stopped mid-way continues from its last epoch checkpoint. The core comparison (MTARD and the three fixed
balances) runs on every seed first, then the search and the tuned arm, then SAT and TRADES. The clean teacher's outputs are cached on disk
(``teachers.logit_cache``): every arm of a seed feeds it the same natural batches, so only the first pays
for its forward passes, and the cached runs compute bit for bit what uncached ones would.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import reproduce  # noqa: E402  (bench/reproduce.py: the suite, statistics and hardware helpers)

from bmtard_ray.config import RunConfig, build_config  # noqa: E402
from bmtard_ray.errors import BmtardError  # noqa: E402
from bmtard_ray.launch.local import run_local  # noqa: E402
from bmtard_ray.runtime import fileio as io  # noqa: E402
from bmtard_ray.storage.checkpoints import FILE as CHECKPOINT_FILE  # noqa: E402
from bmtard_ray.training.teachers import cached_path, ensure_teachers  # noqa: E402
from bmtard_ray.tuning.space import load_space  # noqa: E402

SPACE = "ebb"
LARGE_ETA = 0.02  # 20x the paper's 0.001: over the cpu scale's 395 iterations a temperature can travel ~6
# Arm -> (method, overrides). "bmtard-tuned" takes its overrides from the search (see tuned_overrides).
ARMS: dict[str, tuple[str, list[str]]] = {
    "mtard": ("mtard", []),
    "bmtard-step": ("bmtard", []),
    "bmtard-step-large": ("bmtard", [f"ebb.eta_tau={LARGE_ETA}"]),
    "bmtard-solve": ("bmtard", ["ebb.mode=solve"]),
    "bmtard-tuned": ("bmtard", []),
    "sat": ("sat", []),
    "trades": ("trades", []),
}
BASELINES = ("sat", "trades")
SUITE = ("clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "autoattack", "bb_pgd", "bb_cw")
PRIMARY = "pgd_sat"     # W-Robust under PGD-20 on the test split (decided before running; RESULTS.md)
SCALES: dict[str, dict[str, Any]] = {
    "smoke": {"preset": "smoke", "set": ["optim.epochs=1"], "seeds": 2, "suite_n": 32, "aa_n": 16,
              "attacks": ("clean", "pgd_sat", "autoattack"), "trials": 2, "grace": 1, "reduction": 2},
    "cpu": {"preset": "cpu", "set": [], "seeds": 3, "suite_n": 500, "aa_n": 200, "attacks": SUITE,
            "trials": 8, "grace": 1, "reduction": 3},
}


def run_config(args: argparse.Namespace, arm: str, seed: int, extra: list[str]) -> RunConfig:
    scale = SCALES[args.scale]
    method, arm_set = ARMS[arm]
    overrides = [*common_overrides(args), f"output_dir={args.out / 'runs'}", f"method.name={method}",
                 f"seed={seed}", f"name={arm}-seed{seed}", "val_every=0", "eval.attacks=[clean,pgd_sat]",
                 f"eval.n_examples={args.suite_n}", *scale["set"], *arm_set, *extra, *args.set]
    return build_config(scale["preset"], overrides=overrides)


def common_overrides(args: argparse.Namespace) -> list[str]:
    """What every run and the search share: data, device, the clean teacher and its logit cache."""
    return [f"data.root={args.data_root}", f"device={args.device}", f"teachers.cache_dir={args.out / 'teachers'}",
            "teachers.clean.checkpoint=pyautoattack", f"teachers.logit_cache={args.out / 'logits'}"]


def robust_teacher(args: argparse.Namespace, *, train: bool = True) -> str:
    """The toolkit's robust teacher for this scale (trained once into the study's teacher cache)."""
    cfg = run_config(args, "mtard", 0, [])
    if not train:
        path = cached_path(cfg, "robust")
        if not path.is_file():
            raise SystemExit(f"error: no robust teacher in {args.out / 'teachers'} yet: run the study first")
        return str(path)
    return str(ensure_teachers(cfg, lambda c: run_local(c, overwrite=True)).teachers.robust.checkpoint)


# --- the search ----------------------------------------------------------------------------------------------
def search(args: argparse.Namespace, robust: str) -> dict[str, Any]:
    """run_tune.py over the ebb space on the validation split, seed 0 (its trials read seed 0's cached clean
    logits); a finished search is read back, an interrupted one resumed. Returns its summary + seconds."""
    scale = SCALES[args.scale]
    exp = args.out / "search" / SPACE
    done = exp / "summary.json"
    timing = args.out / "search" / "seconds.json"
    if not done.is_file():
        cmd = [sys.executable, str(BENCH.parent / "run_tune.py")]
        if exp.is_dir():
            cmd += ["--resume", str(exp)]
        else:
            cmd += ["--space", SPACE, "--preset", scale["preset"], "--output-dir", str(exp.parent), "--name", SPACE,
                    "--seed", "0", "--num-samples", str(args.trials), "--grace-period", str(scale["grace"]),
                    "--reduction-factor", str(scale["reduction"]), "--final-attacks", "clean,pgd_sat",
                    "--final-examples", str(args.suite_n), "--num-cpus", str(os.cpu_count() or 1), "--quiet",
                    *[a for s in [*common_overrides(args), f"teachers.robust.checkpoint={robust}", *scale["set"],
                                  *args.set] for a in ("--set", s)]]
        print("search: " + " ".join(cmd), flush=True)
        before = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
        start = time.perf_counter()
        proc = subprocess.run(cmd)
        timing.parent.mkdir(parents=True, exist_ok=True)
        timing.write_text(json.dumps({"seconds": before + time.perf_counter() - start}))
        if proc.returncode != 0 or not done.is_file():
            raise SystemExit(f"error: the search in {exp} failed (exit {proc.returncode}); rerun to resume it")
    summary = json.loads(done.read_text())
    if summary.get("best") is None:
        raise SystemExit(f"error: the search in {exp} finished without a best trial: no tuned arm to train")
    summary["seconds"] = json.loads(timing.read_text())["seconds"] if timing.is_file() else math.nan
    return summary


def tuned_overrides(summary: dict[str, Any]) -> list[str]:
    """The space's fixed settings plus the best trial's values as it ran them (after clipping)."""
    space = load_space(SPACE)
    values = {**space.base_set, **summary["best"]["effective"]}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


# --- runs ----------------------------------------------------------------------------------------------------
def train(cfg: RunConfig) -> dict[str, Any]:
    """Train one run, or read it back; a run stopped mid-way continues from its last epoch checkpoint (its
    wall_seconds then count only the part after the restart)."""
    run = Path(cfg.output_dir) / cfg.name
    if (run / "summary.json").is_file():
        return json.loads((run / "summary.json").read_text())
    start = time.perf_counter()
    if (run / CHECKPOINT_FILE).is_file():
        print(f"{cfg.name}: resuming from {run / CHECKPOINT_FILE}", flush=True)
        summary = run_local(cfg, resume=run)
    else:
        summary = run_local(cfg, overwrite=True)
    summary["wall_seconds"] = time.perf_counter() - start
    io.atomic_text(json.dumps(summary, indent=2, default=str), run / "summary.json")
    return summary


# The order in which an interrupted study is most useful: the question's core comparison (MTARD against the
# fixed balances) on every seed first, then the search and the tuned arm, then the reference points. Within a
# phase, seed by seed: the first arm of a seed fills its clean-teacher cache for all the others.
PHASES = (("mtard", "bmtard-step", "bmtard-step-large", "bmtard-solve"), ("bmtard-tuned",), BASELINES)


def plan(args: argparse.Namespace) -> list[tuple[int, str]]:
    return [(seed, arm) for phase in PHASES for seed in range(args.seeds) for arm in phase if arm in args.arms]


def study(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    robust = robust_teacher(args)
    tuned: list[str] | None = None
    for seed, arm in plan(args):
        if arm == "bmtard-tuned" and tuned is None:
            tuned = tuned_overrides(search(args, robust))
        cfg = run_config(args, arm, seed, [f"teachers.robust.checkpoint={robust}",
                                            *(tuned if arm == "bmtard-tuned" else [])])
        print(f"== {arm} seed {seed}", flush=True)
        train(cfg)
        reproduce.suite(args, Path(cfg.output_dir) / cfg.name, robust)
    return report(args)


# --- the report ----------------------------------------------------------------------------------------------
def collect(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every finished and evaluated run, per arm, in seed order."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for seed, arm in plan(args):
        run = args.out / "runs" / f"{arm}-seed{seed}"
        suite = run / "suite" / "suite" / "model_test.json"
        if not (run / "summary.json").is_file() or not suite.is_file():
            continue
        base = json.loads(suite.read_text())
        aa_file = run / "suite" / "autoattack" / "model_test.json"
        aa = json.loads(aa_file.read_text()) if aa_file.is_file() else None
        summary = json.loads((run / "summary.json").read_text())
        rows.setdefault(arm, []).append({
            "seed": seed, "run": run, "accuracy": base["accuracy"], "w_robust": base["w_robust"],
            "aa": aa, "train_seconds": summary.get("wall_seconds", summary.get("train_seconds")),
            "eval_seconds": sum(base["seconds"].values()) + (sum(aa["seconds"].values()) if aa else 0.0),
            "final_tau": summary.get("final_tau"), "final_w": summary.get("final_w")})
    return rows


def metric(row: dict[str, Any], name: str) -> float:
    if name == "clean":
        return row["accuracy"]["clean"]
    if name == "w_aa":
        return row["aa"]["w_robust"]["autoattack"] if row["aa"] else math.nan
    return row["w_robust"][name]


def difference(a: list[dict[str, Any]], b: list[dict[str, Any]], name: str) -> tuple[float, float] | None:
    """Mean of a minus mean of b and the standard error of that difference (Welch); None below 2 seeds each."""
    xa = [metric(r, name) for r in a if not math.isnan(metric(r, name))]
    xb = [metric(r, name) for r in b if not math.isnan(metric(r, name))]
    if len(xa) < 2 or len(xb) < 2:
        return None
    d = statistics.mean(xa) - statistics.mean(xb)
    return d, math.sqrt(statistics.variance(xa) / len(xa) + statistics.variance(xb) / len(xb))


def gap(a: list[dict[str, Any]], b: list[dict[str, Any]], name: str) -> str:
    """The difference ± its standard error; "clear" beyond two standard errors."""
    found = difference(a, b, name)
    if found is None:
        return "-"
    d, se = found
    return f"{d:+.2f} ± {se:.2f}" + (" (clear)" if abs(d) > 2 * se else "")


def verdict(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The two questions of RESULTS.md's rule, decided before the study, answered from the primary metric."""
    def beats(a: str, b: str) -> bool | None:
        found = difference(rows.get(a, []), rows.get(b, []), PRIMARY)
        return None if found is None else found[0] > 2 * found[1]

    balanced = [a for a in ARMS if a.startswith("bmtard-")]
    first = {a: beats(a, "mtard") for a in balanced}
    worse = [a for a in balanced if beats("mtard", a)]
    if any(first.values()):
        q1 = "**yes**: " + ", ".join(a for a, v in first.items() if v)
    elif None in first.values():
        q1 = "cannot be read yet (fewer than 2 seeds of an arm)"
    else:
        q1 = "**no**" + (f" (clearly worse than MTARD: {', '.join(worse)})" if worse else "")
    second = {a: [beats(a, s) for s in ("bmtard-step", "bmtard-step-large")] for a in ("bmtard-solve", "bmtard-tuned")}
    if any(all(v) for v in second.values() if None not in v):
        q2 = "**yes**: " + ", ".join(a for a, v in second.items() if None not in v and all(v))
    elif any(None in v for v in second.values()):
        q2 = "cannot be read yet (fewer than 2 seeds of an arm)"
    else:
        q2 = "**no**"
    return [f"- Does some balanced arm beat MTARD by a clear gap on the primary metric? {q1}.",
            f"- Does the exact or the tuned balance beat both sign steps by a clear gap? {q2}."]


def figure(args: argparse.Namespace, rows: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Temperatures and teacher entropies over training per distillation arm (seed 0's run, or its first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    arms = [a for a in rows if ARMS[a][0] in ("mtard", "bmtard") and (rows[a][0]["run"] / "trace.parquet").is_file()]
    if not arms:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, arm in enumerate(arms):
        t = pq.read_table(rows[arm][0]["run"] / "trace.parquet").to_pydict()
        it, color = t["iteration"], f"C{i}"
        axes[0].plot(it, t["tau_nat"], color=color, label=f"{arm}: tau_nat (clean teacher)")
        axes[0].plot(it, t["tau_adv"], color=color, ls="--", label=f"{arm}: tau_adv (robust teacher)")
        axes[1].plot(it, t["H_nat"], color=color, label=f"{arm}: H_nat")
        axes[1].plot(it, t["H_adv"], color=color, ls="--", label=f"{arm}: H_adv")
    axes[0].set_title("EBB temperatures (solid: clean teacher, dashed: robust)")
    axes[1].set_title("teacher entropies at those temperatures (nats)")
    for a in axes:
        a.set_xlabel("iteration")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def teacher_lines(args: argparse.Namespace, robust: str) -> list[str]:
    """Both teachers' test accuracy on the suite's images (clean and PGD-20), evaluated once."""
    from bmtard_ray.cli.evaluate import main as run_eval

    out = []
    for role, spec in (("clean (pyautoattack ResNet-18)", "pyautoattack"), ("robust (toolkit)", robust)):
        folder = args.out / "teacher-eval" / ("clean" if spec == "pyautoattack" else "robust")
        reports = list(folder.glob("*_test.json"))
        if not reports:
            argv = [spec, "--attacks", "clean,pgd_sat", "--n-examples", str(args.suite_n), "--data-root",
                    str(args.data_root), "--device", args.device, "--out", str(folder), "--no-progress"]
            if run_eval(argv) != 0:
                raise SystemExit(f"error: evaluating the {role} teacher failed")
            reports = list(folder.glob("*_test.json"))
        acc = json.loads(reports[0].read_text())["accuracy"]
        out.append(f"{role}: clean {acc['clean']:.1f} %, PGD-20 {acc['pgd_sat']:.1f} %")
    return out


def report(args: argparse.Namespace) -> int:
    rows = collect(args)
    planned = len(plan(args))
    finished = sum(len(v) for v in rows.values())
    robust = robust_teacher(args, train=False)
    search_file = args.out / "search" / SPACE / "summary.json"
    srch = json.loads(search_file.read_text()) if search_file.is_file() else None
    timing = args.out / "search" / "seconds.json"
    cfg = run_config(args, "mtard", 0, [])
    o = cfg.optim
    lines = [
        f"Command: `python bench/balance_study.py {' '.join(sys.argv[1:])}`" if not args.report_only else
        f"Command: `python bench/balance_study.py --scale {args.scale} --out {args.out}` (this table: `--report-only`)",
        "",
        f"{'**Partial: ' if finished < planned else ''}{finished} of {planned} runs finished"
        f"{' (the command resumes the rest)**' if finished < planned else ''}. Hardware: {reproduce.hardware()}.",
        "",
        f"Every run: student `{cfg.student}`, {o.epochs} epochs, batch {o.batch_size}, lr {o.lr} (x0.1 after "
        f"epochs {list(o.milestones)}), a stratified {cfg.data.train_subset:,}-image training subset, PGD-"
        f"{cfg.attack.steps} training attack, loss scale {cfg.loss.scale}. Seeds {args.seeds} per arm (seed = "
        f"initialisation, data order and augmentation, attack starts). Test: {args.suite_n} images (the same for "
        f"every model), AutoAttack (standard) on {args.aa_n} of them.",
        "",
        "Teachers (test, same images): " + "; ".join(teacher_lines(args, robust)) + ".",
        "",
        f"Arms: `mtard` (no EBB, temperatures 1); `bmtard-step` (the paper: sign step, eta_tau 0.001); "
        f"`bmtard-step-large` (eta_tau {LARGE_ETA}); `bmtard-solve` (this project's exact balance); "
        f"`bmtard-tuned` (the `{SPACE}` space searched on the validation split, then retrained on these seeds); "
        "SAT and TRADES (no teachers) as reference points.",
        "",
        "Cost: `mtard` runs first in each seed and fills the clean teacher's logit cache, so its train time holds "
        "that seed's ResNet-18 forward passes; every later arm of the seed, and the search's trials (seed 0), "
        "read them. Eval time is the suite on the test images plus AutoAttack on its subset.",
    ]
    if srch is not None:
        best = srch["best"]
        secs = json.loads(timing.read_text())["seconds"] if timing.is_file() else math.nan
        lines += ["", f"Search: {srch['trials']} trials ({srch['finished']} to the end, {srch['stopped_early']} "
                  f"stopped by ASHA), {secs / 60:.0f} min. Chosen: " +
                  ", ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`" for k, v in best["effective"].items())
                  + f" (validation W-Robust {best['validation']['val_w_robust']:.2f})."]
    lines += ["", "| arm | seeds | W-Robust PGD-20 (primary) | W-Robust AutoAttack | clean | PGD-20 | AutoAttack "
              "| final tau (adv, nat) | train s / run | eval s / run |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def ms(rs: list[dict[str, Any]], name: str, key: str = "") -> str:
        vals = [metric(r, name) if not key else r["accuracy"].get(key, math.nan) for r in rs]
        return reproduce.fmt(*reproduce.mean_std(vals))

    for arm, rs in rows.items():
        aa_acc = reproduce.fmt(*reproduce.mean_std([r["aa"]["accuracy"]["autoattack"] for r in rs if r["aa"]]))
        tau = [r["final_tau"] for r in rs if r["final_tau"] and not any(map(math.isnan, r["final_tau"]))]
        taus = "-" if not tau else ", ".join(f"{statistics.mean(t[i] for t in tau):.2f}" for i in (0, 1))
        lines.append(f"| {arm} | {len(rs)} | {ms(rs, PRIMARY)} | {ms(rs, 'w_aa')} | {ms(rs, 'clean')} | {ms(rs, '', PRIMARY)} | "
                     f"{aa_acc} | {taus} | {statistics.mean(r['train_seconds'] for r in rs):.0f} | "
                     f"{statistics.mean(r['eval_seconds'] for r in rs):.0f} |")
    present = [b for b in BASELINES if b in rows]
    best_base = max(present, key=lambda b: statistics.mean(metric(r, PRIMARY) for r in rows[b])) if present else None
    lines += ["", "Gaps (mean difference ± standard error over seeds; \"clear\" = beyond two standard errors), "
              f"to MTARD and to the best baseline by the primary metric ({best_base or '-'}):", "",
              "| arm | vs MTARD: primary | vs MTARD: AutoAttack W-Robust | vs MTARD: clean | "
              f"vs {best_base or 'best baseline'}: primary | vs {best_base or 'best baseline'}: AutoAttack W-Robust |",
              "|---|---:|---:|---:|---:|---:|"]
    for arm, rs in rows.items():
        if arm == "mtard":
            continue
        m = rows.get("mtard", [])
        bb = rows.get(best_base, []) if best_base and arm != best_base else []
        lines.append(f"| {arm} | {gap(rs, m, PRIMARY)} | {gap(rs, m, 'w_aa')} | {gap(rs, m, 'clean')} | "
                     f"{gap(rs, bb, PRIMARY)} | {gap(rs, bb, 'w_aa')} |")
    lines += ["", "By the rule written down before the study (primary metric, clear = beyond two standard errors):",
              *verdict(rows)]
    fig = figure(args, rows, args.figures / f"{args.scale}_balance_study.png")
    if fig is not None:
        rel = Path(os.path.relpath(fig.resolve(), args.results.parent.resolve())) if args.results else Path(fig.name)
        lines += ["", f"![temperatures and entropies per arm]({rel.as_posix()})"]
    text = "\n".join(lines) + "\n"
    io.atomic_text(text, args.out / "balance_study.md")
    if args.results:
        insert(args.results, text)
    print(text)
    return 0


BEGIN, END = "<!-- balance-study:begin (written by bench/balance_study.py) -->", "<!-- balance-study:end -->"


def insert(results: Path, text: str) -> None:
    """Replace the study's block in RESULTS.md (between its markers), leaving everything else as written."""
    old = results.read_text()
    if BEGIN not in old or END not in old:
        raise SystemExit(f"error: {results} has no balance-study markers ({BEGIN} ... {END})")
    head, rest = old.split(BEGIN, 1)
    io.atomic_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1], results)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--seeds", type=int, help="seeds per arm (default: the scale's)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--trials", type=int, help="search trials (default: the scale's)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/balance-study"))
    p.add_argument("--results", type=Path, help="Markdown file whose balance-study block to replace (e.g. RESULTS.md)")
    p.add_argument("--figures", type=Path, help="folder for the figure (default: --out)")
    p.add_argument("--set", action="append", default=[], help="extra dotted override for every run and the search")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; train nothing")
    args = p.parse_args()
    scale = SCALES[args.scale]
    args.seeds = scale["seeds"] if args.seeds is None else args.seeds
    args.trials = scale["trials"] if args.trials is None else args.trials
    args.suite_n, args.aa_n, args.attacks = scale["suite_n"], scale["aa_n"], list(scale["attacks"])
    args.figures = args.figures or args.out
    args.arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms:
        print(f"error: unknown arm(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(ARMS)}", file=sys.stderr)
        return 2
    for flag, value in (("--seeds", args.seeds), ("--trials", args.trials)):
        if value < 1:
            print(f"error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.results and not args.results.is_file():
        print(f"error: --results {args.results} does not exist", file=sys.stderr)
        return 2
    if args.results and not all(m in args.results.read_text() for m in (BEGIN, END)):
        print(f"error: --results {args.results} has no balance-study block to replace ({BEGIN} ... {END})",
              file=sys.stderr)
        return 2
    created = not args.out.exists()
    try:
        for arm in args.arms:  # every run's config is valid before anything is written
            run_config(args, arm, 0, [])
        return report(args) if args.report_only else study(args)
    except BmtardError as e:
        print(f"error: {e}", file=sys.stderr)
        if created and args.out.exists() and not any(f.is_file() for f in args.out.rglob("*")):
            shutil.rmtree(args.out)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
