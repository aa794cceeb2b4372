"""Entropy-Based Balance (EBB) and Normalization Loss Balance (NLB): small stateful objects.

Both keep their state as device tensors and update without a host sync, so a training step never waits
on the GPU. Their inputs are the statistics of the *global* batch: under data parallelism the trainer
all-reduces them first (or, for EBB's ``solve`` mode, gathers the teacher logits), so every rank holds the
same temperatures and weights.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bmtard_ray.config import EBBConfig, NLBConfig
from bmtard_ray.training.entropy_solve import solve_equalised, solve_temperatures


def unreachable_target(cfg: EBBConfig, num_classes: int) -> str | None:
    """The note a run prints once at its start when ``mode: solve`` is given an absolute target entropy that
    no temperature reaches: a mean entropy stays below log K (a uniform prediction's) at every finite
    temperature, so the solve clips every teacher's temperature at ``tau_max`` on every iteration."""
    if not (cfg.enabled and cfg.mode == "solve" and cfg.target_mode == "absolute" and cfg.target_entropy is not None):
        return None
    ceiling = math.log(num_classes)
    if cfg.target_entropy < ceiling:
        return None
    return (f"note: ebb.target_entropy={cfg.target_entropy:g} nats can never be reached: a teacher's entropy stays "
            f"below log K = {ceiling:.4g} ({num_classes} classes) at any temperature, so ebb.mode=solve holds both "
            f"temperatures at ebb.tau_max={cfg.tau_max:g} throughout (give a target below log K, or "
            "ebb.target_mode=fraction)")


class EntropyBalance:
    """Per-iteration sign step on the teachers' temperatures (docs/algorithm.md §2.4, generalised in §5.1).

    With no target entropy the paper's rule equalises the two teachers:
    ``tau_adv -= eta * sign(H_adv / H_nat - 1)``, ``tau_nat -= eta * sign(H_nat / H_adv - 1)``.
    With a target ``H*`` each teacher is driven toward it: ``tau_i -= eta * sign(H_i / H* - 1)``.
    A teacher whose entropy is too high is sharpened (tau down), one whose entropy is too low softened.

    ``mode: solve`` (this project's extension, docs/algorithm.md §6) replaces the sign step by :meth:`solve`: every
    iteration, before the losses, the temperatures are solved exactly on the global batch of teacher logits,
    then optionally blended with the previous ones (``smoothing``). The initial temperatures play no part.
    """

    def __init__(self, cfg: EBBConfig, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.eta = cfg.eta_tau
        if cfg.target_entropy is None:
            self.target: float | None = None
        elif cfg.target_mode == "fraction":
            self.target = cfg.target_entropy * math.log(num_classes)
        else:
            self.target = cfg.target_entropy
        self.solves = cfg.enabled and cfg.mode == "solve"
        # [tau_adv, tau_nat]. In solve mode the first solve overwrites them, smoothing or not.
        self.tau = torch.tensor([cfg.tau_adv_init, cfg.tau_nat_init], dtype=torch.float32, device=device)
        self.solved = False  # host-side: whether a solve has happened (the first one is not blended)

    def epoch_report(self, tau: Tensor) -> dict[str, float]:
        """What the balance aimed at and how often it was pinned, for one epoch's ``[n, 2]`` temperatures
        (the trace's ``tau_adv``, ``tau_nat``): the target entropy in nats (NaN when it equalises the teachers),
        the bounds, and the share (%) of iterations each temperature sat at a bound, where the balance could not
        move it further. All NaN when EBB is off (MTARD): there is no balance to describe."""
        names = ("H_target", "tau_min", "tau_max", "tau_adv_at_bound", "tau_nat_at_bound")
        if not self.enabled or tau.shape[0] == 0:
            return dict.fromkeys(names, math.nan)
        lo, hi = self.cfg.tau_min, self.cfg.tau_max
        pinned = ((tau <= lo + 1e-6) | (tau >= hi - 1e-6)).float().mean(0).mul(100).tolist()
        target = self.target if self.target is not None else math.nan
        return dict(zip(names, (target, lo, hi, *pinned), strict=True))

    def decay(self, factor: float) -> None:
        """Scale the step size (eta_tau is decayed with the learning rate at the milestones)."""
        self.eta = self.cfg.eta_tau * factor

    def step(self, h_adv: Tensor, h_nat: Tensor) -> None:
        """Update the temperatures from this iteration's teacher entropies (at the old temperatures).

        The paper's sign step; a no-op in ``solve`` mode, whose temperatures come from :meth:`solve`.
        """
        if not self.enabled or self.solves or self.eta == 0:
            return
        h = torch.stack([h_adv, h_nat]).float()
        ref = torch.full_like(h, self.target) if self.target is not None else h.flip(0)
        new = self.tau - self.eta * torch.sign(h / ref - 1)
        self.tau.copy_(new.clamp(self.cfg.tau_min, self.cfg.tau_max))

    def solve(self, z_adv: Tensor, z_nat: Tensor, mask: Tensor) -> None:
        """Set the temperatures this iteration's losses use (``solve`` mode; no host sync).

        ``z_adv``, ``z_nat``: the robust and clean teachers' logits on the *global* batch (N, K), rows
        aligned; ``mask`` (N,) is 1 for real rows, 0 for the padding of unequal shards. With a target H*,
        each temperature is solved so that its teacher's mean entropy equals H*; without one, the paper's
        equalisation anchored at tau_min (:func:`solve_equalised`). Both are clipped to [tau_min, tau_max].
        """
        if not self.solves:
            return
        cfg = self.cfg
        z = torch.stack([z_adv.detach().float(), z_nat.detach().float()])
        if self.target is None:
            tau = solve_equalised(z, cfg.tau_min, cfg.tau_max, mask)
        else:
            target = torch.full((2,), self.target, device=z.device)
            tau = solve_temperatures(z, target, cfg.tau_min, cfg.tau_max, mask)
        if self.solved and cfg.smoothing > 0:
            tau = cfg.smoothing * self.tau + (1 - cfg.smoothing) * tau
        self.tau.copy_(tau)
        self.solved = True

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau.detach().cpu().clone(), "eta": self.eta, "solved": self.solved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau.copy_(state["tau"].to(self.tau.device))
        self.eta = float(state["eta"])
        self.solved = bool(state.get("solved", False))  # checkpoints from before solve mode carry no flag


class LossBalance:
    """Per-iteration update of the two loss weights (docs/algorithm.md §2.5, generalised in §5.3).

    ``r_i = L_i / L_i(0)``; ``q_adv = r_adv^beta / (r_adv^beta + r_nat^beta)``;
    ``w_adv <- (1 - rho) w_adv + rho q_adv``; ``w_nat = 1 - w_adv``. ``L_i(0)`` is the first iteration's
    loss (``ref_window=1``, as released) or the mean over the first N = ``ref_window`` iterations.

    The rule for N > 1: the weights are held at their initial values until the reference is complete.
    Iterations 1..N-1 only record their losses (and train with ``w_adv_init``); iteration N adds its loss,
    which completes the mean, and takes the first update against it; from then on the reference is fixed.
    N = 1 is exactly the released behaviour (iteration 1 records L(0) and updates with r = (1, 1)). A partial
    mean would compare each early loss mostly with itself and move the weights on noise.
    """

    def __init__(self, cfg: NLBConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.rho = cfg.rho
        self.w_adv = torch.tensor(cfg.w_adv_init, dtype=torch.float32, device=device)
        self.ref_sum = torch.zeros(2, dtype=torch.float32, device=device)
        self.ref_count = 0  # host-side counter: no sync needed to know whether the window is full

    @property
    def reference(self) -> Tensor:
        return self.ref_sum / max(self.ref_count, 1)

    def decay(self, factor: float) -> None:
        self.rho = self.cfg.rho * factor

    def step(self, l_adv: Tensor, l_nat: Tensor) -> None:
        """Update the weights from this iteration's (detached, global-batch) losses."""
        if not self.enabled:
            return
        losses = torch.stack([l_adv, l_nat]).detach().float()
        if self.ref_count < self.cfg.ref_window:
            self.ref_sum += losses
            self.ref_count += 1
            if self.ref_count < self.cfg.ref_window:
                return  # the reference is not complete yet: the weights stay at their initial values
        r = losses / self.reference.clamp_min(1e-12)
        rb = r.pow(self.cfg.beta)
        q_adv = rb[0] / rb.sum().clamp_min(1e-12)
        self.w_adv.copy_((1 - self.rho) * self.w_adv + self.rho * q_adv)

    def weights(self) -> tuple[Tensor, Tensor]:
        return self.w_adv, 1 - self.w_adv

    def state_dict(self) -> dict[str, Any]:
        return {"w_adv": self.w_adv.detach().cpu().clone(), "ref_sum": self.ref_sum.detach().cpu().clone(),
                "ref_count": self.ref_count, "rho": self.rho}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w_adv.copy_(state["w_adv"].to(self.w_adv.device))
        self.ref_sum.copy_(state["ref_sum"].to(self.ref_sum.device))
        self.ref_count = int(state["ref_count"])
        self.rho = float(state["rho"])
