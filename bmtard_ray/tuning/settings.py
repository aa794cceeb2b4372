"""What a tuning experiment is: objectives, search, scheduler, resources; checked before Ray starts.

Pure Python (no ray, no optuna, no torch), so every check here runs in milliseconds and is unit-tested on its own.
The settings are saved as ``settings.json`` in the experiment folder; ``--resume`` reads them back, so an
interrupted experiment continues with exactly the search it started with.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bmtard_ray.errors import ConfigError
from bmtard_ray.training.metrics import default_mode, objective_names

# A trial reports every per-epoch metric of bmtard_ray.training.metrics (every epoch: tuning requires
# val_every=1); the objectives are those with a direction there.
DEFAULT_OBJECTIVE = "val_w_robust"
DEFAULT_MULTI_OBJECTIVES = ("val_clean", "val_robust")
SAMPLERS = ("tpe", "random", "nsga2")
SCHEDULERS = ("asha", "fifo")
MODES = ("max", "min")
SETTINGS_FILE = "settings.json"
# The Ray dashboard of the cluster the search runs on (written when it connects; read by --review).
CLUSTER_FILE = "ray_cluster.json"
TB_DIR = "tensorboard"                 # <experiment>/tensorboard/<NNN>_<trial id>: the trials' runs (tuning/tb.py)
SETTINGS_FORMAT = "bmtard_ray.tune_settings/1"   # written into settings.json; files without one are version 0


def check_objectives(objectives: tuple[str, ...], modes: tuple[str, ...]) -> None:
    """Every objective must be a metric that trials report (so no trial runs for nothing)."""
    if not objectives:
        raise ConfigError("give at least one objective metric")
    for name in objectives:
        if name not in objective_names():
            raise ConfigError(f"unknown objective '{name}': trials do not report it; choose from: "
                              f"{', '.join(objective_names())}")
    if len(set(objectives)) != len(objectives):
        raise ConfigError(f"objectives must be distinct, got {', '.join(objectives)}")
    if len(modes) != len(objectives):
        raise ConfigError(f"give one mode per objective ({len(objectives)}), got {len(modes)}")
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")


@dataclass
class TuneSettings:
    """Everything about the search that is not the trials' RunConfig (that one is ``base_config``)."""
    space_file: str                                     # absolute path of the space YAML
    experiment_dir: str                                 # absolute: <output_dir>/<name>
    objectives: tuple[str, ...] = (DEFAULT_OBJECTIVE,)
    modes: tuple[str, ...] = ("max",)
    num_samples: int = 16
    sampler: str = "tpe"
    scheduler: str = "asha"
    asha_metric: str = DEFAULT_OBJECTIVE                # ASHA ranks by one metric (W-Robust in multi mode)
    grace_period: int = 1
    reduction_factor: float = 3.0
    n_startup_trials: int | None = None                 # None: min(10, max(2, num_samples // 4))
    seed: int = 0                                       # the sampler's seed (the trials keep cfg.seed)
    storage: str | None = None                          # None: sqlite:///<experiment_dir>/optuna.db
    study_name: str = "bmtard"
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None                # None: 1 if the cluster has GPUs (and device != cpu)
    max_concurrent: int | None = None                   # None: derived from the cluster's resources
    max_failures: int = 2                               # per trial: restarts from its checkpoint (-1: unlimited)
    epoch_budget: int | None = None                     # stop the search after this many trained epochs in all
    final_attacks: tuple[str, ...] = ()                 # () : the evaluation suite (see final.py)
    final_examples: int | None = None                   # None: the base config's eval.n_examples
    top: int = 10                                       # leaderboard rows printed
    preset: str | None = None                           # the trials' preset (recorded in the Optuna study)
    base_config: dict[str, Any] = field(default_factory=dict)

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    @property
    def objective(self) -> str:
        return self.objectives[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.experiment_dir) / 'optuna.db'}"

    @property
    def storage_folder(self) -> str | None:
        """The folder of a SQLite study file (it must be writable), None for a database server."""
        prefix = "sqlite:///"
        return str(Path(self.storage_url[len(prefix):]).parent) if self.storage_url.startswith(prefix) else None

    @property
    def startup_trials(self) -> int:
        if self.n_startup_trials is not None:
            return self.n_startup_trials
        return min(10, max(2, self.num_samples // 4))

    def validate(self) -> TuneSettings:
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples must be >= 1, got {self.num_samples}")
        check_objectives(tuple(self.objectives), tuple(self.modes))
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler '{self.sampler}'; choose one of: {', '.join(SAMPLERS)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler '{self.scheduler}'; choose one of: {', '.join(SCHEDULERS)}")
        if self.sampler == "nsga2" and not self.multi:
            raise ConfigError("--sampler nsga2 is a multi-objective sampler; use it with --multi-objective")
        check_objectives((self.asha_metric,), (default_mode(self.asha_metric),))
        if self.grace_period < 1:
            raise ConfigError(f"--grace-period must be >= 1 epoch, got {self.grace_period}")
        if not (math.isfinite(self.reduction_factor) and self.reduction_factor > 1):
            raise ConfigError(f"--reduction-factor must be > 1, got {self.reduction_factor}")
        if self.n_startup_trials is not None and self.n_startup_trials < 0:
            raise ConfigError(f"--n-startup-trials must be >= 0, got {self.n_startup_trials}")
        if self.workers_per_trial < 1:
            raise ConfigError(f"--workers-per-trial must be >= 1 (each trial is a Ray Train run with at least one "
                              f"worker), got {self.workers_per_trial}")
        if self.cpus_per_worker <= 0 or (self.gpus_per_worker or 0) < 0:
            raise ConfigError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ConfigError(f"--max-failures must be >= 0 (or -1 for unlimited), got {self.max_failures}")
        if self.epoch_budget is not None and self.epoch_budget < 1:
            raise ConfigError(f"--epoch-budget must be >= 1, got {self.epoch_budget}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        if self.final_examples is not None and self.final_examples < 1:
            raise ConfigError(f"--final-examples must be >= 1, got {self.final_examples}")
        if self.top < 1:
            raise ConfigError(f"--top must be >= 1, got {self.top}")
        if self.storage is not None:
            check_storage_url(self.storage)
        return self

    # --- persistence -------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format": SETTINGS_FORMAT, **asdict(self)}, indent=2, default=list)

    @classmethod
    def from_json(cls, text: str) -> TuneSettings:
        data = json.loads(text)
        # Version 0 (no format) holds the same fields: it continues as is; any other version refuses.
        found = data.pop("format", SETTINGS_FORMAT)
        if found != SETTINGS_FORMAT:
            raise ConfigError(f"{SETTINGS_FILE} has format {found!r}; this version resumes only {SETTINGS_FORMAT}")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"{SETTINGS_FILE}: unknown fields {', '.join(sorted(unknown))} "
                              "(written by another version?)")
        for key in ("objectives", "modes", "final_attacks"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def read_settings_file(experiment_dir: Path) -> TuneSettings:
    """The settings an experiment folder was started with (a one-line error if it holds none)."""
    path = experiment_dir / SETTINGS_FILE
    if not path.is_file():
        raise ConfigError(f"{experiment_dir} is not a run_tune.py experiment (no {SETTINGS_FILE}); "
                          "give the experiment folder printed when it started")
    settings = TuneSettings.from_json(path.read_text())
    # An experiment may live elsewhere than where it started: trust the folder we were given.
    settings.experiment_dir = str(experiment_dir.resolve())
    return settings


def check_storage_url(url: str) -> None:
    """A database URL Optuna's RDBStorage can open (checked for shape only; nothing is created here)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ArgumentError:
        raise ConfigError(f"--storage '{url}' is not a database URL (e.g. sqlite:///path/optuna.db, "
                          "postgresql://user@host/db)") from None


def resolve_gpus(settings: TuneSettings, cluster: dict[str, float], device: str) -> None:
    """Fix an automatic ``gpus_per_worker``: one GPU per worker when the cluster has GPUs and the trials'
    device allows it, else CPU workers. Explicit values are kept (0.5 packs two trials per GPU)."""
    if settings.gpus_per_worker is None:
        settings.gpus_per_worker = 1.0 if float(cluster.get("GPU", 0)) > 0 and device != "cpu" else 0.0
    if device == "cpu" and settings.gpus_per_worker > 0:
        raise ConfigError("device 'cpu' with GPU workers: drop --gpus-per-worker or use --device auto")
    if device == "cuda" and settings.gpus_per_worker == 0:
        raise ConfigError("device 'cuda' needs GPU workers: pass --gpus-per-worker 1 (or --device cpu)")


def max_concurrent_trials(cluster: dict[str, float], settings: TuneSettings) -> int:
    """How many trials fit side by side, so that no trial's workers wait for another trial to finish.

    The trial driver itself reserves no CPU (it only waits on its Ray Train controller); each trial's
    workers reserve ``cpus_per_worker`` (and ``gpus_per_worker``) apiece.
    """
    per_cpu = settings.workers_per_trial * settings.cpus_per_worker
    per_gpu = settings.workers_per_trial * (settings.gpus_per_worker or 0.0)
    have_cpu, have_gpu = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    fits = [math.floor(have_cpu / per_cpu + 1e-9)]
    if per_gpu > 0:
        fits.append(math.floor(have_gpu / per_gpu + 1e-9))
    n = min(fits)
    if n < 1:
        raise ConfigError(f"one trial needs {per_cpu:g} CPU and {per_gpu:g} GPU "
                          f"({settings.workers_per_trial} worker(s)) "
                          f"but the Ray cluster has {have_cpu:g} CPU and {have_gpu:g} GPU; lower --workers-per-trial, "
                          "--cpus-per-worker or --gpus-per-worker")
    if settings.max_concurrent is not None:
        n = min(n, settings.max_concurrent)
    return min(n, settings.num_samples)
