"""The answers a finished search owes its reader, in words: which trial is best, whether it beats the
runner-up beyond the validation split's noise, whether its balance reached its target, and where its run is.

They are written where the user looks first: the Optuna study's ``selected_trial`` attribute (optuna-dashboard's
study page) and the end of ``leaderboard.md``. The numbers come from the trials' last reports (the same ones as
the leaderboard); the noise is the best trial's W-Robust standard error (training.metrics.w_robust_se).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from bmtard_ray.training.metrics import w_robust_se
from bmtard_ray.tuning.results import TrialRecord, best_record, pinned, rank
from bmtard_ray.tuning.searcher import trial_run_folder
from bmtard_ray.tuning.settings import TuneSettings

# How close (nats) the final entropies must come to the target (or to each other, when EBB equalises the
# teachers) for the balance to count as having reached it: the solve mode meets it to ~1e-6, the paper's step
# mode oscillates around it by a few hundredths.
REACHED_NATS = 0.05


def _num(r: TrialRecord, key: str) -> float | None:
    v = r.value(key)
    return v if math.isfinite(v) else None


def versus_runner_up(best: TrialRecord, others: Sequence[TrialRecord], metric: str,
                     numbers: Mapping[str, int]) -> tuple[dict[str, Any] | None, str]:
    """The runner-up (number, value) and a sentence saying whether the best beats it beyond one SE."""
    runner = next((r for r in others if r.trial_id != best.trial_id and math.isfinite(r.value(metric))), None)
    if runner is None:
        return None, "no other trial finished with a value: nothing to compare with"
    gap = best.value(metric) - runner.value(metric)
    number = numbers.get(runner.trial_id, runner.number)
    info = {"number": number, "ray_trial_id": runner.trial_id, metric: runner.value(metric)}
    se = w_robust_se(_num(best, "val_clean"), _num(best, "val_robust"), _num(best, "val_n"))
    if metric != "val_w_robust" or se is None:
        return info, f"ahead of the runner-up (trial {number}) by {abs(gap):.2f} ({metric}; no standard error)"
    if abs(gap) <= se:
        return info, (f"tied: {abs(gap):.2f} points ahead of the runner-up (trial {number}), within 1 SE "
                      f"({se:.2f}) of {int(best.value('val_n'))} validation images: validation cannot tell them apart")
    return info, (f"ahead of the runner-up (trial {number}) by {abs(gap):.2f} points, more than 1 SE "
                  f"({se:.2f}) of {int(best.value('val_n'))} validation images")


def balance_sentence(r: TrialRecord) -> str:
    """Whether the trial's entropy balance reached what it aimed at, from its last report."""
    h_adv, h_nat, target = _num(r, "H_adv"), _num(r, "H_nat"), _num(r, "H_target")
    if h_adv is None or h_nat is None:
        return "no entropy balance in this trial's method"
    stuck = pinned(r)
    shares = ", ".join(f"{k} {v:.0f}%" for k in ("tau_adv_at_bound", "tau_nat_at_bound")
                       if (v := _num(r, k)) is not None)
    at_bounds = f"; iterations at a temperature bound: {shares}" if shares else ""
    if stuck:
        return (f"did NOT act: {', '.join(stuck)} sat at a bound for every iteration (entropies H_adv {h_adv:.3f}, "
                f"H_nat {h_nat:.3f}" + (f", target {target:.3f} nats)" if target is not None else ")"))
    if target is not None:
        off = max(abs(h_adv - target), abs(h_nat - target))
        word = "reached its target" if off <= REACHED_NATS else f"missed its target by up to {off:.3f} nats"
        return f"{word}: H_adv {h_adv:.3f}, H_nat {h_nat:.3f} against {target:.3f} nats{at_bounds}"
    off = abs(h_adv - h_nat)
    word = "equalised the teachers" if off <= REACHED_NATS else f"left the teachers {off:.3f} nats apart"
    return f"{word}: H_adv {h_adv:.3f}, H_nat {h_nat:.3f}{at_bounds}"


def verdict(records: Sequence[TrialRecord], settings: TuneSettings,
            numbers: Mapping[str, int] | None = None) -> dict[str, Any] | None:
    """The selected trial and the answers about it, or None when no trial finished with a value. ``numbers``:
    Ray trial id -> Optuna trial number (what the dashboards and run folders are named by)."""
    best = best_record(records, settings)
    if best is None:
        return None
    numbers = numbers or {}
    metric = settings.asha_metric if settings.multi else settings.objective
    runner, versus = versus_runner_up(best, rank(records, settings), metric, numbers)
    number = numbers.get(best.trial_id)
    return {"number": number if number is not None else best.number, "ray_trial_id": best.trial_id,
            metric: best.value(metric),
            "val_w_robust_se": w_robust_se(_num(best, "val_clean"), _num(best, "val_robust"), _num(best, "val_n")),
            "runner_up": runner, "versus_runner_up": versus, "balance": balance_sentence(best),
            "run_folder": str(trial_run_folder(settings.experiment_dir, best.trial_id, number))}


def verdict_markdown(found: dict[str, Any] | None) -> str:
    if found is None:
        return "\nNo trial finished with a value: nothing was selected.\n"
    return (f"\n**Selected: trial {found['number']}** ({found['ray_trial_id']}).\n\n"
            f"- Beyond noise? {found['versus_runner_up']}.\n- Balance: {found['balance']}.\n"
            f"- Run folder: `{found['run_folder']}`\n")
