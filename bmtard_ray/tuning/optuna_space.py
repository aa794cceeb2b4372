"""A :class:`~bmtard_ray.tuning.space.SearchSpace` as Optuna sees it: distributions, a define-by-run sampler
function, and the seeded sampler itself."""
from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from bmtard_ray.tuning.settings import TuneSettings
from bmtard_ray.tuning.space import Param, SearchSpace


def _bounds(p: Param) -> tuple[float | int, float | int]:
    """A numeric parameter's bounds (parse_space sets both for every float and int parameter)."""
    assert p.low is not None and p.high is not None, p.key
    return p.low, p.high


def distribution(p: Param) -> BaseDistribution:
    if p.kind == "float":
        return FloatDistribution(*map(float, _bounds(p)), log=p.log, step=p.step)
    if p.kind == "int":
        return IntDistribution(*map(int, _bounds(p)), log=p.log, step=int(p.step or 1))
    return CategoricalDistribution(list(p.choices))


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """Every parameter's distribution (conditional ones included), keyed by dotted config key."""
    return {p.key: distribution(p) for p in space.params}


def suggest(trial: optuna.Trial, p: Param) -> Any:
    if p.kind == "float":
        return trial.suggest_float(p.key, *map(float, _bounds(p)), log=p.log, step=p.step)
    if p.kind == "int":
        return trial.suggest_int(p.key, *map(int, _bounds(p)), log=p.log, step=int(p.step or 1))
    return trial.suggest_categorical(p.key, list(p.choices))


OPTUNA_NUMBER = "optuna_number"  # key of the Optuna trial number in a Tune trial's config


class DefineByRun:
    """Optuna's define-by-run form of a space: parameters are suggested in file order and a parameter whose
    ``when`` does not hold is not suggested at all (a conditional space, which TPE handles natively).

    A class rather than a closure because Ray Tune pickles the searcher (with this) into the experiment
    folder to resume it.
    """

    def __init__(self, space: SearchSpace, base_values: dict[str, Any]) -> None:
        self.space = space
        self.base_values = dict(base_values)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        values = dict(self.base_values)
        for p in self.space.params:
            if p.active(values):
                values[p.key] = suggest(trial, p)
        # Ray's OptunaSearch records the suggested values as the trial's config, plus what is returned here:
        # Optuna's own trial number, so trials.parquet numbers trials as the study does (also after --resume,
        # when Tune's trial order no longer is the study's).
        return {OPTUNA_NUMBER: trial.number}


def make_sampler(settings: TuneSettings) -> optuna.samplers.BaseSampler:
    """The seeded sampler: TPE (single- or multi-objective), NSGA-II (multi-objective) or random."""
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=settings.seed,
                                             population_size=max(4, min(50, settings.num_samples // 2)))
    # constant_liar: trials running in parallel count as bad guesses, so concurrent suggestions spread out.
    return optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.startup_trials,
                                      constant_liar=True)


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna storage for ``url`` (an RDB URL; SQLite by default) so optuna-dashboard can open the study."""
    return optuna.storages.RDBStorage(url)


def open_study(settings: TuneSettings) -> optuna.Study:
    """The experiment's Optuna study (it exists once the searcher has been created)."""
    return optuna.load_study(study_name=settings.study_name, storage=make_storage(settings.storage_url))
