"""Ray's ``OptunaSearch``, telling the Optuna study what really happened to each trial.

Ray 2.60's ``OptunaSearch`` tells Optuna that a trial ASHA stopped early is COMPLETE, with the value of its
last epoch as if it were the configuration's final score: TPE then learns one-epoch scores as outcomes,
and optuna-dashboard cannot show the trial as pruned. It also reports intermediate values at Tune's
``training_iteration``, which restarts at 1 when ``--resume`` restarts a trial. Here:

* a trial that ended without an error before its last epoch (ASHA stopped it, or the epoch budget ended the
  search) is told PRUNED, after its last epoch's value is recorded as an intermediate value (Tune never
  passes the result that made ASHA stop a trial to ``on_trial_result``). Optuna's TPE ranks PRUNED trials
  by their last intermediate value and step, below the finished ones, as it does with its own pruners;
* intermediate values are reported at our ``epoch`` (the same counter ASHA's time attribute uses);
* each Optuna trial carries user attributes naming its Ray trial id and its folders, set when it is asked
  (Optuna accepts user attributes only while a trial runs), and its outcome and balance (:func:`outcome_attrs`),
  refreshed at every epoch and set once more from the last result before the trial is told (a trial ASHA
  stopped included);
* the study carries its objectives' names (``set_metric_names``) and the attributes it is given.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from bmtard_ray.training.metrics import w_robust_se

TRAIN_DIR = "train"     # <experiment>/train/<trial id>: the trial's Ray Train run (see experiment.py)


def trial_folder(experiment_dir: str | Path, trial_id: str) -> Path:
    """Tune's results folder of a trial (``trial_dirname`` in experiment.py names it so)."""
    return Path(experiment_dir) / f"trial_{trial_id}"


def train_run_name(number: Any, trial_id: str) -> str:
    """A trial's Ray Train run: ``trial<Optuna number, 3 digits>_<ray trial id>``, so that Ray's Train state
    (``/api/train/v2/runs/v1``) ties each run to optuna-dashboard's trial number."""
    return f"trial{int(number):03d}_{trial_id}" if isinstance(number, (int, float)) else trial_id


def trial_run_folder(experiment_dir: str | Path, trial_id: str, number: Any = None) -> Path:
    """The trial's Ray Train run folder: its checkpoints. An experiment started before runs carried the
    number named them by the trial id alone; a trial of it resumes under that name."""
    old = Path(experiment_dir) / TRAIN_DIR / trial_id
    return old if old.is_dir() or number is None else Path(experiment_dir) / TRAIN_DIR / train_run_name(number,
                                                                                                          trial_id)


