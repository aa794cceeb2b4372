"""The balance study's report, written from its records alone (bench/study_records.py): the tables, the gaps,
the answers by the rule written before the study, the rank correlations, the figures and the cost.

Nothing here reads a run folder or the machine, so the same records give the same block and figures.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bmtard_ray.runtime.fileio import atomic_figure

PRIMARY = "pgd_sat"     # W-Robust under PGD-20 on the test split (decided before running; RESULTS.md)
BASELINES = ("sat", "trades")
TEACHER_ARMS = ("mtard", "bmtard-step", "bmtard-step-large", "bmtard-solve", "bmtard-tuned")
STEPS = ("bmtard-step", "bmtard-step-large")
BOOTSTRAP = 2000        # resamples for the rank correlations' intervals (seeded: the report is reproducible)


# --- one run's numbers ---------------------------------------------------------------------------------------
def row_of(record: dict[str, Any]) -> dict[str, Any]:
    """A run record as the report's row: test accuracies and W-Robust, AutoAttack's, seconds, balance."""
    base, aa = record["suite"]["suite"], record["suite"].get("autoattack")
    summary = record["summary"]
    return {"seed": record["seed"], "accuracy": base["accuracy"], "w_robust": base["w_robust"], "aa": aa,
            # wall_seconds (training, validation and setup) counts only the part after a restart, while
            # train_seconds sums every epoch's training: the larger is the nearer to the whole run's time
            "train_seconds": max(summary.get("wall_seconds", 0.0), summary["train_seconds"]),
            "eval_seconds": sum(base["seconds"].values()) + (sum(aa["seconds"].values()) if aa else 0.0),
            "final_tau": summary.get("final_tau"), "history": record["history"], "trace": record["trace"]}


def metric(row: dict[str, Any], name: str) -> float:
    if name == "clean":
        return row["accuracy"]["clean"]
    if name == "w_aa":
        return row["aa"]["w_robust"]["autoattack"] if row["aa"] else math.nan
    return row["w_robust"][name]


def run_seconds(row: dict[str, Any]) -> float:
    """One run's machine seconds: training (wall clock, with its per-epoch validation) plus the test suite."""
    return float(row["train_seconds"] + row["eval_seconds"])


def unshared_hours(by_arm: dict[str, list[dict[str, Any]]]) -> float:
    """What a part costs on a machine it has to itself: each arm's fastest run times its runs, summed.

    The as-run sum also counts every stretch a run spent paused (the study is stopped with SIGSTOP while CI's
    full run is measured beside it) or sharing the cores with tests; the seeds of an arm do the same work, so
    the fastest of them is the least disturbed (the usual minimum-of-repeats estimate). Taking it per arm keeps
    what one arm pays that the others do not (the first arm of a seed fills the clean teacher's logit cache)."""
    return sum(min(run_seconds(r) for r in rs) * len(rs) for rs in by_arm.values() if rs) / 3600


# --- gaps and the pre-registered reading rule ----------------------------------------------------------------
def difference(a: list[dict[str, Any]], b: list[dict[str, Any]], name: str) -> tuple[float, float] | None:
    """Mean of a minus mean of b and the standard error of that difference (Welch); None below 2 seeds each."""
    xa = [metric(r, name) for r in a if not math.isnan(metric(r, name))]
    xb = [metric(r, name) for r in b if not math.isnan(metric(r, name))]
    if len(xa) < 2 or len(xb) < 2:
        return None
    d = statistics.mean(xa) - statistics.mean(xb)
    return d, math.sqrt(statistics.variance(xa) / len(xa) + statistics.variance(xb) / len(xb))


def show(found: tuple[float, float] | None) -> str:
    """A difference ± its standard error; "clear" beyond two standard errors."""
    if found is None:
        return "-"
    d, se = found
    return f"{d:+.2f} ± {se:.2f}" + (" (clear)" if abs(d) > 2 * se else "")


def gap(a: list[dict[str, Any]], b: list[dict[str, Any]], name: str) -> str:
    return show(difference(a, b, name))


def answers(rows: dict[str, list[dict[str, Any]]]) -> tuple[str, str]:
    """The two pre-registered questions, answered from the primary metric: "yes: <arms>", "no ...", or
    "cannot be read yet" while an arm they need has fewer than 2 seeds."""
    def beats(a: str, b: str) -> bool | None:
        found = difference(rows.get(a, []), rows.get(b, []), PRIMARY)
        return None if found is None else found[0] > 2 * found[1]

    def unread(arms: Sequence[str]) -> str:
        short = [a for a in arms if len(rows.get(a, [])) < 2]
        return f"cannot be read yet ({', '.join(short)}: fewer than 2 seeds)"

    balanced = [a for a in TEACHER_ARMS if a != "mtard"]
    first = {a: beats(a, "mtard") for a in balanced}
    worse = [a for a in balanced if beats("mtard", a)]
    if any(first.values()):
        q1 = "**yes**: " + ", ".join(a for a, v in first.items() if v)
    elif None in first.values():
        q1 = unread(TEACHER_ARMS)
    else:
        q1 = "**no**" + (f" (clearly worse than MTARD: {', '.join(worse)})" if worse else "")
    second = {a: [beats(a, s) for s in STEPS] for a in ("bmtard-solve", "bmtard-tuned")}
    if any(all(v) for v in second.values() if None not in v):
        q2 = "**yes**: " + ", ".join(a for a, v in second.items() if None not in v and all(v))
    elif any(None in v for v in second.values()):
        q2 = unread(("bmtard-solve", "bmtard-tuned", *STEPS))
    else:
        q2 = "**no**"
    return q1, q2


