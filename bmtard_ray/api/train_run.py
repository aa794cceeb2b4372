"""``bmtard_ray.train``: one training run, in this process or through Ray Train, from Python.

``run_train.py`` is a thin layer over :func:`train`: it turns its flags into the same arguments. Everything is
checked (configuration, data folder, teacher files, run folder) before a file is written, and an error is a
:class:`~bmtard_ray.errors.BmtardError` whose message is one line.

``--resume`` (here ``resume=``) continues the run that is there: the saved config defines what is trained,
and only the keys of :data:`RESUME_KEYS` (more epochs, where and how fast it runs, validation and checkpoint
cadence) may change.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from bmtard_ray.api.configs import ConfigLike, dotted, run_config
from bmtard_ray.api.results import TrainResult
from bmtard_ray.config import RunConfig, flat_keys, from_dict, nest, to_dict, update, validate
from bmtard_ray.errors import ConfigError
from bmtard_ray.storage import checkpoints
from bmtard_ray.storage.paths import exists, is_uri, join
from bmtard_ray.storage.run_folder import MODEL_FILE, read_summary

if TYPE_CHECKING:
    from bmtard_ray.ray_train import RayRunOptions

# Keys a resume may change: how long (more epochs), where and how fast it runs, how often it validates and
# checkpoints. Everything else defines what is trained and stays as the run saved it.
RESUME_KEYS = ("optim.epochs", "device", "compile", "sync_every_step", "val_every", "val_examples",
               "checkpoint_every", "checkpoint_every_iters", "data.root", "data.num_workers", "eval.batch_size",
               "teachers.logit_cache")

# What ``ray=`` may hold: run_train.py's Ray flags (see ray_train.scaling.RAY_FLAG_KEYS), plus the CPUs of a
# Ray started by this call.
RAY_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker", "placement", "address", "storage_path", "max_failures",
            "keep_checkpoints", "resize_interval", "wait_for_workers", "num_cpus")

RayLike = bool | Mapping[str, Any] | None


def resume_config(resume: str | Path, changes: Mapping[str, Any] | None = None) -> tuple[RunConfig, int]:
    """The config a resumed run continues with (its saved one, plus only the changes :data:`RESUME_KEYS`
    allow) and the epochs its checkpoint holds."""
    state, saved = checkpoints.load_resume_state(resume)
    cfg = from_dict(to_dict(saved))
    if changes:
        update(cfg, nest(dotted(changes)))
    before, after = flat_keys(saved), flat_keys(cfg)
    for key, value in after.items():
        if value != before[key] and key not in RESUME_KEYS:
            raise ConfigError(f"a resumed run continues as it was defined: {key} cannot change "
                              f"({before[key]!r} -> {value!r}); on resume only {', '.join(RESUME_KEYS)} can")
    done = int(state.get("epoch", 0))
    if cfg.optim.epochs < done:
        raise ConfigError(f"optim.epochs={cfg.optim.epochs} is fewer than the {done} epochs the run has trained")
    return validate(cfg), done


def run_folder(cfg: RunConfig, resume: str | Path | None, storage_path: str | None) -> str:
    """Where a run lives: the folder being resumed, else <storage path or output dir>/<name>."""
    if resume is not None:
        return checkpoints.run_dir_of(resume)
    parent = storage_path or cfg.output_dir
    return join(parent if is_uri(parent) else str(Path(parent).expanduser().resolve()), cfg.name)


def ray_options(ray: Mapping[str, Any], ray_config: str | None = None) -> tuple[RayRunOptions, dict[str, Any]]:
    """The Ray run's options from ``ray`` (run_train.py's flag names) over the YAML file ``ray_config``, and the
    arguments of a Ray started here."""
    from bmtard_ray.ray_train import ray_run_options

    unknown = sorted(set(ray) - set(RAY_KEYS))
    if unknown:
        raise ConfigError(f"unknown Ray option(s) {', '.join(unknown)}; valid: {', '.join(RAY_KEYS)}")
    init = {"num_cpus": ray["num_cpus"]} if ray.get("num_cpus") is not None else {}
    return ray_run_options({k: v for k, v in ray.items() if k != "num_cpus"}, ray_config), init


def train(config: ConfigLike = None, *, preset: str | None = None, config_files: Sequence[str | Path] = (),
          ray: RayLike = False, ray_config: str | None = None, resume: str | Path | None = None,
          overwrite: bool = False, console: Console | None = None,
          on_folder: Callable[[str], None] | None = None) -> TrainResult:
    """Train a student (and any teacher it needs first) and evaluate it; return the summary, folder and model.

    ``config``: a :class:`~bmtard_ray.config.RunConfig`, or a mapping of the keys ``--set`` takes (nested or
    dotted), applied over ``preset`` (default ``cpu``) and ``config_files``. With ``resume`` (a run folder or
    checkpoint), the mapping may only change :data:`RESUME_KEYS`.
    ``ray``: False (default) trains in this process; True, or a mapping of run_train.py's Ray options
    (``{"workers": 2, "address": "head:6379", ...}``, see :data:`RAY_KEYS`), trains through Ray Train.
    ``on_folder`` is called with the run folder once it is known, before anything runs (the CLI uses it to
    name the folder a Ctrl-C can resume).
    """
    console = console or Console()
    use_ray = bool(ray) or ray_config is not None
    if not use_ray and ray is not False and ray is not None:
        raise ConfigError(f"ray must be True, False or a mapping of Ray options, got {ray!r}")
    done: int | None = None
    if resume is not None and not is_uri(str(resume)):
        if isinstance(config, RunConfig) or preset is not None or config_files:
            raise ConfigError("a resumed run continues with the config it saved: give only a mapping of the keys "
                              f"it may change ({', '.join(RESUME_KEYS)})")
        cfg, done = resume_config(resume, config)
    else:  # a new run (or a URI run folder, whose config comes from the options)
        cfg = run_config(config, preset=preset, files=config_files)
    # The configuration is valid before Ray is even imported.
    options, init = ray_options(ray if isinstance(ray, Mapping) else {}, ray_config) if use_ray else (None, {})
    folder = run_folder(cfg, resume, options.storage_path if options is not None else None)
    if on_folder is not None:
        on_folder(folder)
    if done is not None and done >= cfg.optim.epochs and exists(join(folder, MODEL_FILE)):
        console.print(f"{folder} already finished its {done} epochs; nothing to do (add epochs: --epochs N, or "
                      "optim.epochs)", soft_wrap=True, markup=False, highlight=False)
        return TrainResult(read_summary(folder), folder, cfg)
    if options is None:
        from bmtard_ray.launch.local import run_local

        summary = run_local(cfg, resume=resume, overwrite=overwrite, console=console)
    else:
        from bmtard_ray.ray_train import run_ray

        summary = run_ray(cfg, options.scaling, address=options.address, storage_path=options.storage_path,
                          resume=resume, overwrite=overwrite, failure_max=options.max_failures,
                          keep_checkpoints=options.keep_checkpoints, console=console, **init)
    return TrainResult(summary, folder, cfg)
