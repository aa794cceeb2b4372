"""Distillation losses and teacher entropies (docs/algorithm.md §2.3-2.4).

Temperature divides the *teacher* logits only; the student is always at temperature 1; no T^2 factor and
no hard-label term. The KL is taken teacher-first (Hinton direction): KL(p_teacher || softmax(student)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reduce_elements(elements: Tensor, reduction: str) -> Tensor:
    """Reduce a (B, K) tensor of per-element KL terms.

    ``elementwise_mean`` is the released code's ``torch.mean`` over all B*K elements (= batch-mean KL / K);
    ``batchmean`` is the textbook batch-mean KL; ``sum`` sums everything.
    """
    if reduction == "elementwise_mean":
        return elements.mean()
    if reduction == "batchmean":
        return elements.sum() / elements.shape[0]
    if reduction == "sum":
        return elements.sum()
    raise ValueError(f"unknown reduction '{reduction}'")


def distill_kl(teacher_logits: Tensor, student_logits: Tensor, tau: Tensor | float, *,
               reduction: str = "elementwise_mean", log_eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """KL(softmax(teacher / tau) || softmax(student)); returns (loss, teacher probabilities).

    ``log_eps`` is added inside the teacher's log as the released code does (it keeps log(0) finite).
    The teacher side carries no gradient. Computed in fp32 even under autocast: the softmax of a
    low-precision logit vector loses the small probabilities that the KL and the entropy depend on.
    """
    p = F.softmax(teacher_logits.detach().float() / tau, dim=1)
    log_q = F.log_softmax(student_logits.float(), dim=1)
    elements = p * (torch.log(p + log_eps) - log_q)
    return reduce_elements(elements, reduction), p


def mean_entropy(p: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of the rows of a probability matrix; exact (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim=1).mean()


def kl_student_student(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """TRADES' robust term KL(softmax(p) || softmax(q)), summed over classes, mean over the batch.

    Gradient flows through both sides, as in TRADES' training loss.
    """
    log_p = F.log_softmax(p_logits.float(), dim=1)
    log_q = F.log_softmax(q_logits.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
