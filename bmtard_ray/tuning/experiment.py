"""Running (or resuming) a Tune experiment and turning its ResultGrid into :class:`TrialRecord` s.

Layout of an experiment folder ``<output_dir>/<name>/``::

    settings.json  space.yaml        what was searched, and how (read back by --resume)
    optuna.db                        the Optuna study (open with `optuna-dashboard sqlite:///.../optuna.db`)
    trial_<id>/                      Tune's per-trial results: result.json, progress.csv, TensorBoard events
    train/<id>/checkpoint_*/         each trial's Ray Train run and its latest checkpoint
    experiment_state-*.json ...      Tune's own state (what Tuner.restore reads)
    trials.parquet leaderboard.md plots/ best/      written at the end (see bmtard_ray.tuning.report)
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from rich.console import Console

from bmtard_ray.config import from_dict
from bmtard_ray.errors import ConfigError
from bmtard_ray.ray_train.cluster import cluster_resources
from bmtard_ray.runtime import fileio
from bmtard_ray.training.metrics import EPOCH_METRICS
from bmtard_ray.tuning.optuna_space import OPTUNA_NUMBER, DefineByRun, make_sampler, make_storage, open_study
from bmtard_ray.tuning.results import TrialRecord
from bmtard_ray.tuning.searcher import TRAIN_DIR, StudySearch, close_unfinished, trial_folder
from bmtard_ray.tuning.settings import SETTINGS_FILE, TuneSettings, max_concurrent_trials, read_settings_file
from bmtard_ray.tuning.space import SearchSpace, load_space
from bmtard_ray.tuning.tb import TrialEvents
from bmtard_ray.tuning.trainable import TrialSetup, make_trainable
from bmtard_ray.tuning.trials import base_values, trial_config

SPACE_COPY = "space.yaml"


@dataclass
class Outcome:
    records: list[TrialRecord]
    complete: bool                  # every trial finished (not interrupted)
    experiment_dir: Path


def setup_of(settings: TuneSettings, space: SearchSpace) -> TrialSetup:
    return TrialSetup(base_config=settings.base_config, space=space,
                      train_dir=str(Path(settings.experiment_dir) / TRAIN_DIR), workers=settings.workers_per_trial,
                      cpus_per_worker=settings.cpus_per_worker,
                      gpus_per_worker=settings.gpus_per_worker or 0.0, max_failures=settings.max_failures)


def study_attrs(settings: TuneSettings, space: SearchSpace) -> dict[str, Any]:
    """What the Optuna study records about the search, shown by optuna-dashboard beside the trials (few
    keys: its table shows five rows a page, and the selection adds two at the end, see report.py)."""
    return {"space": space.name, "preset": settings.preset,
            "objectives": dict(zip(settings.objectives, settings.modes, strict=False))}


def make_searcher(settings: TuneSettings, space: SearchSpace) -> StudySearch:
    base = from_dict(settings.base_config)
    metric: Any = list(settings.objectives) if settings.multi else settings.objective
    mode: Any = list(settings.modes) if settings.multi else settings.mode
    return StudySearch(DefineByRun(space, base_values(base, space)), metric=metric, mode=mode,
                       sampler=make_sampler(settings), storage=make_storage(settings.storage_url),
                       study_name=settings.study_name, max_epochs=int(base.optim.epochs),
                       experiment_dir=settings.experiment_dir, study_attrs=study_attrs(settings, space))


def make_scheduler(settings: TuneSettings, max_epochs: int) -> Any:
    if settings.scheduler == "fifo":
        return FIFOScheduler()
    metric = settings.asha_metric if settings.multi else settings.objective
    mode = "max" if settings.multi else settings.mode
    # time_attr is our own epoch counter, not Tune's training_iteration: it survives a resumed trial
    # (which restarts Tune's count but continues Ray Train's epochs) and it is what max_t is measured in.
    # stop_last_trials=False: a trial that reaches max_t ends by itself (its training is over), so its Ray
    # Train run shuts down cleanly instead of being killed at its last report.
    return ASHAScheduler(time_attr="epoch", metric=metric, mode=mode, max_t=max_epochs,
                         grace_period=min(settings.grace_period, max_epochs),
                         reduction_factor=settings.reduction_factor, stop_last_trials=False)


class EpochBudget(tune.Stopper):
    """Ends the experiment once the trials have trained ``budget`` epochs in all (each trial counts the
    highest epoch it reported), so that searches can be compared at an equal cost in epochs.
    The count starts afresh when an experiment is resumed (Tune does not save a stopper's state)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.epochs: dict[str, int] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        epoch = result.get("epoch")
        if isinstance(epoch, (int, float)):
            self.epochs[trial_id] = max(self.epochs.get(trial_id, 0), int(epoch))
        return False

    def used(self) -> int:
        return sum(self.epochs.values())

    def stop_all(self) -> bool:
        return self.used() >= self.budget


def trial_dirname(trial: Any) -> str:
    return trial_folder("", trial.trial_id).name


def write_settings(settings: TuneSettings, space_path: Path) -> None:
    exp = Path(settings.experiment_dir)
    exp.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(space_path, exp / SPACE_COPY)
    fileio.atomic_text(settings.to_json(), exp / SETTINGS_FILE)


def read_settings(experiment_dir: Path) -> tuple[TuneSettings, SearchSpace]:
    settings = read_settings_file(experiment_dir)
    space = load_space(experiment_dir / SPACE_COPY)
    return settings, space


def run(settings: TuneSettings, space: SearchSpace, *, resume: bool, console: Console, verbose: int = 1,
        n_concurrent: int | None = None) -> Outcome:
    """Fit a new Tuner or restore an interrupted one; returns the trials as records."""
    exp = Path(settings.experiment_dir)
    if n_concurrent is None:
        n_concurrent = max_concurrent_trials(cluster_resources(), settings)
    trainable = make_trainable(setup_of(settings, space))
    max_epochs = int(settings.base_config["optim"]["epochs"])
    if resume:
        if not tune.Tuner.can_restore(str(exp)):
            raise ConfigError(f"{exp} holds no Tune experiment state to resume (it was interrupted before the "
                              "first trial started): start it again without --resume, with --overwrite")
        console.print(f"resuming {exp}")
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        console.print(f"{settings.num_samples} trials, up to {n_concurrent} at a time "
                      f"({settings.workers_per_trial} worker(s) x {settings.cpus_per_worker:g} CPU, "
                      f"{settings.gpus_per_worker or 0:g} GPU each)")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=make_searcher(settings, space),
                                        scheduler=make_scheduler(settings, max_epochs),
                                        num_samples=settings.num_samples, max_concurrent_trials=n_concurrent,
                                        trial_dirname_creator=trial_dirname),
            # A trial whose function died with its node is requeued and its Train run continues from its
            # last checkpoint (the run is named after the trial); finished trials are never rerun.
            # TrialEvents: the trials' TensorBoard runs by Optuna number, our tags, HPARAMS as trials start
            # (it replaces Tune's own TensorBoard logger; restored with the run config on --resume).
            run_config=tune.RunConfig(name=exp.name, storage_path=str(exp.parent), verbose=verbose,
                                      callbacks=[TrialEvents(exp, space)],
                                      failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                      stop=EpochBudget(settings.epoch_budget) if settings.epoch_budget else None))
    grid = tuner.fit()
    statuses = _trial_statuses(grid, exp)
    records = collect_records(grid, settings, space, max_epochs, statuses)
    complete = is_complete(statuses, settings)
    if settings.epoch_budget and sum(r.epochs for r in records) >= settings.epoch_budget:
        # The budget ended the search: trials that never started are not part of it, and the ones it cut
        # off (Tune stops them without telling the searcher) are PRUNED in the study, not left RUNNING.
        complete = True
        close_unfinished(open_study(settings))
        records = [r for r in records if r.metrics or r.status in ("TERMINATED", "ERROR")]
    return Outcome(records=records, complete=complete, experiment_dir=exp)


