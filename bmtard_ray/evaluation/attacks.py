"""White-box L-inf attacks of the evaluation (docs/algorithm.md §8.2), hand-written, batched, pure torch.

Conventions shared with the training attacks (:mod:`bmtard_ray.training.attacks`): images live in [0, 1] (any
normalisation is inside the model, so eps is in pixel units); the model runs in eval mode for the attack
and gets its previous mode back afterwards; the gradient is taken with ``torch.autograd.grad`` with respect
to the input only, so model parameters never receive a ``.grad``. Every returned tensor is detached, lies in
the L-inf ball of radius eps around ``x`` and in [0, 1].

Random starts draw from an explicit ``torch.Generator`` (on the CPU unless the caller passes one on the
device): the evaluation seeds one per attack, so the same checkpoint, seed and examples give the same
adversarial examples on every run, whatever else ran before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmtard_ray.errors import ConfigError
from bmtard_ray.models.modes import eval_mode

PGD_LOSSES = ("ce", "cw")
CW_CONFIDENCE = 50.0  # kappa of the released CW-inf evaluation


def cw_margin_loss(logits: Tensor, y: Tensor, confidence: float = CW_CONFIDENCE) -> Tensor:
    """Per-example Carlini-Wagner margin loss to MAXIMISE: ``-max(z_y - max_{j != y} z_j + kappa, 0)``.

    It is 0 once the best wrong class leads the true class by at least ``confidence`` (nothing left to gain)
    and negative before. This is the released code's ``cwloss`` (there: one-hot mask and a -10000 offset),
    written with a -inf mask so it also holds for logits beyond 1e4.
    """
    logits = logits.float()
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
    return -(true - others + confidence).clamp(min=0.0)


def _objective(loss: str, logits: Tensor, y: Tensor) -> Tensor:
    # Summed over the batch, not averaged: the sign of each example's gradient does not depend on the
    # reduction, and a sum does not shrink gradients toward underflow for large batches.
    if loss == "ce":
        return F.cross_entropy(logits.float(), y, reduction="sum")
    return cw_margin_loss(logits, y).sum()


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Onto the L-inf ball of radius eps around x, then into the image range [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _input_grad(model: nn.Module, x_adv: Tensor, y: Tensor, loss: str) -> Tensor:
    x_adv = x_adv.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_objective(loss, model(x_adv), y), [x_adv])
    return grad


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """One step of ``eps * sign(grad CE)`` from ``x`` itself (no random start), clamped to [0, 1]."""
    x = x.detach()
    with eval_mode(model), torch.enable_grad():
        grad = _input_grad(model, x, y, "ce")
    return (x + eps * grad.sign()).clamp_(0.0, 1.0).detach()


def uniform_start(x: Tensor, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """``x + U(-eps, eps)`` clamped to [0, 1], drawn on the generator's device and moved to ``x``'s."""
    gen_device = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, device=gen_device, dtype=torch.float32)
    noise = noise.to(device=x.device, dtype=x.dtype).mul_(2 * eps).sub_(eps)
    # Clamped so that every iterate is a valid image: with steps=0 the start itself is returned.
    return (x + noise).clamp_(0.0, 1.0)


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, step_size: float, steps: int, random_start: bool,
        loss: str = "ce", generator: torch.Generator | None = None) -> Tensor:
    """L-inf PGD: ``steps`` ascent steps of ``step_size * sign(grad)``, each projected onto the eps-ball and [0, 1].

    ``loss``: "ce" (cross-entropy against the true labels) or "cw" (:func:`cw_margin_loss`, kappa 50).
    ``random_start``: begin at a uniform point of the ball (Madry), else at ``x``.
    """
    if loss not in PGD_LOSSES:
        raise ConfigError(f"unknown PGD loss '{loss}'; choose one of: {', '.join(PGD_LOSSES)}")
    if steps < 0:
        raise ConfigError(f"PGD steps must be >= 0, got {steps}")
    x = x.detach()
    x_adv = uniform_start(x, eps, generator) if random_start else x.clone()
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            grad = _input_grad(model, x_adv, y, loss)
            x_adv = _project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()
