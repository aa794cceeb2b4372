"""The exact entropy balance (``ebb.mode: solve``, this project's extension; docs/algorithm.md §6).

Each teacher's mean entropy over a batch, H_i(tau) = mean_n H(softmax(z_i,n / tau)), never decreases as tau
grows (the paper's Theorem 1: dH/dtau = Var_p(z) / tau^3 >= 0). So the temperature at which H_i meets a
target is found by a search that only compares values: bisection, here generalised to ``SECTIONS`` equal
sections per round (every round evaluates all interior points in one batched call, so a round costs one
set of kernels instead of log2(SECTIONS) rounds of them). A fixed number of rounds, no data-dependent
branch and no ``.item()``: the solve is a short, static sequence of device kernels with no host sync.

Batches are given as teacher logits ``z`` of shape (T, N, K) (T teachers, N rows, K classes) with a row
weight ``mask`` (N,) that is 1 for real rows and 0 for the padding rows of a gathered, unequal-shard batch.
"""
from __future__ import annotations

import torch
from torch import Tensor

# 8 sections per round, 8 rounds: the bracket shrinks by 8^8 ~ 1.7e7, i.e. to 6e-8 of tau_max - tau_min,
# about float32's resolution at tau ~ 10. dH/dtau is a few nats per unit tau at most for K <= 1000, so the
# entropy error from the bracket is far below the 1e-3 nats the balance is held to. (More sections per round
# means fewer rounds of kernels on a GPU but more entropy evaluations on a CPU; 8 x 8 costs 58 evaluations.)
SECTIONS = 8
ROUNDS = 8


def mean_entropy_at(z: Tensor, tau: Tensor, mask: Tensor) -> Tensor:
    """Masked mean entropy (nats) of softmax(z / tau) for every teacher and every candidate temperature.

    ``z``: (T, N, K); ``tau``: (T,) or (T, M) candidates; ``mask``: (N,). Returns (T,) or (T, M).
    Computed in fp32 as H = log(sum e^y) - E_p[y] with y = z / tau shifted so its row maximum is 0: no log of a
    probability, so rows with tiny probabilities stay exact. (Written out rather than through log_softmax,
    whose CPU kernel for a short last dimension costs ten times the rest of this function.)
    """
    squeeze = tau.dim() == 1
    t = tau.unsqueeze(1) if squeeze else tau                      # (T, M)
    y = z.float().unsqueeze(1) / t[:, :, None, None]              # (T, M, N, K)
    y = y - y.amax(-1, keepdim=True)
    e = y.exp()
    s = e.sum(-1)
    h_rows = s.log() - (e * y).sum(-1) / s                        # (T, M, N)
    w = mask.to(h_rows.dtype)
    h = (h_rows * w).sum(-1) / w.sum().clamp_min(1.0)
    return h.squeeze(1) if squeeze else h


def solve_temperatures(z: Tensor, target: Tensor, tau_min: float, tau_max: float, mask: Tensor) -> Tensor:
    """Per teacher, the temperature in [tau_min, tau_max] whose masked mean entropy equals ``target`` (T,).

    A target below the entropy at ``tau_min`` gives exactly ``tau_min``; one above the entropy at ``tau_max``
    gives exactly ``tau_max`` (the bound the unreachable target hits).
    """
    n_teachers = z.shape[0]
    target = target.to(device=z.device, dtype=torch.float32).expand(n_teachers)
    # Constants are made by fill kernels, never copied from the host (a host-to-device copy can wait on the stream).
    lo = torch.full((n_teachers,), float(tau_min), device=z.device)
    hi = torch.full((n_teachers,), float(tau_max), device=z.device)
    bounds = torch.stack([lo, hi], dim=1)                                    # (T, 2)
    frac = torch.linspace(0.0, 1.0, SECTIONS + 1, device=z.device)          # includes both ends
    for _ in range(ROUNDS):
        grid = lo[:, None] + (hi - lo)[:, None] * frac[None, :]           # (T, SECTIONS + 1)
        below = mean_entropy_at(z, grid[:, 1:-1], mask) < target[:, None]  # (T, SECTIONS - 1), monotone
        # H is non-decreasing in tau, so ``below`` is True on a prefix: the root lies in section j = its length.
        j = below.sum(1, keepdim=True)
        lo = grid.gather(1, j).squeeze(1)
        hi = grid.gather(1, j + 1).squeeze(1)
    tau = (lo + hi) / 2
    h_bounds = mean_entropy_at(z, bounds, mask)                              # (T, 2)
    tau = torch.where(h_bounds[:, 0] >= target, torch.full_like(tau, tau_min), tau)
    return torch.where(h_bounds[:, 1] <= target, torch.full_like(tau, tau_max), tau)


def solve_equalised(z: Tensor, tau_min: float, tau_max: float, mask: Tensor) -> Tensor:
    """The paper's equalisation, solved: the teacher with the higher entropy at ``tau_min`` stays at ``tau_min``,
    every other teacher's temperature is solved so that its entropy equals that one (clipped to the bounds).

    This is where the sign-step rule ends when it starts, as released, with every temperature at the floor.
    Anchoring at ``tau_min`` (not at the current temperatures) makes the answer a function of the batch
    alone, so noisy batches from one distribution cannot ratchet the temperatures upward.
    """
    floor = torch.full((z.shape[0],), float(tau_min), device=z.device)
    h_floor = mean_entropy_at(z, floor, mask)
    ref = h_floor.max()
    tau = solve_temperatures(z, ref, tau_min, tau_max, mask)
    return torch.where(h_floor >= ref, floor, tau)