# ---------------------------------------------------------------------------------------------------------
# ResultGrid -> records.


def saved_statuses(exp: Path) -> dict[str, str]:
    """Each trial's status as Tune last saved it in the experiment folder: what ``Tuner.restore`` will see.

    After a Ctrl-C the in-memory trials read TERMINATED (Tune stops them while cleaning up) although the
    saved state, which decides what ``--resume`` reruns, still says PENDING or RUNNING.
    """
    import json

    # The newest by the timestamp in its name, as Tune itself chooses (mtimes lie: a restored run re-uploads
    # the old state file at its end).
    files = sorted(exp.glob("experiment_state-*.json"), key=lambda p: p.name)
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
        out = {}
        for trial_json, _runtime in data["trial_data"]:
            trial = json.loads(trial_json)
            out[str(trial["trial_id"])] = str(trial["status"])
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _trial_statuses(grid: Any, exp: Path) -> dict[str, str]:
    saved = saved_statuses(exp)
    if saved:
        return saved
    analysis = getattr(grid, "_experiment_analysis", None)
    return {t.trial_id: t.status for t in (getattr(analysis, "trials", None) or [])}


def is_complete(statuses: dict[str, str], settings: TuneSettings) -> bool:
    return len(statuses) >= settings.num_samples and all(s in ("TERMINATED", "ERROR") for s in statuses.values())


def _number(v: Any) -> Any:
    """Numbers as floats (NaN kept: a baseline has no temperatures); anything else unchanged."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def collect_records(grid: Any, settings: TuneSettings, space: SearchSpace, max_epochs: int,
                    statuses: dict[str, str]) -> list[TrialRecord]:
    base = from_dict(settings.base_config)
    records = []
    for number, result in enumerate(grid):  # creation order: the number when Optuna's is not recorded
        metrics = dict(result.metrics or {})
        trial_id = str(metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_"))
        params = {k: v for k, v in (result.config or {}).items() if k in space.keys}
        try:
            _, effective = trial_config(base, space, params)
        except ConfigError:
            effective = {}
        history = []
        df = result.metrics_dataframe
        if df is not None and len(df):
            cols = [c for c in EPOCH_METRICS if c in df.columns]
            history = [{c: _number(row[c]) for c in cols} for _, row in df[cols].iterrows()]
        status = statuses.get(trial_id) or ("ERROR" if result.error else ("TERMINATED" if metrics else "PENDING"))
        records.append(TrialRecord(
            trial_id=trial_id, status=status, params=params, effective=effective,
            metrics={k: _number(metrics[k]) for k in EPOCH_METRICS if k in metrics}, history=history,
            checkpoint_path=metrics.get("checkpoint_path"), trial_dir=str(result.path),
            time_s=float(metrics.get("time_total_s") or math.nan),
            error=(str(result.error).strip().splitlines() or [""])[-1][:300] if result.error else None,
            max_epochs=max_epochs, number=int((result.config or {}).get(OPTUNA_NUMBER, number))))
    return records
