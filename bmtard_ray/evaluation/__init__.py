"""Robustness evaluation: the attacks of docs/algorithm.md §8 and W-Robust accuracy (see :mod:`.core`), reports
(:mod:`.report`); ``run_eval.py`` is :mod:`bmtard_ray.cli.evaluate`. This package only re-exports their public names.
"""
from __future__ import annotations

from bmtard_ray.evaluation.attacks import cw_margin_loss, fgsm, pgd
from bmtard_ray.evaluation.core import (
           PGD_ATTACKS,
           EvalResult,
           attack_params,
           check_attacks,
           eps_label,
           evaluate,
           w_robust,
)
from bmtard_ray.evaluation.report import print_table, write_reports
from bmtard_ray.names import ATTACK_NAMES, BLACK_BOX

__all__ = ["ATTACK_NAMES", "BLACK_BOX", "PGD_ATTACKS", "EvalResult", "attack_params", "check_attacks",
           "cw_margin_loss", "eps_label", "evaluate", "fgsm", "pgd", "print_table", "w_robust", "write_reports"]
