#!/usr/bin/env python
"""Does the balance matter? MTARD (no EBB) against B-MTARD's paper step, a large step, the exact solve and a
balance tuned on the validation split, at two robust-teacher strengths, with SAT and TRADES as reference
points: same student, data, epochs and seeds, the pyautoattack ResNet-18 as clean teacher, each run evaluated
once on the test split.

    python bench/balance_study.py --scale cpu --out runs/balance-study --records results/balance-study \
        --results RESULTS.md --figures results
    python bench/balance_study.py --scale smoke --out /tmp/balance-smoke       # seconds per arm (CI)
    python bench/balance_study.py --scale cpu --out runs/balance-study --records results/balance-study \
        --results RESULTS.md --figures results --report-only                   # the block from the records

Durable and resumable: each finished run, search and teacher leaves a small record (bench/study_records.py,
committed under ``results/balance-study/``), and the study skips every part that has one; a run stopped
mid-way continues from its last epoch checkpoint. The report is written from the records alone. Order: the
core comparison (MTARD and the three fixed balances) at the weak teacher, the strong teacher, the core
comparison at it, then each strength's search and tuned arm, then SAT and TRADES. The clean teacher's outputs
are cached on disk (``teachers.logit_cache``): every arm of a seed feeds it the same natural batches.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import reproduce  # noqa: E402  (bench/reproduce.py: the suite and hardware helpers)
import study_records as records  # noqa: E402
import study_report  # noqa: E402

from bmtard_ray.config import RunConfig, build_config  # noqa: E402
from bmtard_ray.errors import BmtardError  # noqa: E402
from bmtard_ray.launch.local import run_local  # noqa: E402
from bmtard_ray.launch.preflight import probe_writable  # noqa: E402
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
BASELINES = study_report.BASELINES
CORE = ("mtard", "bmtard-step", "bmtard-step-large", "bmtard-solve")
# The robust teacher's strengths: "weak" is the preset's own robust teacher (trained through the teacher cache);
# "strong" is the same architecture and method trained longer, on the whole training split, as a run of its own.
STRENGTHS = ("weak", "strong")
SHARED = "shared"   # the group of the arms that use no teacher (SAT, TRADES): one set of runs for both strengths
SUITE = ("clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "autoattack", "bb_pgd", "bb_cw")
SCALES: dict[str, dict[str, Any]] = {
    "smoke": {"preset": "smoke", "set": ["optim.epochs=1"], "seeds": 2, "suite_n": 32, "aa_n": 16,
              "attacks": ("clean", "pgd_sat", "autoattack"), "trials": 2, "grace": 1, "reduction": 2,
              "strong": ["optim.epochs=2"]},
    "cpu": {"preset": "cpu", "set": [], "seeds": 3, "suite_n": 500, "aa_n": 200, "attacks": SUITE,
            "trials": 24, "grace": 1, "reduction": 3,
            "strong": ["data.train_subset=null", "optim.epochs=15", "optim.milestones=[12]"]},
}


def run_config(args: argparse.Namespace, group: str, arm: str, seed: int, extra: list[str]) -> RunConfig:
    scale = SCALES[args.scale]
    method, arm_set = ARMS[arm]
    overrides = [*common_overrides(args), f"output_dir={args.out / 'runs' / group}", f"method.name={method}",
                 f"seed={seed}", f"name={arm}-seed{seed}", "val_every=1", "eval.attacks=[clean,pgd_sat]",
                 f"eval.n_examples={args.suite_n}", *scale["set"], *arm_set, *extra, *args.set]
    return build_config(scale["preset"], overrides=overrides)


def common_overrides(args: argparse.Namespace) -> list[str]:
    """What every run and the search share: data, device, the clean teacher and its logit cache."""
    return [f"data.root={args.data_root}", f"device={args.device}", f"teachers.cache_dir={args.out / 'teachers'}",
            "teachers.clean.checkpoint=pyautoattack", f"teachers.logit_cache={args.out / 'logits'}"]


# --- teachers ------------------------------------------------------------------------------------------------
def strong_config(args: argparse.Namespace) -> RunConfig:
    """The strong robust teacher: the weak one's architecture, method and learning rate, trained longer (the
    scale's ``strong`` overrides) on the training split (the validation split stays carved out)."""
    scale = SCALES[args.scale]
    tc = run_config(args, "weak", "mtard", 0, []).teachers.robust
    overrides = [*common_overrides(args), f"output_dir={args.out / 'teachers'}", "name=robust-strong", "seed=0",
                 f"student={tc.arch}", f"method.name={tc.train_method}", f"optim.lr={tc.lr}",
                 f"optim.batch_size={tc.batch_size}", "val_every=0", "trace=false", "checkpoint_every=1",
                 "eval.attacks=[clean,pgd_sat]", f"eval.n_examples={args.suite_n}", *scale["set"],
                 *scale["strong"], *args.set]
    return build_config(scale["preset"], overrides=overrides)


