"""The Python API: what ``run_train.py``, ``run_eval.py`` and ``run_tune.py`` do, as functions.

    import bmtard_ray
    result = bmtard_ray.train({"student": "small_cnn", "optim.epochs": 2}, preset="smoke")
    result.summary["test"], result.run_dir, result.model
    report = bmtard_ray.evaluate(result, attacks=("clean", "pgd_sat"))
    found = bmtard_ray.search("ebb", {"optim.epochs": 3}, num_samples=8)

A configuration is a :class:`~bmtard_ray.config.RunConfig` or a mapping of the keys ``--set`` takes (nested or
dotted). Errors are :class:`~bmtard_ray.errors.BmtardError` with a one-line message. The search is named
``search``, not ``tune``, so that it does not shadow ``ray.tune`` in a user's script.
"""
from __future__ import annotations

from bmtard_ray.api.eval_run import evaluate
from bmtard_ray.api.results import EvaluationResult, SearchResult, TrainResult, load_run_model
from bmtard_ray.api.search_run import search
from bmtard_ray.api.train_run import train

__all__ = ["train", "evaluate", "search", "TrainResult", "EvaluationResult", "SearchResult", "load_run_model"]