def _finite(value: Any) -> float | None:
    """A number Optuna can store and optuna-dashboard can show (NaN breaks its JSON): None otherwise."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def outcome_attrs(result: Mapping[str, Any], pinned: Mapping[int, tuple[float, float]]) -> dict[str, Any]:
    """The user attributes that say how a trial ended: its last validation numbers, the balance it ended with
    (temperatures, weights, entropies), what the balance aimed at (target in nats, bounds) and the share of
    all its iterations each temperature sat at a bound (``pinned``: epoch -> per-epoch shares, equal epochs),
    the validation size and the W-Robust standard error it implies."""
    attrs: dict[str, Any] = {k: _finite(result.get(k)) for k in (
        "val_clean", "val_robust", "val_w_robust", "tau_adv", "tau_nat", "w_adv", "w_nat", "H_adv", "H_nat",
        "H_target", "tau_min", "tau_max", "val_n")}
    for i, name in enumerate(("tau_adv_at_bound", "tau_nat_at_bound")):
        shares = [v[i] for v in pinned.values() if math.isfinite(v[i])]
        attrs[name] = sum(shares) / len(shares) if shares else None
    attrs["val_w_robust_se"] = w_robust_se(attrs["val_clean"], attrs["val_robust"], attrs["val_n"])
    return attrs


class StudySearch(OptunaSearch):
    """``OptunaSearch`` with PRUNED early stops, epoch-indexed curves and linked trials (module docstring)."""

    def __init__(self, space: Callable[[optuna.Trial], Any], *, metric: str | list[str], mode: str | list[str],
                 sampler: optuna.samplers.BaseSampler, storage: optuna.storages.BaseStorage, study_name: str,
                 max_epochs: int, experiment_dir: str, study_attrs: Mapping[str, Any] | None = None) -> None:
        super().__init__(space, metric=metric, mode=mode, sampler=sampler, storage=storage, study_name=study_name)
        self._max_epochs = int(max_epochs)
        self._experiment_dir = str(experiment_dir)
        self._reported: dict[str, set[int]] = {}   # trial id -> epochs already told to Optuna
        self._pinned: dict[str, dict[int, tuple[float, float]]] = {}  # trial id -> epoch -> at-bound shares
        names = list(metric) if isinstance(metric, list) else [metric]
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2; optuna-dashboard reads the names
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(names)
        for key, value in (study_attrs or {}).items():
            self._ot_study.set_user_attr(key, value)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    @property
    def _multi(self) -> bool:
        return isinstance(self.metric, list)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        known = trial_id in self._ot_trials
        params = super().suggest(trial_id)
        if not known:  # a fresh Optuna trial, RUNNING: the only time it accepts user attributes
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr("ray_trial_id", trial_id)
            ot_trial.set_user_attr("trial_folder", str(trial_folder(self._experiment_dir, trial_id)))
            ot_trial.set_user_attr("run_folder", str(trial_run_folder(self._experiment_dir, trial_id, ot_trial.number)))
        return params

    def _report(self, trial_id: str, result: Mapping[str, Any] | None) -> None:
        """Record ``result``'s objective at its epoch, once (Optuna keeps the first value of a step)."""
        if self._multi or not result or trial_id not in self._ot_trials:
            return  # Optuna keeps no intermediate values for multi-objective studies
        value, epoch = result.get(self.metric), result.get("epoch")
        if not isinstance(value, (int, float)) or not isinstance(epoch, (int, float)) or not math.isfinite(value):
            return
        seen = self._reported.setdefault(trial_id, set())
        if int(epoch) not in seen:
            self._ot_trials[trial_id].report(float(value), int(epoch))
            seen.add(int(epoch))

    def _describe(self, trial_id: str, result: Mapping[str, Any] | None) -> None:
        """Set the trial's outcome attributes from ``result`` (its newest epoch) while Optuna still takes them."""
        if not result or trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return
        epoch = result.get("epoch")
        if isinstance(epoch, (int, float)):
            shares = tuple(float(v) if isinstance(v := result.get(k), (int, float)) else math.nan
                           for k in ("tau_adv_at_bound", "tau_nat_at_bound"))
            self._pinned.setdefault(trial_id, {})[int(epoch)] = (shares[0], shares[1])
        ot_trial = self._ot_trials[trial_id]
        for key, value in outcome_attrs(result, self._pinned.get(trial_id, {})).items():
            ot_trial.set_user_attr(key, value)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id not in self._completed_trials:
            self._report(trial_id, result)
            self._describe(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        self._report(trial_id, result)
        if not error:
            self._describe(trial_id, result)  # the stopping result never reached on_trial_result
        epoch = (result or {}).get("epoch")
        stopped_early = not error and isinstance(epoch, (int, float)) and epoch < self._max_epochs
        if not stopped_early:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def close_unfinished(study: optuna.Study) -> int:
    """Tell PRUNED every trial still RUNNING in ``study`` (trials the epoch budget cut off never reach
    ``on_trial_complete``: Tune stops them without telling the searcher). Returns how many were closed."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in running:
        study.tell(t.number, state=TrialState.PRUNED)
    return len(running)


def set_study_attrs(study: optuna.Study, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        study.set_user_attr(key, value)


__all__ = ["StudySearch", "trial_folder", "trial_run_folder", "train_run_name", "close_unfinished",
           "set_study_attrs", "TRAIN_DIR", "outcome_attrs"]