def teacher(args: argparse.Namespace, strength: str) -> str:
    """The robust teacher of ``strength``, trained when missing (from its seed), and its record: the weights'
    hash on this machine and its test evaluation. A teacher retrained on another machine may differ in its
    last bits: then it is evaluated again and the record says whether it scores the same."""
    if strength in args.teacher_paths:
        return args.teacher_paths[strength]
    start = time.perf_counter()
    if strength == "weak":
        cfg = run_config(args, "weak", "mtard", 0, [])
        path, existed = cached_path(cfg, "robust"), cached_path(cfg, "robust").is_file()
        if not existed:
            ensure_teachers(cfg, lambda c: run_local(c, overwrite=True))
    else:
        cfg = strong_config(args)
        path = Path(cfg.output_dir) / cfg.name / "model.pt"
        existed = path.is_file()
        if not existed:
            train(cfg)
    seconds = time.perf_counter() - start
    args.teacher_paths[strength] = str(path)
    record_teacher(args, f"robust-{strength}", str(path), seconds if not existed else None)
    return str(path)


def record_teacher(args: argparse.Namespace, name: str, spec: str, train_seconds: float | None) -> None:
    """Write the teacher's record if it has none; if it has one and the weights on this machine differ, check
    (and record) whether they score the same on the study's test images."""
    found = records.read_teachers(args.records).get(name)
    digest = records.weights_hash(spec)
    if found is not None and found["sha256"] == digest:
        return
    acc = evaluate_teacher(args, name, spec)
    if found is None:
        records.write_teacher(args.records, name, {"sha256": digest, "machine": reproduce.hardware(),
                                                   "test": acc, "train_seconds": train_seconds})
        return
    same = all(acc[k] == found["test"][k] for k in found["test"])
    check = {"sha256": digest, "machine": reproduce.hardware(), "test": acc, "same_scores": same}
    print(f"{name}: retrained here; its weights differ from the recorded ones in their last bits and it scores "
          f"{'the same' if same else 'differently'} on the study's test images ({acc} vs {found['test']})", flush=True)
    records.write_teacher(args.records, name, {**found, "checks": [*found.get("checks", []), check]})


def evaluate_teacher(args: argparse.Namespace, name: str, spec: str) -> dict[str, float]:
    """Clean and PGD-20 accuracy on the suite's test images."""
    from bmtard_ray.cli.evaluate import main as run_eval

    folder = args.out / "teacher-eval" / name
    shutil.rmtree(folder, ignore_errors=True)
    argv = [spec, "--attacks", "clean,pgd_sat", "--n-examples", str(args.suite_n), "--data-root",
            str(args.data_root), "--device", args.device, "--out", str(folder), "--no-progress"]
    if run_eval(argv) != 0:
        raise SystemExit(f"error: evaluating the {name} teacher failed")
    acc = json.loads(next(folder.glob("*_test.json")).read_text())["accuracy"]
    return {"clean": acc["clean"], "pgd_sat": acc["pgd_sat"]}


