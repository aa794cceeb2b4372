"""The end of an experiment: Parquet table, leaderboard, plots, and the best student's test evaluation."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console

from bmtard_ray.runtime import fileio
from bmtard_ray.tuning import plots
from bmtard_ray.tuning.experiment import Outcome
from bmtard_ray.tuning.final import FinalResult, evaluate_best, trace_table
from bmtard_ray.tuning.optuna_space import open_study
from bmtard_ray.tuning.results import (
    TrialRecord,
    best_record,
    leaderboard_markdown,
    leaderboard_table,
    pareto_ids,
    write_table,
)
from bmtard_ray.tuning.searcher import set_study_attrs
from bmtard_ray.tuning.settings import TB_DIR, TuneSettings
from bmtard_ray.tuning.verdict import verdict, verdict_markdown

TABLE = "trials.parquet"
LEADERBOARD = "leaderboard.md"
PLOTS = "plots"
BEST = "best"


def title(settings: TuneSettings) -> str:
    what = " & ".join(settings.objectives) if settings.multi else f"{settings.objective} ({settings.mode})"
    return f"{Path(settings.experiment_dir).name}: {what} on the validation split"


def write_partial(outcome: Outcome, settings: TuneSettings, console: Console) -> None:
    """What is known so far (interrupted experiment): the table and the leaderboard, no test evaluation."""
    exp = outcome.experiment_dir
    if outcome.records:
        write_table(outcome.records, settings, exp / TABLE)
        fileio.atomic_text(leaderboard_markdown(outcome.records, settings, title(settings)), exp / LEADERBOARD)


def trajectories(record: TrialRecord, state: dict[str, Any] | None) -> tuple[dict[str, list[float]], list[float], str]:
    """tau/w of one trial: per iteration from its checkpoint's trace, else per epoch from its reports."""
    if state is not None:
        table = trace_table(state)
        if table is not None and table.num_rows:
            cols = {c: table.column(c).to_pylist() for c in ("tau_adv", "tau_nat", "w_adv", "w_nat")}
            return cols, table.column("iteration").to_pylist(), "iteration"
    hist = record.history
    cols = {c: [h.get(c, math.nan) for h in hist] for c in ("tau_adv", "tau_nat", "w_adv", "w_nat")}
    return cols, [h.get("epoch", i + 1) for i, h in enumerate(hist)], "epoch"


def trial_numbers(settings: TuneSettings) -> dict[str, int]:
    """Ray trial id -> Optuna trial number, from the study (the number names the trial everywhere a user looks)."""
    try:
        study = open_study(settings)
    except Exception:  # an unreadable study costs the numbers, not the report
        return {}
    return {str(t.user_attrs["ray_trial_id"]): t.number for t in study.get_trials(deepcopy=False)
            if "ray_trial_id" in t.user_attrs}


def record_selection(settings: TuneSettings, found: dict[str, Any], final: FinalResult) -> None:
    """The selected trial, the answers about it (versus the runner-up, its balance, its run folder) and its test
    result, as attributes of the Optuna study: optuna-dashboard's study page shows them."""
    study = open_study(settings)
    set_study_attrs(study, {"selected_trial": found,
                            "test_w_robust": final.w_robust | {"n_examples": final.n_examples}})


def errored_line(errored: list[TrialRecord], n_trials: int) -> str:
    """One line on the errored trials: how many, and the first one's error and where its traceback is. A
    search whose trials died is not the search that was asked for (the selection is among the survivors)."""
    first = min(errored, key=lambda r: r.number)
    where = f"{first.trial_dir}/error.txt" if first.trial_dir else "its trial folder"
    return (f"{len(errored)} of {n_trials} trials errored; the selection is among the others. Trial {first.number}: "
            f"{first.error or 'no message'} (traceback: {where})")


def finish(outcome: Outcome, settings: TuneSettings, console: Console) -> dict[str, Any]:
    exp, records = outcome.experiment_dir, outcome.records
    write_table(records, settings, exp / TABLE)
    found = verdict(records, settings, trial_numbers(settings))
    fileio.atomic_text(leaderboard_markdown(records, settings, title(settings)) + verdict_markdown(found),
                       exp / LEADERBOARD)
    console.print(leaderboard_table(records, settings, settings.top, title(settings)))
    best = best_record(records, settings)
    figs = exp / PLOTS
    plots.plot_objective(records, settings, figs / "objective.png")
    plots.plot_pareto(records, settings, figs / "clean_vs_robust.png", best.trial_id if best else None)
    summary: dict[str, Any] = {"experiment": str(exp), "objectives": list(settings.objectives),
                               "modes": list(settings.modes), "trials": len(records),
                               "finished": sum(r.status == "TERMINATED" for r in records),
                               "errored": sum(r.status == "ERROR" for r in records),
                               "stopped_early": sum(r.stopped_early for r in records),
                               "pareto_front": sorted(pareto_ids(records, settings)),
                               "storage": settings.storage_url, "best": None}
    errored = [r for r in records if r.status == "ERROR"]
    if errored:
        summary["first_error"] = errored_line(errored, len(records))
        console.print(f"[red]{summary['first_error']}[/red]", soft_wrap=True)
    if best is None:
        console.print("[red]no trial finished with a finite objective: nothing to evaluate on the test set[/red]")
    else:
        how = ("highest " + settings.asha_metric + " on the Pareto front") if settings.multi else \
            f"best {settings.objective}"
        console.print(f"selected trial {best.trial_id} ({how}, validation); evaluating it on the test split")
        final = evaluate_best(best, settings, exp / BEST, console)
        series, x, xlabel = trajectories(best, final.state)
        plots.plot_trajectories(series, x, xlabel, figs / "best_trajectories.png",
                                f"trial {best.trial_id}: temperatures and loss weights")
        if found is not None:
            record_selection(settings, found, final)
            console.print(f"trial {found['number']}: {found['versus_runner_up']}\nits balance "
                          f"{found['balance']}", soft_wrap=True, markup=False)
        summary["best"] = {"trial_id": best.trial_id, "params": best.params, "effective": best.effective,
                           "validation": {k: best.metrics.get(k) for k in ("val_clean", "val_robust", "val_w_robust")},
                           "test": {"n_examples": final.n_examples, "accuracy": final.accuracy,
                                    "w_robust": final.w_robust}, "folder": str(final.folder)}
    fileio.atomic_text(json.dumps(summary, indent=2, default=str), exp / "summary.json")
    console.print(f"trials table: {exp / TABLE}\nleaderboard: {exp / LEADERBOARD}\nplots: {figs}\n"
                  f"Optuna study: optuna-dashboard {settings.storage_url}\n"
                  f"TensorBoard: tensorboard --logdir {exp / TB_DIR}\n"
                  f"both at once, on 127.0.0.1: python run_tune.py --review {exp}", soft_wrap=True)
    return summary
