"""The balance study's RESULTS block, assembled from its records (bench/study_records.py) and the numbers of
bench/study_report.py. The text depends only on the records and the command's own flags, never on the machine
that writes it, so ``--report-only`` on a fresh clone gives the same bytes."""
from __future__ import annotations

import argparse
import math
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import study_records as records
from reproduce import fmt, mean_std  # bench/reproduce.py: the comparison table's statistics
from study_report import (
    BASELINES,
    PRIMARY,
    TEACHER_ARMS,
    curves_of,
    figure,
    first_agreeing_epoch,
    gap,
    metric,
    rank_correlations,
    row_of,
    run_seconds,
    strength_answer,
    unshared_hours,
    verdict,
)

from bmtard_ray.config import RunConfig

LABELS = {"weak": "Weak robust teacher", "strong": "Strong robust teacher"}


def collect(args: argparse.Namespace, plan: list[tuple[str, int, str]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every recorded run of the plan, per group (strength or ``shared``) and arm, in seed order."""
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for group, seed, arm in sorted(plan, key=lambda p: (p[0], p[2], p[1])):
        found = records.read_run(args.records, group, arm, seed)
        if found is not None:
            rows.setdefault(group, {}).setdefault(arm, []).append(row_of(found))
    return rows


def _spread(values: list[float]) -> str:
    """Mean ± standard deviation over seeds; a single seed has no spread, so it shows its value alone."""
    found = [v for v in values if v is not None and not math.isnan(v)]
    return f"{found[0]:.2f}" if len(found) == 1 else fmt(*mean_std(found))


def _ms(rs: list[dict[str, Any]], name: str, key: str = "") -> str:
    return _spread([metric(r, name) if not key else r["accuracy"].get(key, math.nan) for r in rs])


def table(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| arm | seeds | W-Robust PGD-20 (primary) | W-Robust AutoAttack | clean | PGD-20 | AutoAttack "
             "| final tau (adv, nat) | train s (fastest seed) | eval s (fastest seed) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, rs in rows.items():
        aa_acc = _spread([r["aa"]["accuracy"]["autoattack"] for r in rs if r["aa"]])
        tau = [r["final_tau"] for r in rs if r["final_tau"] and None not in r["final_tau"]
               and not any(map(math.isnan, r["final_tau"]))]
        taus = "-" if not tau else ", ".join(f"{statistics.mean(t[i] for t in tau):.2f}" for i in (0, 1))
        lines.append(f"| {arm} | {len(rs)} | {_ms(rs, PRIMARY)} | {_ms(rs, 'w_aa')} | {_ms(rs, 'clean')} | "
                     f"{_ms(rs, '', PRIMARY)} | {aa_acc} | {taus} | "
                     f"{min(r['train_seconds'] for r in rs):.0f} | "
                     f"{min(r['eval_seconds'] for r in rs):.0f} |")
    return lines


def gaps(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    if not any(arm != "mtard" for arm in rows):
        return ["Gaps: none yet (no arm besides MTARD has run)."]
    present = [b for b in BASELINES if b in rows]
    best = max(present, key=lambda b: statistics.mean(metric(r, PRIMARY) for r in rows[b])) if present else None
    lines = ["Gaps (mean difference ± standard error over seeds; \"clear\" = beyond two standard errors), to MTARD "
             f"and to the best baseline by the primary metric ({best or '-'}):", "",
             "| arm | vs MTARD: primary | vs MTARD: AutoAttack W-Robust | vs MTARD: clean | "
             f"vs {best or 'best baseline'}: primary | vs {best or 'best baseline'}: AutoAttack W-Robust |",
             "|---|---:|---:|---:|---:|---:|"]
    for arm, rs in rows.items():
        if arm == "mtard":
            continue
        m = rows.get("mtard", [])
        bb = rows.get(best, []) if best and arm != best else []
        lines.append(f"| {arm} | {gap(rs, m, PRIMARY)} | {gap(rs, m, 'w_aa')} | {gap(rs, m, 'clean')} | "
                     f"{gap(rs, bb, PRIMARY)} | {gap(rs, bb, 'w_aa')} |")
    return lines


def search_line(found: dict[str, Any] | None) -> list[str]:
    if found is None:
        return ["Search: not run yet."]
    s, best = found["summary"], found["summary"]["best"]
    chosen = ", ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`" for k, v in best["effective"].items())
    # Which EBB rule the trials drew: TPE can leave one unexplored once its random start has drawn the other.
    rules = Counter(str(t.get("param.ebb.mode")) for t in found.get("trials", []))
    tried = ", ".join(f"{rule} {rules.get(rule, 0)}" for rule in ("step", "solve"))
    return [f"Search: {s['trials']} trials ({s['finished'] - s['stopped_early']} ran every epoch, {s['stopped_early']} "
            f"stopped early by ASHA, {s.get('errored', 0)} errored), {found['seconds'] / 60:.0f} min; EBB rule per "
            f"trial: {tried}. Chosen: {chosen} (validation W-Robust {best['validation']['val_w_robust']:.2f})."]


def correlation_lines(rows: dict[str, list[dict[str, Any]]], found: dict[str, Any] | None, epochs: int,
                      grace: int) -> list[str]:
    curves, n_runs, n_trials = curves_of(rows, found, epochs)
    corr = rank_correlations(curves)
    if not corr:
        return [f"Early against final ranking: fewer than 4 complete validation curves ({len(curves)}) so far."]
    lines = [f"Early against final ranking (validation W-Robust; {n_runs} runs and {n_trials} search trials that "
             "ran every epoch): Spearman's correlation of each epoch's ranking with the last epoch's, 95 % "
             "bootstrap interval over the curves.", "", "| epoch | " + " | ".join(str(e) for e, *_ in corr) + " |",
             "|---|" + "---:|" * len(corr),
             "| Spearman | " + " | ".join(f"{rho:.2f} [{lo:.2f}, {hi:.2f}]" for _, rho, lo, hi in corr) + " |"]
    runs_only = rank_correlations(curves_of(rows, None, epochs)[0])
    if n_trials and runs_only:
        # The search trials that ran every epoch are those ASHA promoted on their early values: a selection
        # that narrows their early spread. The runs alone carry none.
        lines.append(f"| Spearman, the {n_runs} runs alone | "
                     + " | ".join(f"{rho:.2f} [{lo:.2f}, {hi:.2f}]" for _, rho, lo, hi in runs_only) + " |")
    chance, moderate = (first_agreeing_epoch(corr, f) for f in (0.0, 0.5))

    def said(e: int | None) -> str:
        return f"at epoch {e}" if e is not None else "at no epoch before the last"
    lines += ["", f"Reading: an epoch's ranking first agrees with the final one beyond chance (interval above 0) "
              f"{said(chance)}, and at least moderately (interval above 0.5) {said(moderate)}. ASHA first ranks "
              f"trials at its grace period (`--grace-period`, {grace} in this study's searches)."]
    return lines


def teacher_text(args: argparse.Namespace, name: str, label: str) -> str:
    t = records.read_teachers(args.records).get(name)
    if t is None:
        return f"{label}: not trained yet"
    text = f"{label}: clean {t['test']['clean']:.1f} %, PGD-20 {t['test']['pgd_sat']:.1f} %"
    for c in t.get("checks", []):
        text += (f" (retrained on {c['machine']}: other weights in their last bits, "
                 f"{'the same' if c['same_scores'] else 'different'} test scores: clean {c['test']['clean']:.1f}, "
                 f"PGD-20 {c['test']['pgd_sat']:.1f})")
    return text


STRONGER_BY = 5.0  # test PGD-20 points the strong robust teacher must gain over the weak one (RESULTS.md, amendment)


def strength_check(args: argparse.Namespace) -> str:
    """Whether the strong robust teacher is clearly stronger, by the bar written before it was trained."""
    found = records.read_teachers(args.records)
    weak, strong = found.get("robust-weak"), found.get("robust-strong")
    if weak is None or strong is None:
        return ""
    lead = strong["test"]["pgd_sat"] - weak["test"]["pgd_sat"]
    verdict = "clearly stronger" if lead >= STRONGER_BY else "NOT clearly stronger"
    return (f" The strong robust teacher's test PGD-20 is {lead:+.1f} points from the weak one's: {verdict} by the "
            f"bar set before it was trained (at least {STRONGER_BY:.0f} points).")


def cost(args: argparse.Namespace, rows: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    lines = ["Cost in machine hours (machines listed above). \"As run\" is what each part took, pauses and shared "
             "cores included: the study was paused while CI's full run was measured, and some runs shared the "
             "cores with tests. \"Unshared\" counts each arm's fastest seed for all its seeds (the seeds do the "
             "same work): what the part costs on a machine of its own. Searches and teachers count as they ran.",
             "", "| part | runs | hours as run | hours unshared |", "|---|---:|---:|---:|"]
    total_run = total_unshared = 0.0
    for group, arms in rows.items():
        rs = [r for arm_rows in arms.values() for r in arm_rows]
        as_run, unshared = sum(map(run_seconds, rs)) / 3600, unshared_hours(arms)
        total_run, total_unshared = total_run + as_run, total_unshared + unshared
        lines.append(f"| runs: {group} | {len(rs)} | {as_run:.1f} | {unshared:.1f} |")
    for strength in ("weak", "strong"):
        found = records.read_search(args.records, strength)
        if found is not None:
            hours = found["seconds"] / 3600
            total_run, total_unshared = total_run + hours, total_unshared + hours
            lines.append(f"| search: {strength} | {found['summary']['trials']} trials | {hours:.1f} | {hours:.1f} |")
    for name, t in records.read_teachers(args.records).items():
        if t.get("train_seconds"):
            hours = t["train_seconds"] / 3600
            total_run, total_unshared = total_run + hours, total_unshared + hours
            lines.append(f"| teacher: {name} | 1 | {hours:.1f} | {hours:.1f} |")
    lines.append(f"| **all** | | **{total_run:.1f}** | **{total_unshared:.1f}** |")
    return lines


def markdown(args: argparse.Namespace, plan: list[tuple[str, int, str]], cfg: RunConfig) -> tuple[str, list[Path]]:
    rows = collect(args, plan)
    finished, planned = sum(len(v) for g in rows.values() for v in g.values()), len(plan)
    machines = sorted({r["hardware"] for g, s, a in plan if (r := records.read_run(args.records, g, a, s))})
    o = cfg.optim
    subset = (f"a stratified {cfg.data.train_subset:,}-image training subset" if cfg.data.train_subset
              else "the whole training split")
    partial = finished < planned
    lines = [f"Command: `python bench/balance_study.py --scale {args.scale} --out {args.out} --records "
             f"{args.records} --results RESULTS.md --figures {args.figures}` (with `--report-only` it rewrites this "
             "block and its figures from the committed records alone).", "",
             f"{'**Partial: ' if partial else ''}{finished} of {planned} runs finished"
             f"{' (the command resumes the rest)**' if partial else ''}. Machines: {'; '.join(machines) or '-'}.", "",
             f"Every run: student `{cfg.student}`, {o.epochs} epochs, batch {o.batch_size}, lr {o.lr} (x0.1 after "
             f"epochs {list(o.milestones)}), {subset}, PGD-"
             f"{cfg.attack.steps} training attack, loss scale {cfg.loss.scale}, validation W-Robust after every "
             f"epoch on {cfg.val_examples} validation images. Seeds {args.seeds} per arm (seed = initialisation, "
             f"data order and augmentation, attack starts). Test: {args.suite_n} images (the same for every model), "
             f"AutoAttack (standard) on {args.aa_n} of them; the transfer attacks' source is the weak robust teacher.",
             "",
             "Teachers (test, same images): " + "; ".join([
                 teacher_text(args, "clean", "clean (pyautoattack ResNet-18)"),
                 teacher_text(args, "robust-weak", "weak robust (the preset's SAT small CNN)"),
                 teacher_text(args, "robust-strong", "strong robust (the same, trained longer on the whole "
                              "training split)")]) + "." + strength_check(args), ""]
    shared = rows.get("shared", {})
    by_strength: dict[str, dict[str, list[dict[str, Any]]]] = {}
    figures: list[Path] = []
    for strength in args.strengths:
        arms = {a: rs for a, rs in rows.get(strength, {}).items()} | {b: shared[b] for b in BASELINES if b in shared}
        arms = {a: arms[a] for a in (*TEACHER_ARMS, *BASELINES) if a in arms}
        by_strength[strength] = arms
        found = records.read_search(args.records, strength)
        lines += [f"### {LABELS[strength]}", "", *search_line(found), ""]
        if arms:
            lines += [*table(arms), "", *gaps(arms), ""]
        lines += ["By the rule written down before the study (primary metric, clear = beyond two standard errors):",
                  *verdict(arms), "", *correlation_lines(arms, found, o.epochs, args.grace), ""]
        fig = figure(arms, args.figures / f"{args.scale}_balance_study_{strength}.png", LABELS[strength])
        if fig is not None:
            figures.append(fig)
            rel = (Path(os.path.relpath(fig.resolve(), args.results.parent.resolve())) if args.results
                   else Path(fig.name))
            lines += [f"![temperatures and entropies per arm, {strength} teacher]({rel.as_posix()})", ""]
    lines += ["### Across strengths", "", *strength_answer(by_strength), "", *cost(args, rows)]
    return "\n".join(lines) + "\n", figures