# --- the search ----------------------------------------------------------------------------------------------
def timed(cmd: list[str], timing: Path, every_s: float = 60.0) -> int:
    """Run ``cmd`` and add its wall seconds to ``timing``, saved every ``every_s`` while it runs: a search cut
    short by a killed session (and resumed by the next one) still counts the time it had spent."""
    before = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
    timing.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def save() -> None:
        io.atomic_text(json.dumps({"seconds": before + time.perf_counter() - start}), timing)
    proc = subprocess.Popen(cmd)
    try:
        while True:
            try:
                returncode = proc.wait(timeout=every_s)
                break
            except subprocess.TimeoutExpired:
                save()
    except BaseException:  # Ctrl-C reaches the search too: let it save its state, count the time, then stop
        proc.wait()
        save()
        raise
    save()
    return returncode


def search(args: argparse.Namespace, strength: str) -> dict[str, Any]:
    """run_tune.py over the ebb space on the validation split, seed 0 (its trials read seed 0's cached clean
    logits); a recorded search is read back, an interrupted one resumed. Returns its summary."""
    found = records.read_search(args.records, strength)
    if found is not None:
        return found["summary"]
    scale = SCALES[args.scale]
    exp = args.out / "search" / strength / SPACE
    timing = args.out / "search" / strength / "seconds.json"
    if not (exp / "summary.json").is_file():
        robust = teacher(args, strength)
        cmd = [sys.executable, str(BENCH.parent / "run_tune.py")]
        if exp.is_dir():
            cmd += ["--resume", str(exp)]
        else:
            cmd += ["--space", SPACE, "--preset", scale["preset"], "--output-dir", str(exp.parent), "--name", SPACE,
                    "--seed", "0", "--num-samples", str(args.trials), "--grace-period", str(args.grace),
                    "--reduction-factor", str(scale["reduction"]), "--final-attacks", "clean,pgd_sat",
                    "--final-examples", str(args.suite_n), "--num-cpus", str(os.cpu_count() or 1), "--quiet",
                    *[a for s in [*common_overrides(args), f"teachers.robust.checkpoint={robust}", *scale["set"],
                                  *args.set] for a in ("--set", s)]]
        print(f"search ({strength} teacher): " + " ".join(cmd), flush=True)
        returncode = timed(cmd, timing)
        if not (exp / "summary.json").is_file():
            raise SystemExit(f"error: the search in {exp} failed (exit {returncode}); rerun to resume it")
    summary = json.loads((exp / "summary.json").read_text())
    if summary.get("errored"):
        # The pre-registered search is `trials` trials that ran; TPE's later draws learned from the survivors
        # only, so rerunning the errored ones would not give it back either: the search starts again.
        raise SystemExit(f"error: the search in {exp} is not recorded: {summary.get('first_error') or 'trials errored'}"
                         f"; move {exp.parent} aside and rerun to search again")
    if summary.get("best") is None:
        raise SystemExit(f"error: the search in {exp} finished without a best trial: no tuned arm to train")
    seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else math.nan
    records.write_search(args.records, strength, exp, seconds, reproduce.hardware())
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


