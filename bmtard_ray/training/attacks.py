"""Training-time attacks, hand-written for control and speed (docs/algorithm.md §2.1 and §7).

All work in [0, 1] pixel space (normalisation, if any, lives inside the model), put the model in eval mode
for the attack and restore its previous mode afterwards (BN uses running statistics and is not updated),
and take the gradient with ``torch.autograd.grad`` with respect to the input only: the model's parameters
get no ``.grad`` and an attack step costs one forward and one backward pass.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmtard_ray.models.modes import eval_mode
from bmtard_ray.training.losses import kl_student_student

LossFn = Callable[[Tensor], Tensor]  # logits of the attacked input -> scalar to *maximise*


# Where a rank's rows sit in the global batch: (first row, rows in the global batch).
Shard = tuple[int, int]


def _start_buffer(x: Tensor, shard: Shard | None) -> tuple[Tensor, slice]:
    """An empty tensor to draw the random start into, and the slice of it that is ``x``'s.

    With ``shard``, the draw covers the whole global batch (every rank draws the same numbers from its
    identically seeded generator) and each rank keeps its own rows: the start of global batch k does not
    depend on how many workers share it. Without one, or when ``x`` is the whole batch, it is
    ``empty_like(x)``, the draw the 1-worker run has always made."""
    if shard is None or (shard[0] == 0 and shard[1] == x.shape[0]):
        return torch.empty_like(x), slice(None)
    first, total = shard
    fmt = (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
           and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    buf = torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
    return buf, slice(first, first + x.shape[0])


def perturb(model: nn.Module, x: Tensor, objective: LossFn, *, eps: float, step_size: float, steps: int,
            start: str = "gaussian", init_std: float = 0.001, shard: Shard | None = None) -> Tensor:
    """L-inf PGD: ``steps`` signed-gradient ascent steps on ``objective``, projected and clamped each step.

    ``start``: "gaussian" (x + init_std * N(0, 1), as the released B-MTARD/TRADES code), "uniform"
    (x + U(-eps, eps), Madry) or "none". ``shard``: where ``x`` sits in the global batch (data-parallel
    training), so the random start is the global batch's, whatever the world size. The returned tensor is
    detached.
    """
    x = x.detach()
    if start == "gaussian":
        buf, rows = _start_buffer(x, shard)
        x_adv = x + init_std * buf.normal_()[rows]
    elif start == "uniform":
        # Clamped before the first gradient, as Madry's reference and our evaluation attacks do: the model
        # never sees an invalid image.
        buf, rows = _start_buffer(x, shard)
        x_adv = (x + buf.uniform_(-eps, eps)[rows]).clamp_(0.0, 1.0)
    elif start == "none":
        x_adv = x.clone()
    else:
        raise ValueError(f"unknown start '{start}'")
    # The released B-MTARD/TRADES code does not clamp its Gaussian start; the first projection does.
    with eval_mode(model):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = objective(model(x_adv))
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    return x_adv.detach()


def pgd_ce(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, step_size: float, steps: int,
           start: str = "gaussian", init_std: float = 0.001, shard: Shard | None = None) -> Tensor:
    """Maximise cross-entropy against the true labels (B-MTARD, MTARD, ARD, SAT)."""
    def objective(logits: Tensor) -> Tensor:
        # Summed, not averaged: the sign of the gradient is the same, and the sum does not shrink the
        # gradient toward bf16 underflow for large batches.
        return F.cross_entropy(logits.float(), y, reduction="sum")
    return perturb(model, x, objective, eps=eps, step_size=step_size, steps=steps, start=start, init_std=init_std,
                   shard=shard)


def pgd_trades(model: nn.Module, x: Tensor, *, eps: float, step_size: float, steps: int,
               init_std: float = 0.001, shard: Shard | None = None) -> Tensor:
    """TRADES' inner maximisation: KL(S(x) || S(x_adv)) from x + 0.001 N(0, 1)."""
    with torch.no_grad(), eval_mode(model):
        clean_logits = model(x).float()

    def objective(logits: Tensor) -> Tensor:
        return kl_student_student(clean_logits, logits) * x.shape[0]
    return perturb(model, x, objective, eps=eps, step_size=step_size, steps=steps, start="gaussian", init_std=init_std,
                   shard=shard)


def pgd_soft_label(model: nn.Module, x: Tensor, soft_labels: Tensor, *, eps: float, step_size: float,
                   steps: int, init_std: float = 0.001, shard: Shard | None = None) -> Tensor:
    """RSLAD's inner maximisation: KL(teacher soft labels || S(x_adv)), summed."""
    p = soft_labels.detach().float()

    def objective(logits: Tensor) -> Tensor:
        return (p * (torch.log(p.clamp_min(1e-12)) - F.log_softmax(logits.float(), dim=1))).sum()
    return perturb(model, x, objective, eps=eps, step_size=step_size, steps=steps, start="gaussian", init_std=init_std,
                   shard=shard)
