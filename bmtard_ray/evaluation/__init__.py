"""Robustness evaluation: every attack of REFERENCE §5, W-Robust accuracy, seeded and deterministic.

``evaluate(model, split, cfg)`` runs the attacks named in ``cfg.attacks`` (L-inf, eps ``cfg.eps``, fp32,
model in eval mode, inputs in [0, 1]) over the split batch by batch and returns an :class:`EvalResult` with
accuracies and W-Robust = (clean + robust) / 2 in percent. Training runs call it at the end (and on the
validation subset every epoch); ``run_eval.py`` calls it for any checkpoint.

Robust accuracy is the accuracy of the model on the attacked images, as the released code and RobustBench
count it (an image misclassified when clean usually stays misclassified). Clean accuracy is always measured,
because every W-Robust needs it.

Determinism: every attack with a random start gets its own ``torch.Generator`` seeded from (seed, attack),
so an attack's numbers do not depend on which other attacks ran or in what order; AutoAttack and Square get
``seed`` and reseed their own RNG per batch. Same checkpoint, seed, examples and batch size -> same numbers
(on CUDA up to the non-determinism of cuDNN's backward kernels).
"""
from __future__ import annotations

from bmtard_ray.evaluation.attacks import cw_margin_loss, fgsm, pgd
from bmtard_ray.evaluation.core import PGD_ATTACKS, EvalResult, attack_params, check_attacks, eps_label, evaluate, w_robust
from bmtard_ray.evaluation.report import print_table, write_reports
from bmtard_ray.names import ATTACK_NAMES, BLACK_BOX

__all__ = ["ATTACK_NAMES", "BLACK_BOX", "PGD_ATTACKS", "EvalResult", "attack_params", "check_attacks",
           "cw_margin_loss", "eps_label", "evaluate", "fgsm", "pgd", "print_table", "w_robust", "write_reports"]
