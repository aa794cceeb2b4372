"""bmtard_ray: Balanced Multi-Teacher Adversarial Robustness Distillation, scaled with Ray.

The core (everything except :mod:`bmtard_ray.ray_train`, :mod:`bmtard_ray.tuning` and the Python API's
search) is pure PyTorch and never imports Ray or Optuna.

The Python API (:mod:`bmtard_ray.api`) is re-exported here lazily, so ``import bmtard_ray`` stays light (no
torch, no Ray) until one of its names is used::

    import bmtard_ray
    result = bmtard_ray.train({"student": "small_cnn"}, preset="smoke")
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = ("train", "evaluate", "search", "TrainResult", "EvaluationResult", "SearchResult", "load_run_model")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    # Resolved on first use; importlib (not an import statement) because the API sits at the top of the
    # package's layers (tests/test_structure.py) and this module at the floor.
    if name in _API:
        return getattr(importlib.import_module("bmtard_ray.api"), name)
    raise AttributeError(f"module 'bmtard_ray' has no attribute {name!r}")