def verdict(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    q1, q2 = answers(rows)
    return [f"- Does some balanced arm beat MTARD by a clear gap on the primary metric? {q1}.",
            f"- Does the exact or the tuned balance beat both sign steps by a clear gap? {q2}."]


def strength_answer(by_strength: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """The third question: does the answer change with the robust teacher's strength? Read from the first two
    answers at each strength, with each balanced arm's change in its gap to MTARD (strong minus weak) ± SE."""
    if len(by_strength) < 2:
        return ["- Does the answer change with the teacher's strength? cannot be read yet (one strength only)."]
    (wn, weak), (sn, strong) = list(by_strength.items())[:2]
    aw, as_ = answers(weak), answers(strong)
    if any(a.startswith("cannot") for a in (*aw, *as_)):
        head = "cannot be read yet (a question is unanswered at one strength)"
    else:
        # The rule compares the yes/no alone: "**no** (clearly worse than MTARD: ...)" is still a no.
        changed = [i + 1 for i in range(2) if aw[i].startswith("**yes**") != as_[i].startswith("**yes**")]
        which = "question 1 is" if changed == [1] else "question 2 is" if changed == [2] else "questions 1 and 2 are"
        head = (f"**yes**: {which} answered differently" if changed
                else "**no**: both questions get the same answer")
    lines = [f"- Does the answer change with the teacher's strength? {head}. Change of each arm's gap to MTARD "
             f"on the primary metric ({sn} minus {wn}):"]
    for arm in TEACHER_ARMS[1:]:
        dw = difference(weak.get(arm, []), weak.get("mtard", []), PRIMARY)
        ds = difference(strong.get(arm, []), strong.get("mtard", []), PRIMARY)
        change = None if dw is None or ds is None else (ds[0] - dw[0], math.hypot(ds[1], dw[1]))
        lines.append(f"  `{arm}` {show(change)}")
    return lines


# --- does the early ranking predict the final one? ----------------------------------------------------------
def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on the ranks); NaN when either side has no spread."""
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def rank_correlations(curves: list[list[float]]) -> list[tuple[int, float, float, float]]:
    """For each epoch e of complete validation curves: (e, Spearman of epoch e's values with the last epoch's,
    and a 95 % bootstrap interval over the curves). Needs 4 curves or more."""
    if len(curves) < 4:
        return []
    final = [c[-1] for c in curves]
    rng = random.Random(0)
    out = []
    for e in range(len(curves[0])):
        at = [c[e] for c in curves]
        rho = spearman(at, final)
        boot = []
        for _ in range(BOOTSTRAP):
            pick = [rng.randrange(len(curves)) for _ in curves]
            r = spearman([at[i] for i in pick], [final[i] for i in pick])
            if not math.isnan(r):
                boot.append(r)
        boot.sort()
        lo, hi = (boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]) if boot else (math.nan, math.nan)
        out.append((e + 1, rho, lo, hi))
    return out


def first_agreeing_epoch(corr: list[tuple[int, float, float, float]], floor: float) -> int | None:
    """The first epoch before the last whose ranking agrees with the final one beyond its uncertainty: the
    lower end of its 95 % interval is above ``floor`` (0: better than chance; 0.5: at least moderately).
    ASHA's grace period is the first epoch at which it ranks trials, so this is the measured floor for it."""
    for e, _, lo, _ in corr[:-1]:
        if not math.isnan(lo) and lo > floor:
            return e
    return None


def curves_of(rows: dict[str, list[dict[str, Any]]], search: dict[str, Any] | None, epochs: int
              ) -> tuple[list[list[float]], int, int]:
    """Per-epoch validation W-Robust curves of every teacher-arm run and every search trial that ran all
    ``epochs``; returns (curves, runs counted, trials counted)."""
    curves, n_runs, n_trials = [], 0, 0
    for arm in TEACHER_ARMS:
        for r in rows.get(arm, []):
            c = [h.get("val_w_robust") for h in r["history"]]
            if len(c) == epochs and all(isinstance(v, (int, float)) for v in c):
                curves.append(c)
                n_runs += 1
    for trial in (search or {}).get("trials", []):
        c = [h.get("val_w_robust") for h in trial.get("history", [])]
        if len(c) == epochs and all(isinstance(v, (int, float)) for v in c):
            curves.append(c)
            n_trials += 1
    return curves, n_runs, n_trials


# --- the figure ----------------------------------------------------------------------------------------------
def figure(rows: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path | None:
    """Temperatures and teacher entropies over training per distillation arm (its first seed's run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in TEACHER_ARMS if rows.get(a) and rows[a][0]["trace"].get("iteration")]
    if not arms:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, arm in enumerate(arms):
        t = rows[arm][0]["trace"]
        it, color = t["iteration"], f"C{i}"
        axes[0].plot(it, t["tau_nat"], color=color, label=f"{arm}: tau_nat (clean teacher)")
        axes[0].plot(it, t["tau_adv"], color=color, ls="--", label=f"{arm}: tau_adv (robust teacher)")
        axes[1].plot(it, t["H_nat"], color=color, label=f"{arm}: H_nat")
        axes[1].plot(it, t["H_adv"], color=color, ls="--", label=f"{arm}: H_adv")
    fig.suptitle(f"{title}: each arm's first seed (solid: clean teacher, dashed: robust teacher)")
    axes[0].set_title("EBB temperatures")
    axes[1].set_title("teacher entropies at those temperatures (nats)")
    for a in axes:
        a.set_xlabel("iteration")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    # No creation software/date in the file: the same records give the same bytes.
    atomic_figure(fig, path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
