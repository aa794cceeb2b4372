"""run_tune.py: flags -> :func:`bmtard_ray.api.search_run.run_search` (Ray Tune + Optuna), or ``--review``.

Every user error (unknown space, malformed YAML, a bad range, --num-samples 0, an objective trials do not
report, a data folder that is missing, an experiment folder already in use) is found before Ray starts or
anything is written, and ends as ``error: <one line>`` with exit status 2. A search that ends with errored
trials, or with no trial to select, writes its report and exits with status 1.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from rich.console import Console

from bmtard_ray.api import search_run as search
from bmtard_ray.api.results import SearchResult
from bmtard_ray.api.search_run import SearchOptions
from bmtard_ray.cli.common import add_config_args, given_shortcuts, guarded, on_interrupt, shortcut_flags
from bmtard_ray.config import RunConfig, parse_override
from bmtard_ray.errors import ConfigError
from bmtard_ray.training.metrics import objective_names
from bmtard_ray.tuning.settings import DEFAULT_MULTI_OBJECTIVES, DEFAULT_OBJECTIVE, SAMPLERS, SCHEDULERS, TuneSettings
from bmtard_ray.tuning.space import SearchSpace, space_names


def tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_tune.py", description="Search B-MTARD's balance (or a baseline's knobs) "
                                "with Optuna inside Ray Tune; each trial is a Ray Train run.")
    p.add_argument("--space", help=f"search space: a name ({', '.join(space_names())}) or a path to a YAML file")
    p.add_argument("--smoke-test", action="store_true",
                   help="a tiny search (space smoke unless --space, preset smoke-search unless --preset, 4 trials, a "
                        "small final evaluation) that finishes in a few minutes on 2 CPUs")
    p.add_argument("--review", metavar="FOLDER",
                   help="open an experiment folder (running or finished) in optuna-dashboard and TensorBoard, or a "
                        "run_train.py run folder in TensorBoard, on 127.0.0.1; Ctrl-C stops them")
    p.add_argument("--bind-all", action="store_true",
                   help="with --review: listen on 0.0.0.0 instead of 127.0.0.1 (the dashboards have no "
                        "authentication: anyone who can reach this machine sees them)")
    add_config_args(p)
    # The trials' preset defaults to the space's base.preset; override the generic default of run_train.py.
    p.set_defaults(preset=None)
    p.set_defaults(output_dir=None)
    s = p.add_argument_group("search")
    s.add_argument("--num-samples", type=int, default=None, help="number of trials (default 16)")
    s.add_argument("--objective", default=None,
                   help=f"metric to optimise (default {DEFAULT_OBJECTIVE}, validation W-Robust); one of: "
                        f"{', '.join(objective_names())}")
    s.add_argument("--mode", choices=("max", "min"), help="direction of --objective (default: max, min for losses)")
    s.add_argument("--multi-objective", action="store_true",
                   help=f"optimise {' and '.join(DEFAULT_MULTI_OBJECTIVES)} jointly (Pareto front) instead of one "
                        "metric")
    s.add_argument("--objectives", help="comma-separated metrics for --multi-objective "
                                        f"(default {','.join(DEFAULT_MULTI_OBJECTIVES)}; all maximised)")
    s.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                   help="Optuna sampler: tpe (default; multi-objective TPE with --multi-objective), random, nsga2")
    s.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="asha (default for one objective) or fifo (no early stopping; default for --multi-objective)")
    s.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    s.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA: keep 1/this of the trials per rung")
    s.add_argument("--n-startup-trials", type=int, default=None,
                   help="TPE: random trials before the model is used (default min(10, max(2, samples/4)))")
    s.add_argument("--search-seed", type=int, default=0, help="seed of the Optuna sampler (default 0)")
    s.add_argument("--epoch-budget", type=int, help="end the search once the trials have trained this many epochs "
                                                    "in all (compares searches at an equal cost)")
    s.add_argument("--storage", help="Optuna storage URL (default sqlite:///<experiment>/optuna.db)")
    r = p.add_argument_group("resources")
    r.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (default 1)")
    r.add_argument("--cpus-per-worker", type=float, default=1.0)
    r.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per worker (default: 1 when the cluster has GPUs and --device is not cpu, else 0; "
                        "0.5 runs two trials per GPU)")
    r.add_argument("--max-concurrent", type=int, help="cap on trials at a time (default: as many as the cluster fits)")
    r.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start Ray on this machine)")
    r.add_argument("--num-cpus", type=int, help="CPUs of a Ray instance started here (default: all)")
    r.add_argument("--max-failures", type=int, default=2, help="failures per trial (a worker or node lost) that "
                   "restart it from its last checkpoint; -1 unlimited (default 2)")
    f = p.add_argument_group("final report")
    f.add_argument("--final-attacks", help="comma-separated attacks for the best student's test evaluation "
                                           "(default: the full suite, see README)")
    f.add_argument("--final-examples", type=int, help="test images for the final evaluation (default: eval.n_examples)")
    f.add_argument("--top", type=int, default=10, help="leaderboard rows to print (default 10)")
    e = p.add_argument_group("experiment folder")
    e.add_argument("--resume", metavar="EXPERIMENT", help="continue an interrupted experiment (its folder)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing experiment folder of the same name")
    e.add_argument("--quiet", action="store_true", help="less of Tune's progress output")
    return p


def search_options(args: argparse.Namespace) -> SearchOptions:
    """The flags as the API's options: the shortcut flags and --set become the base config's keys."""
    config = dict(parse_override(o) for o in given_shortcuts(args, skip=("name", "output_dir")) + list(args.overrides))
    names = {f.name for f in fields(SearchOptions)} - {"config", "config_files"}
    return SearchOptions(config=config, config_files=tuple(args.config), **{n: getattr(args, n) for n in names})


def base_config(args: argparse.Namespace, space: SearchSpace) -> RunConfig:
    return search.base_config(search_options(args), space)


def prepare(args: argparse.Namespace) -> tuple[TuneSettings, SearchSpace, RunConfig]:
    """Everything that can be checked without Ray, in order; nothing is written."""
    return search.prepare(search_options(args))


def review_from_args(args: argparse.Namespace, console: Console) -> int:
    if not args.review:
        raise ConfigError("--bind-all is an option of --review FOLDER")
    if args.resume or args.space or args.smoke_test:
        raise ConfigError("--review opens a folder's dashboards and runs nothing: drop --resume/--space/--smoke-test")
    from bmtard_ray.tuning.review import review

    return review(Path(args.review), bind_all=args.bind_all, console=console)


def refuse_on_resume(args: argparse.Namespace) -> None:
    """--resume continues the search that was started: options that define it cannot be given again."""
    given = [flag for flag, value in (("--space", args.space), ("--smoke-test", args.smoke_test),
                                      ("--preset", args.preset), ("--config", args.config),
                                      ("--set", args.overrides), ("--num-samples", args.num_samples))
             if value]
    given += shortcut_flags(args)
    if given:
        raise ConfigError(f"{', '.join(given)} cannot be combined with --resume: the experiment continues with the "
                          "search and config it saved (only --final-attacks, --final-examples, --top, --address "
                          "and --num-cpus may be given)")


def _main(argv: Sequence[str] | None = None) -> int:
    args = tune_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:  # a log file or a job's output: room for the leaderboard's columns
        console = Console(width=max(console.width, 160))
    if args.review or args.bind_all:
        return review_from_args(args, console)
    if args.resume:
        refuse_on_resume(args)

    def resumable(exp: Path) -> None:
        on_interrupt(lambda: str(exp) if search.has_tune_state(exp) else None, "run_tune.py")

    found = search.run_search(search_options(args), resume=args.resume, console=console, on_experiment=resumable)
    if not found.complete:
        if search.has_tune_state(found.experiment_dir):
            console.print(f"[yellow]experiment interrupted; continue it with: python run_tune.py --resume "
                          f"{found.experiment_dir}[/yellow]")
        else:
            console.print("[yellow]experiment interrupted before Tune saved its state; nothing to resume[/yellow]")
        return 130
    return exit_status(found)


def exit_status(found: SearchResult) -> int:
    """0 for a whole search with a selected trial; 1 when no trial was selected or some errored: a search
    with dead trials is not the one asked for, and a script or a job must notice."""
    return 0 if found.best is not None and not found.summary.get("errored") else 1


main = guarded(_main)
