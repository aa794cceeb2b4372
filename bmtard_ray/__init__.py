"""bmtard_ray: Balanced Multi-Teacher Adversarial Robustness Distillation, scaled with Ray.

The core (everything except :mod:`bmtard_ray.ray_train` and :mod:`bmtard_ray.tuning`) is pure PyTorch and
never imports Ray or Optuna.
"""
from __future__ import annotations

__version__ = "0.1.0"
