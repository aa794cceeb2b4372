"""``bmtard_ray.search``: a Ray Tune + Optuna search of the balance (or a baseline's knobs), from Python.

``run_tune.py`` is a layer over it: its flags are the fields of :class:`SearchOptions`. Everything that can be
checked without Ray (the space, the base config, the settings, the experiment folder) is checked before Ray
starts or anything is written. Named ``search``, not ``tune``: ``tune`` would shadow ``ray.tune`` in a user's
script.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from bmtard_ray.api.configs import ConfigLike, dotted, layer
from bmtard_ray.api.results import SearchResult
from bmtard_ray.config import RunConfig, build_config, nest, teacher_cache_dir, to_dict
from bmtard_ray.errors import ConfigError
from bmtard_ray.names import ATTACK_NAMES, BLACK_BOX, teacher_roles
from bmtard_ray.storage.run_folder import absolute_paths
from bmtard_ray.training.metrics import default_mode
from bmtard_ray.tuning.settings import DEFAULT_MULTI_OBJECTIVES, DEFAULT_OBJECTIVE, SETTINGS_FILE, TuneSettings
from bmtard_ray.tuning.space import SearchSpace, describe_space, load_space, space_names
from bmtard_ray.tuning.trials import check_space, trial_methods

# smoke_test: seconds per trial, yet trials that learn something and differ (see the preset's comment).
SMOKE: dict[str, Any] = {"space": "smoke", "preset": "smoke-search", "num_samples": 4,
                         "final_attacks": "clean,fgsm,pgd_sat", "final_examples": 64}


@dataclass
class SearchOptions:
    """How a search runs: run_tune.py's flags (see ``run_tune.py --help``), with the same defaults.

    ``config`` is the base configuration's layer over the preset and ``config_files`` (a mapping of the keys
    ``--set`` takes, or a RunConfig that replaces preset and files); the space's ``base.set`` comes before it.
    """
    space: str | None = None
    config: ConfigLike = None
    smoke_test: bool = False
    preset: str | None = None
    config_files: Sequence[str | Path] = ()
    name: str | None = None
    output_dir: str | None = None
    num_samples: int | None = None
    objective: str | None = None
    mode: str | None = None
    multi_objective: bool = False
    objectives: str | Sequence[str] | None = None
    sampler: str = "tpe"
    scheduler: str | None = None
    grace_period: int = 1
    reduction_factor: float = 3.0
    n_startup_trials: int | None = None
    search_seed: int = 0
    epoch_budget: int | None = None
    storage: str | None = None
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    max_concurrent: int | None = None
    address: str | None = None
    num_cpus: int | None = None
    max_failures: int = 2
    final_attacks: str | Sequence[str] | None = None
    final_examples: int | None = None
    top: int = 10
    overwrite: bool = False
    quiet: bool = False


def _names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(a).strip() for a in items if str(a).strip())


def preset_of(opts: SearchOptions, space: SearchSpace) -> str:
    return opts.preset or (SMOKE["preset"] if opts.smoke_test else None) or space.base_preset or "cpu"


def base_config(opts: SearchOptions, space: SearchSpace) -> RunConfig:
    """preset (or the space's) -> config files -> the space's base.set -> the options' config."""
    if isinstance(opts.config, RunConfig):
        if opts.preset is not None or opts.config_files:
            raise ConfigError("a RunConfig is a whole base configuration: give it alone, or give preset/config "
                              "files with a mapping of keys instead")
        cfg = build_config(None, (), extra=[to_dict(opts.config), nest(space.base_set)])
    else:
        # A key the space searches takes each trial's value: one given here would be silently replaced.
        fixed = sorted(set(dotted(opts.config or {})) & {p.key for p in space.params})
        if fixed:
            raise ConfigError(f"{', '.join(fixed)}: searched by space {space.name}, so a value given with --set (or "
                              f"config) would be replaced by each trial's; to fix it, copy the space file, move the "
                              f"key to its base.set and pass the copy to --space")
        cfg = build_config(preset_of(opts, space), list(opts.config_files),
                           extra=[nest(space.base_set), layer(opts.config)])
    # Tuning needs a validation score every epoch (ASHA compares trials at each rung, Optuna records the
    # curve) and a checkpoint every epoch (a stopped trial's last report must point at its weights).
    if cfg.val_every != 1 or cfg.checkpoint_every != 1:
        raise ConfigError(f"tuning validates and checkpoints every epoch: remove the setting of val_every "
                          f"({cfg.val_every}) / checkpoint_every ({cfg.checkpoint_every}) or set both to 1")
    # Trials write to the experiment folder; the base config's output_dir only places the teacher cache
    # (<output_dir>/teachers): runs/teachers by default, shared with run_train.py, else under the output dir,
    # so that a job submitted with an absolute output dir keeps its teachers too.
    if opts.output_dir:
        cfg.output_dir = opts.output_dir
    return absolute_paths(cfg)  # trials run in other processes and working directories


def objectives_of(opts: SearchOptions) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if opts.multi_objective:
        if opts.objective or opts.mode:
            raise ConfigError("--objective/--mode are for one metric; with --multi-objective use --objectives a,b "
                              "(each in its natural direction: max for accuracies, min for losses)")
        names = _names(opts.objectives) or DEFAULT_MULTI_OBJECTIVES
        if len(names) < 2:
            raise ConfigError(f"--multi-objective needs at least two metrics, got {', '.join(names) or 'none'}")
        return tuple(names), tuple(default_mode(n) for n in names)
    if opts.objectives:
        raise ConfigError("--objectives is for --multi-objective; for one metric use --objective")
    if opts.mode not in (None, "max", "min"):
        raise ConfigError(f"--mode must be max or min, got {opts.mode!r}")
    name = opts.objective or DEFAULT_OBJECTIVE
    return (name,), (opts.mode or default_mode(name),)


def settings_of(opts: SearchOptions, space: SearchSpace, cfg: RunConfig) -> TuneSettings:
    objectives, modes = objectives_of(opts)
    output_dir = Path(opts.output_dir or "runs/tune").resolve()
    name = opts.name or space.name
    if not name or "/" in name:
        raise ConfigError(f"--name must be a plain folder name, got '{name}'")
    if (output_dir / name).resolve() == Path(teacher_cache_dir(cfg)).resolve():
        raise ConfigError(f"--name '{name}' would put the experiment into the teacher cache {output_dir / name}; "
                          "choose another name")
    num_samples = (opts.num_samples if opts.num_samples is not None
                   else SMOKE["num_samples"] if opts.smoke_test else 16)
    final_attacks = _names(opts.final_attacks) or (_names(SMOKE["final_attacks"]) if opts.smoke_test else ())
    final_examples = opts.final_examples or (SMOKE["final_examples"] if opts.smoke_test else None)
    multi = len(objectives) > 1
    return TuneSettings(
        space_file=str(Path(space.source).resolve()), experiment_dir=str(output_dir / name),
        objectives=objectives, modes=modes, num_samples=num_samples, sampler=opts.sampler,
        scheduler=opts.scheduler or ("fifo" if multi else "asha"),
        asha_metric=DEFAULT_OBJECTIVE if multi else objectives[0],
        grace_period=opts.grace_period, reduction_factor=opts.reduction_factor,
        n_startup_trials=opts.n_startup_trials, seed=opts.search_seed, storage=opts.storage,
        study_name=name, workers_per_trial=opts.workers_per_trial, cpus_per_worker=opts.cpus_per_worker,
        gpus_per_worker=opts.gpus_per_worker, max_concurrent=opts.max_concurrent, epoch_budget=opts.epoch_budget,
        max_failures=opts.max_failures, final_attacks=final_attacks, final_examples=final_examples, top=opts.top,
        preset=preset_of(opts, space), base_config=to_dict(cfg)).validate()


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


def prepare(opts: SearchOptions) -> tuple[TuneSettings, SearchSpace, RunConfig]:
    """Everything that can be checked without Ray, in order; nothing is written."""
    if opts.num_samples is not None and opts.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {opts.num_samples}")
    space_arg = opts.space or (SMOKE["space"] if opts.smoke_test else None)
    if not space_arg:
        raise ConfigError(f"give --space: one of {', '.join(space_names())} or a path to a YAML file "
                          "(or --smoke-test)")
    space = load_space(str(space_arg))
    cfg = base_config(opts, space)
    settings = settings_of(opts, space, cfg)
    check_final_attacks(settings, space, cfg)
    check_space(space, cfg)  # every corner of the box gives a valid config (after clipping)
    return settings, space, cfg


def has_tune_state(exp: Path) -> bool:
    """Whether Tune saved an experiment state there (what ``Tuner.restore`` and so a resume need)."""
    return any(exp.glob("experiment_state-*.json"))


def options(**kwargs: Any) -> SearchOptions:
    """SearchOptions from keyword arguments; an unknown name is a one-line error that lists the valid ones."""
    names = {f.name for f in fields(SearchOptions)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ConfigError(f"unknown search option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return replace(SearchOptions(), **kwargs)


def search(space: str | Path | None = None, config: ConfigLike = None, *, resume: str | Path | None = None,
           console: Console | None = None, on_experiment: Callable[[Path], None] | None = None,
           **kwargs: Any) -> SearchResult:
    """Run a search (``space``: a name or a YAML file; ``config``: the base configuration's keys) and evaluate
    its best trial on the test split; or, with ``resume``, continue an interrupted one (then only
    ``final_attacks``, ``final_examples``, ``top``, ``address`` and ``num_cpus`` may be given).
    ``kwargs`` are the fields of :class:`SearchOptions` (run_tune.py's flags). Returns the summary and the
    experiment folder; an interrupted search returns ``complete=False`` with what is known so far."""
    opts = options(space=None if space is None else str(space), config=config, **kwargs)
    return run_search(opts, resume=resume, console=console or Console(), on_experiment=on_experiment)


def run_search(opts: SearchOptions, *, resume: str | Path | None, console: Console,
               on_experiment: Callable[[Path], None] | None = None) -> SearchResult:
    from bmtard_ray.ray_train import cluster
    from bmtard_ray.tuning import report, session

    launch = session.Launch(address=opts.address, num_cpus=opts.num_cpus, overwrite=opts.overwrite, quiet=opts.quiet)
    try:
        if resume is not None:
            if on_experiment is not None:
                on_experiment(Path(resume))
            final = ",".join(_names(opts.final_attacks)) or None
            outcome, settings = session.resume(Path(resume), launch, console, final_attacks=final,
                                               final_examples=opts.final_examples,
                                               top=opts.top if opts.top != 10 else None)
        else:
            settings, space, cfg = prepare(opts)
            check_experiment_dir(settings, opts.overwrite)
            session.preflight(settings, space, cfg, launch)
            if on_experiment is not None:
                on_experiment(Path(settings.experiment_dir))
            console.print(f"[bold]search space {space.name}[/bold] ({space.source}): {space.description}")
            for key, text in describe_space(space):
                console.print(f"  {key}: {text}")
            outcome, settings = session.start(settings, space, cfg, launch, console)
        if not outcome.complete:
            report.write_partial(outcome, settings, console)
            return SearchResult({"experiment": str(outcome.experiment_dir), "best": None},
                                outcome.experiment_dir, complete=False)
        return SearchResult(report.finish(outcome, settings, console), outcome.experiment_dir)
    finally:
        cluster.shutdown_ray(launch.started_ray)
