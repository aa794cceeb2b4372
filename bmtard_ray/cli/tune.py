"""run_tune.py: options -> validated space, base config and settings -> Ray Tune (or ``--review``).

Every user error (unknown space, malformed YAML, a bad range, --num-samples 0, an objective trials do not
report, a data folder that is missing, an experiment folder already in use) is found before Ray starts or
anything is written, and ends as ``error: <one line>`` with exit status 2.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from bmtard_ray.cli.common import add_config_args, given_shortcuts, guarded, on_interrupt, shortcut_flags
from bmtard_ray.config import RunConfig, build_config, nest, teacher_cache_dir, to_dict
from bmtard_ray.errors import ConfigError
from bmtard_ray.names import ATTACK_NAMES, BLACK_BOX, teacher_roles
from bmtard_ray.storage.run_folder import absolute_paths
from bmtard_ray.training.metrics import default_mode, objective_names
from bmtard_ray.tuning.settings import (
    DEFAULT_MULTI_OBJECTIVES,
    DEFAULT_OBJECTIVE,
    SAMPLERS,
    SCHEDULERS,
    SETTINGS_FILE,
    TuneSettings,
)
from bmtard_ray.tuning.space import SearchSpace, describe_space, load_space, space_names
from bmtard_ray.tuning.trials import check_space, trial_methods

# --smoke-test: seconds per trial, yet trials that learn something and differ (see the preset's comment).
SMOKE: dict[str, Any] = {"space": "smoke", "preset": "smoke-search", "num_samples": 4,
                         "final_attacks": "clean,fgsm,pgd_sat", "final_examples": 64}


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


def preset_of(args: argparse.Namespace, space: SearchSpace) -> str:
    return args.preset or (SMOKE["preset"] if args.smoke_test else None) or space.base_preset or "cpu"


def base_config(args: argparse.Namespace, space: SearchSpace) -> RunConfig:
    """preset (or the space's) -> --config files -> the space's base.set -> shortcut flags -> --set."""
    shortcuts = given_shortcuts(args, skip=("name", "output_dir"))
    cfg = build_config(preset_of(args, space), args.config, shortcuts + list(args.overrides),
                       extra=nest(space.base_set))
    # Tuning needs a validation score every epoch (ASHA compares trials at each rung, Optuna records the
    # curve) and a checkpoint every epoch (a stopped trial's last report must point at its weights).
    if cfg.val_every != 1 or cfg.checkpoint_every != 1:
        raise ConfigError(f"tuning validates and checkpoints every epoch: remove the setting of val_every "
                          f"({cfg.val_every}) / checkpoint_every ({cfg.checkpoint_every}) or set both to 1")
    # Trials write to the experiment folder; the base config's output_dir only places the teacher cache
    # (<output_dir>/teachers): runs/teachers by default, shared with run_train.py, else under --output-dir,
    # so that a job submitted with an absolute --output-dir keeps its teachers too.
    if args.output_dir:
        cfg.output_dir = args.output_dir
    return absolute_paths(cfg)  # trials run in other processes and working directories


def objectives_of(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if args.multi_objective:
        if args.objective or args.mode:
            raise ConfigError("--objective/--mode are for one metric; with --multi-objective use --objectives a,b "
                              "(each in its natural direction: max for accuracies, min for losses)")
        given = args.objectives or ",".join(DEFAULT_MULTI_OBJECTIVES)
        names = tuple(n.strip() for n in given.split(",") if n.strip())
        if len(names) < 2:
            raise ConfigError(f"--multi-objective needs at least two metrics, got {', '.join(names) or 'none'}")
        return names, tuple(default_mode(n) for n in names)
    if args.objectives:
        raise ConfigError("--objectives is for --multi-objective; for one metric use --objective")
    name = args.objective or DEFAULT_OBJECTIVE
    return (name,), (args.mode or default_mode(name),)


def settings_from_args(args: argparse.Namespace, space: SearchSpace, cfg: RunConfig) -> TuneSettings:
    objectives, modes = objectives_of(args)
    output_dir = Path(args.output_dir or "runs/tune").resolve()
    name = args.name or space.name
    if not name or "/" in name:
        raise ConfigError(f"--name must be a plain folder name, got '{name}'")
    if (output_dir / name).resolve() == Path(teacher_cache_dir(cfg)).resolve():
        raise ConfigError(f"--name '{name}' would put the experiment into the teacher cache {output_dir / name}; "
                          "choose another name")
    num_samples = (args.num_samples if args.num_samples is not None
                   else SMOKE["num_samples"] if args.smoke_test else 16)
    final_attacks = args.final_attacks or (SMOKE["final_attacks"] if args.smoke_test else "")
    final_examples = args.final_examples or (SMOKE["final_examples"] if args.smoke_test else None)
    multi = len(objectives) > 1
    return TuneSettings(
        space_file=str(Path(space.source).resolve()), experiment_dir=str(output_dir / name),
        objectives=objectives, modes=modes, num_samples=num_samples, sampler=args.sampler,
        scheduler=args.scheduler or ("fifo" if multi else "asha"),
        asha_metric=DEFAULT_OBJECTIVE if multi else objectives[0],
        grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        n_startup_trials=args.n_startup_trials, seed=args.search_seed, storage=args.storage,
        study_name=name, workers_per_trial=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker, max_concurrent=args.max_concurrent, epoch_budget=args.epoch_budget,
        max_failures=args.max_failures,
        final_attacks=tuple(a.strip() for a in final_attacks.split(",") if a.strip()),
        final_examples=final_examples, top=args.top, preset=preset_of(args, space), base_config=to_dict(cfg)).validate()


def check_final_attacks(settings: TuneSettings, space: SearchSpace, cfg: RunConfig) -> None:
    if not settings.final_attacks:
        return
    for a in settings.final_attacks:
        if a not in ATTACK_NAMES:
            raise ConfigError(f"unknown attack '{a}' in --final-attacks; choose from: {', '.join(ATTACK_NAMES)}")
    bb = [a for a in settings.final_attacks if a in BLACK_BOX]
    has_robust = cfg.teachers.robust.checkpoint or any("robust" in teacher_roles(m) for m in trial_methods(space, cfg))
    if bb and not has_robust:
        raise ConfigError(f"--final-attacks {', '.join(bb)} are crafted on the robust teacher, and no trial's method "
                          f"({', '.join(trial_methods(space, cfg))}) has one; drop them")


def check_experiment_dir(settings: TuneSettings, overwrite: bool) -> None:
    exp = Path(settings.experiment_dir)
    if exp.exists() and any(exp.iterdir()) and not overwrite:
        held = "an experiment" if (exp / SETTINGS_FILE).exists() else "files"
        raise ConfigError(f"{exp} already holds {held}; pass --resume {exp} to continue it, --overwrite to replace "
                          "it, or --name to start another")


def prepare(args: argparse.Namespace) -> tuple[TuneSettings, SearchSpace, RunConfig]:
    """Everything that can be checked without Ray, in order; nothing is written."""
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    space_arg = args.space or (SMOKE["space"] if args.smoke_test else None)
    if not space_arg:
        raise ConfigError(f"give --space: one of {', '.join(space_names())} or a path to a YAML file "
                          "(or --smoke-test)")
    space = load_space(space_arg)
    cfg = base_config(args, space)
    settings = settings_from_args(args, space, cfg)
    check_final_attacks(settings, space, cfg)
    check_space(space, cfg)  # every corner of the box gives a valid config (after clipping)
    return settings, space, cfg


def review_from_args(args: argparse.Namespace, console: Console) -> int:
    if not args.review:
        raise ConfigError("--bind-all is an option of --review FOLDER")
    if args.resume or args.space or args.smoke_test:
        raise ConfigError("--review opens a folder's dashboards and runs nothing: drop --resume/--space/--smoke-test")
    from bmtard_ray.tuning.review import review

    return review(Path(args.review), bind_all=args.bind_all, console=console)


def has_tune_state(exp: Path) -> bool:
    """Whether Tune saved an experiment state there (what ``Tuner.restore`` and so --resume need)."""
    return any(exp.glob("experiment_state-*.json"))


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
    from bmtard_ray.ray_train import cluster
    from bmtard_ray.tuning import report, session

    launch = session.Launch(address=args.address, num_cpus=args.num_cpus, overwrite=args.overwrite, quiet=args.quiet)
    try:
        if args.resume:
            refuse_on_resume(args)
            on_interrupt(lambda: args.resume if has_tune_state(Path(args.resume)) else None, "run_tune.py")
            outcome, settings = session.resume(Path(args.resume), launch, console, final_attacks=args.final_attacks,
                                               final_examples=args.final_examples,
                                               top=args.top if args.top != 10 else None)
        else:
            settings, space, cfg = prepare(args)
            check_experiment_dir(settings, args.overwrite)
            session.preflight(settings, space, cfg, launch)
            exp = Path(settings.experiment_dir)
            on_interrupt(lambda: str(exp) if has_tune_state(exp) else None, "run_tune.py")
            console.print(f"[bold]search space {space.name}[/bold] ({space.source}): {space.description}")
            for key, text in describe_space(space):
                console.print(f"  {key}: {text}")
            outcome, settings = session.start(settings, space, cfg, launch, console)
        if not outcome.complete:
            report.write_partial(outcome, settings, console)
            if has_tune_state(outcome.experiment_dir):
                console.print(f"[yellow]experiment interrupted; continue it with: python run_tune.py --resume "
                              f"{outcome.experiment_dir}[/yellow]")
            else:
                console.print("[yellow]experiment interrupted before Tune saved its state; nothing to resume[/yellow]")
            return 130
        summary = report.finish(outcome, settings, console)
        return 0 if summary["best"] is not None else 1
    finally:
        cluster.shutdown_ray(launch.started_ray)


main = guarded(_main)