def plan(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """(group, seed, arm) in the order an interrupted study is most useful: the core comparison (MTARD against
    the fixed balances) at the weak teacher, then at the strong one, then each strength's search and tuned
    arm, then the reference points. Within a phase, seed by seed: the first arm of a seed fills its
    clean-teacher cache for all the others (and for the other strength's runs of that seed)."""
    phases = [*((s, CORE) for s in STRENGTHS), *((s, ("bmtard-tuned",)) for s in STRENGTHS), (SHARED, BASELINES)]
    return [(group, seed, arm) for group, arms in phases if group in (*args.strengths, SHARED)
            for seed in range(args.seeds) for arm in arms if arm in args.arms]


def study(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    if records.read_teachers(args.records).get("clean") is None:
        record_teacher(args, "clean", "pyautoattack", None)
    for group, seed, arm in plan(args):
        if records.read_run(args.records, group, arm, seed) is not None:
            continue
        weak = teacher(args, "weak")  # also the fixed source model of the transfer attacks, for every run
        extra = [] if group == SHARED else [f"teachers.robust.checkpoint={teacher(args, group)}"]
        if arm == "bmtard-tuned":
            extra += tuned_overrides(search(args, group))
        cfg = run_config(args, group, arm, seed, extra)
        print(f"== {group}: {arm} seed {seed}", flush=True)
        train(cfg)
        run = Path(cfg.output_dir) / cfg.name
        reproduce.suite(args, run, weak)
        records.write_run(args.records, group, arm, seed, run, reproduce.hardware())
        print(f"recorded {records.run_path(args.records, group, arm, seed)}", flush=True)
    return report(args)


# --- the report ----------------------------------------------------------------------------------------------
def report(args: argparse.Namespace) -> int:
    from study_markdown import markdown

    text, figures = markdown(args, plan(args), run_config(args, "weak", "mtard", 0, []))
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


def _list(value: str, known: tuple[str, ...] | list[str], flag: str) -> list[str]:
    items = [a for a in value.split(",") if a]
    bad = [a for a in items if a not in known]
    if bad or not items:
        raise ValueError(f"unknown {flag} {', '.join(bad) or '(none given)'}; choose from {', '.join(known)}")
    return items


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--seeds", type=int, help="seeds per arm (default: the scale's)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--strengths", default=",".join(STRENGTHS), help="robust-teacher strengths: weak, strong or both")
    p.add_argument("--trials", type=int, help="search trials (default: the scale's)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/balance-study"))
    p.add_argument("--records", type=Path, help="folder of the study's records (default: OUT/records; the cpu "
                   "study's are committed in results/balance-study)")
    p.add_argument("--results", type=Path, help="Markdown file whose balance-study block to replace (e.g. RESULTS.md)")
    p.add_argument("--figures", type=Path, help="folder for the figures (default: --out)")
    p.add_argument("--set", action="append", default=[], help="extra dotted override for every run and the search")
    p.add_argument("--report-only", action="store_true", help="write the report from the records; train nothing")
    args = p.parse_args()
    scale = SCALES[args.scale]
    args.seeds = scale["seeds"] if args.seeds is None else args.seeds
    args.trials = scale["trials"] if args.trials is None else args.trials
    args.grace = scale["grace"]
    args.suite_n, args.aa_n, args.attacks = scale["suite_n"], scale["aa_n"], list(scale["attacks"])
    args.figures = args.figures or args.out
    args.records = args.records or args.out / "records"
    args.teacher_paths = {}
    try:
        args.arms = _list(args.arms, list(ARMS), "arm(s)")
        args.strengths = _list(args.strengths, STRENGTHS, "strength(s)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
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
    if args.report_only and not records.teachers_path(args.records).is_file():
        print(f"error: no study records in {args.records} yet (no teachers.json): run the study first", file=sys.stderr)
        return 2
    created = [d for d in (args.out, args.records) if not d.exists()]
    try:
        for arm in args.arms:  # every run's config is valid before anything is written
            run_config(args, "weak", arm, 0, [])
        strong_config(args)
        # ... and every folder it writes can be written: a bad --records must not surface after an hour's run.
        for folder, flag in ((args.out, "--out"), (args.records, "--records"), (args.figures, "--figures")):
            probe_writable(folder, flag)
        return report(args) if args.report_only else study(args)
    except BmtardError as e:
        print(f"error: {e}", file=sys.stderr)
        for d in created:
            if d.exists() and not any(f.is_file() for f in d.rglob("*")):
                shutil.rmtree(d)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
