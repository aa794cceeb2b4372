"""Public entry points of the tuning layer (Ray Tune + Optuna); the implementation is in :mod:`bmtard_ray.tuning`.

``python run_tune.py --space ebb`` is :func:`tune_main`. From Python::

    from bmtard_ray.tune import tune_main
    tune_main(["--space", "ebb", "--num-samples", "24", "--data-root", "data"])
"""
from __future__ import annotations

from bmtard_ray.search_space import SearchSpace, load_space, space_names
from bmtard_ray.tuning.cli import prepare, tune_main, tune_parser
from bmtard_ray.tuning.settings import TRIAL_METRICS, TuneSettings, objective_names

__all__ = ["tune_main", "tune_parser", "prepare", "TuneSettings", "TRIAL_METRICS", "objective_names", "SearchSpace",
           "load_space", "space_names"]
