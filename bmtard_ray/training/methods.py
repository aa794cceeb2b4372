"""One training step per method (docs/algorithm.md §2 and §7): pure torch, no I/O, no host sync.

A method's ``step(x, y)`` crafts its adversarial batch, runs the passes, updates its balance state and
returns the loss to back-propagate plus named, detached statistics (device tensors,
:data:`~bmtard_ray.training.metrics.STAT_NAMES`); the trainer only calls it, steps the optimizer, stacks the
statistics on the device and moves them to the host once per epoch. The teachers are frozen, run under
``no_grad`` and are never wrapped in DDP; the attack runs on the *unwrapped* student so its passes trigger no
gradient all-reduce.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmtard_ray.config import EBBConfig, RunConfig
from bmtard_ray.names import METHOD_TEACHERS
from bmtard_ray.runtime.dist import local_rows
from bmtard_ray.training import attacks
from bmtard_ray.training.balance import EntropyBalance, LossBalance
from bmtard_ray.training.losses import distill_kl, kl_student_student, mean_entropy, reduce_elements
from bmtard_ray.training.metrics import STAT_NAMES

# (tensor, this rank's example count) -> the count-weighted mean over ranks; see DistContext.all_reduce_mean.
ReduceFn = Callable[[Tensor, Tensor], Tensor]
# Local (n, C) rows -> the global batch's rows (padded) and a mask of the real ones; see DistContext.all_gather_rows.
GatherFn = Callable[[Tensor], tuple[Tensor, Tensor]]


def _identity(t: Tensor, weight: Tensor | None = None) -> Tensor:
    return t


@dataclass
class StepOutput:
    loss: Tensor                # scalar with grad
    stats: dict[str, Tensor]    # detached scalars named from STAT_NAMES (this rank's, unless global_stats)
    counts: dict[str, Tensor]   # detached scalars named from COUNT_NAMES (this rank's)

    def row(self) -> Tensor:
        """The statistics in STAT_NAMES order, NaN where this method has none (for inspection and tests)."""
        ref = self.loss.detach()
        return torch.stack([self.stats[k].float() if k in self.stats else torch.full((), math.nan, device=ref.device)
                            for k in STAT_NAMES])


@dataclass
class Teachers:
    clean: nn.Module | None = None
    robust: nn.Module | None = None


class Method(ABC):
    """Base class. ``model`` may be a DDP wrapper; ``raw`` is the plain student it wraps."""

    name = "base"
    # True when step() already returns global-batch statistics (B-MTARD all-reduces them every step for
    # its balance); otherwise the trainer averages them over ranks once per epoch.
    global_stats = False

    @property
    def needs(self) -> tuple[str, ...]:
        """Teacher roles this method requires (the registry in :mod:`bmtard_ray.names`)."""
        return METHOD_TEACHERS[self.name]

    def __init__(self, model: nn.Module, raw: nn.Module, cfg: RunConfig, teachers: Teachers, num_classes: int, *,
                 reduce_mean: ReduceFn = _identity, gather_rows: GatherFn = local_rows,
                 autocast: Callable[[], AbstractContextManager[Any]] = nullcontext) -> None:
        self.model, self.raw, self.cfg, self.teachers = model, raw, cfg, teachers
        self.num_classes = num_classes
        self.reduce_mean = reduce_mean
        self.gather_rows = gather_rows
        self.autocast = autocast
        # Where this rank's batch sits in the global batch (set by the trainer before each step in data-parallel
        # training): the attacks draw the global batch's random start and keep these rows.
        self.shard: attacks.Shard | None = None
        for role in self.needs:
            if getattr(teachers, role) is None:
                raise ValueError(f"method {self.name} needs a {role} teacher")

    # --- helpers -------------------------------------------------------------------------------------
    def _teacher(self, role: str) -> nn.Module:
        teacher = getattr(self.teachers, role)
        assert teacher is not None, role  # __init__ checked that the roles this method needs are there
        return teacher

    def _counts(self, y: Tensor, adv_logits: Tensor | None, nat_logits: Tensor | None) -> dict[str, Tensor]:
        zero = torch.zeros((), device=y.device)
        n = torch.full((), float(y.shape[0]), device=y.device)
        ca = (adv_logits.argmax(1) == y).sum().float() if adv_logits is not None else zero
        cn = (nat_logits.argmax(1) == y).sum().float() if nat_logits is not None else zero
        return {"correct_adv": ca, "correct_nat": cn, "seen_adv": n if adv_logits is not None else zero,
                "seen_nat": n if nat_logits is not None else zero, "n": n}

    def _attack_ce(self, x: Tensor, y: Tensor, start: str = "gaussian") -> Tensor:
        a = self.cfg.attack
        with self.autocast():
            return attacks.pgd_ce(self.raw, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps, start=start,
                                  init_std=a.init_std, shard=self.shard)

    # --- interface -----------------------------------------------------------------------------------
    @abstractmethod
    def step(self, x: Tensor, y: Tensor) -> StepOutput:
        """One iteration on a batch: attack, passes, balance update; returns the loss and statistics."""

    def balance_report(self, tau: Tensor) -> dict[str, float]:
        """The balance's per-epoch description (see EntropyBalance.epoch_report); none without a balance."""
        return {}

    def decay(self, factor: float) -> None:  # noqa: B027 (a hook: a method without a balance has nothing to decay)
        """Called by the trainer at the start of every epoch with the schedule's multiplier."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (a hook: no balance, no state)
        """Restore what :meth:`state_dict` returned (the methods with a balance have state)."""


class BMTARD(Method):
    """Balanced multi-teacher distillation (docs/algorithm.md §2); ``ebb.enabled=False`` gives MTARD (§7.6)."""

    name = "bmtard"
    global_stats = True

    def __init__(self, *args: Any, ebb: EBBConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        device = next(self.raw.parameters()).device
        self.ebb = EntropyBalance(ebb or self.cfg.ebb, self.num_classes, device)
        self.nlb = LossBalance(self.cfg.nlb, device)

    def step(self, x: Tensor, y: Tensor) -> StepOutput:
        lc = self.cfg.loss
        # 1. Attack the student alone (eval-mode BN, CE on the true labels, Gaussian start).
        x_adv = self._attack_ce(x, y)
        # 2. Two separate train-mode student passes; frozen teachers under no_grad.
        self.model.train()
        with self.autocast():
            s_adv = self.model(x_adv)
            s_nat = self.model(x)
            with torch.no_grad():
                t_adv = self._teacher("robust")(x_adv)
                t_nat = self._teacher("clean")(x)
        # EBB solve mode (ours): this iteration's temperatures are solved on the global batch of teacher
        # logits (B x K each, so gathering them is cheap and the solver's loop needs no collective).
        if self.ebb.solves:
            k = t_adv.shape[1]
            rows, mask = self.gather_rows(torch.cat([t_adv.detach().float(), t_nat.detach().float()], dim=1))
            self.ebb.solve(rows[:, :k], rows[:, k:], mask)
        # 3. Losses at the temperatures from *before* this iteration's EBB step (step mode), or at the ones
        # just solved (solve mode).
        tau = self.ebb.tau.clone()
        l_adv, p_adv = distill_kl(t_adv, s_adv, tau[0], reduction=lc.reduction, log_eps=lc.log_eps)
        l_nat, p_nat = distill_kl(t_nat, s_nat, tau[1], reduction=lc.reduction, log_eps=lc.log_eps)
        l_adv, l_nat = l_adv * lc.scale, l_nat * lc.scale
        # Global-batch statistics: one all-reduce so every rank takes the same balance step, each rank's means
        # weighted by its example count (uneven shards).
        stats = self.reduce_mean(torch.stack([l_adv.detach(), l_nat.detach(), mean_entropy(p_adv),
                                              mean_entropy(p_nat)]),
                                 torch.full((), float(y.shape[0]), device=y.device))
        # 4. EBB step mode (affects the next iteration; a no-op in solve mode). 5. NLB (its new weights are used now).
        self.ebb.step(stats[2], stats[3])
        self.nlb.step(stats[0], stats[1])
        w_adv, w_nat = (w.clone() for w in self.nlb.weights())
        # 6. The loss to back-propagate; tau and w carry no gradient.
        loss = w_adv * l_adv + w_nat * l_nat
        global_loss = w_adv * stats[0] + w_nat * stats[1]
        named = {"loss": global_loss, "L_adv": stats[0], "L_nat": stats[1], "H_adv": stats[2], "H_nat": stats[3],
                 "tau_adv": tau[0], "tau_nat": tau[1], "w_adv": w_adv, "w_nat": w_nat}
        return StepOutput(loss, {k: v.detach() for k, v in named.items()},
                          self._counts(y, s_adv.detach(), s_nat.detach()))

    def balance_report(self, tau: Tensor) -> dict[str, float]:
        return self.ebb.epoch_report(tau)

    def decay(self, factor: float) -> None:
        self.ebb.decay(factor)
        self.nlb.decay(factor)

    def state_dict(self) -> dict[str, Any]:
        return {"ebb": self.ebb.state_dict(), "nlb": self.nlb.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ebb.load_state_dict(state["ebb"])
        self.nlb.load_state_dict(state["nlb"])


class MTARD(BMTARD):
    """The ECCV version: NLB on, temperatures fixed at 1 (no EBB)."""

    name = "mtard"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, ebb=EBBConfig(enabled=False, tau_adv_init=1.0, tau_nat_init=1.0), **kwargs)


class Natural(Method):
    """Cross-entropy on clean images (also trains the clean teacher)."""

    name = "natural"

    def step(self, x: Tensor, y: Tensor) -> StepOutput:
        self.model.train()
        with self.autocast():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        return StepOutput(loss, {"loss": loss.detach(), "L_nat": loss.detach()}, self._counts(y, None, logits.detach()))


class SAT(Method):
    """Madry PGD adversarial training: CE on PGD-10 examples with a uniform start."""

    name = "sat"

    def step(self, x: Tensor, y: Tensor) -> StepOutput:
        x_adv = self._attack_ce(x, y, start="uniform")
        self.model.train()
        with self.autocast():
            logits = self.model(x_adv)
        loss = F.cross_entropy(logits.float(), y)
        return StepOutput(loss, {"loss": loss.detach(), "L_adv": loss.detach()}, self._counts(y, logits.detach(), None))


class TRADES(Method):
    """CE(clean) + beta * KL(S(x) || S(x_adv)); the attack maximises that KL."""

    name = "trades"

    def step(self, x: Tensor, y: Tensor) -> StepOutput:
        a, m = self.cfg.attack, self.cfg.method
        with self.autocast():
            x_adv = attacks.pgd_trades(self.raw, x, eps=a.eps, step_size=m.trades_step_size, steps=a.steps,
                                       init_std=a.init_std, shard=self.shard)
        self.model.train()
        with self.autocast():
            s_nat = self.model(x)
            s_adv = self.model(x_adv)
        l_nat = F.cross_entropy(s_nat.float(), y)
        l_adv = kl_student_student(s_nat, s_adv)
        loss = l_nat + m.trades_beta * l_adv
        stats = {"loss": loss.detach(), "L_adv": l_adv.detach(), "L_nat": l_nat.detach()}
        return StepOutput(loss, stats, self._counts(y, s_adv.detach(), s_nat.detach()))


class ARD(Method):
    """alpha * T^2 * KL(T_robust(x)/T || S(x_adv)/T) + (1 - alpha) * CE(S(x), y); CE attack on the student."""

    name = "ard"

    def step(self, x: Tensor, y: Tensor) -> StepOutput:
        m, lc = self.cfg.method, self.cfg.loss
        x_adv = self._attack_ce(x, y)
        self.model.train()
        t = m.ard_temperature
        with self.autocast():
            s_adv = self.model(x_adv)
            s_nat = self.model(x) if m.ard_alpha < 1 else None
            with torch.no_grad():
                t_nat = self._teacher("robust")(x)
        p = F.softmax(t_nat.float() / t, dim=1)
        kl = reduce_elements(p * (torch.log(p.clamp_min(1e-12)) - F.log_softmax(s_adv.float() / t, dim=1)),
                             lc.reduction)
        l_adv = m.ard_alpha * t * t * kl
        l_nat = (1 - m.ard_alpha) * F.cross_entropy(s_nat.float(), y) if s_nat is not None else torch.zeros_like(l_adv)
        loss = l_adv + l_nat
        stats = {"loss": loss.detach(), "L_adv": l_adv.detach(), "L_nat": l_nat.detach()}
        return StepOutput(loss, stats, self._counts(y, s_adv.detach(), None if s_nat is None else s_nat.detach()))


class RSLAD(Method):
    """Robust teacher's soft labels on clean x as targets for S(x) (1/6) and S(x_adv) (5/6)."""

    name = "rslad"

    def step(self, x: Tensor, y: Tensor) -> StepOutput:
        a, m, lc = self.cfg.attack, self.cfg.method, self.cfg.loss
        with torch.no_grad(), self.autocast():
            t_nat = self._teacher("robust")(x)
        p = F.softmax(t_nat.float(), dim=1)
        with self.autocast():
            x_adv = attacks.pgd_soft_label(self.raw, x, p, eps=a.eps, step_size=a.step_size, steps=a.steps,
                                           init_std=a.init_std, shard=self.shard)
        self.model.train()
        with self.autocast():
            s_adv = self.model(x_adv)
            s_nat = self.model(x)
        l_adv, _ = distill_kl(t_nat, s_adv, 1.0, reduction=lc.reduction, log_eps=lc.log_eps)
        l_nat, _ = distill_kl(t_nat, s_nat, 1.0, reduction=lc.reduction, log_eps=lc.log_eps)
        loss = m.rslad_adv_weight * l_adv + m.rslad_nat_weight * l_nat
        stats = {"loss": loss.detach(), "L_adv": l_adv.detach(), "L_nat": l_nat.detach(),
                 "w_adv": torch.full_like(loss, m.rslad_adv_weight).detach(),
                 "w_nat": torch.full_like(loss, m.rslad_nat_weight).detach()}
        return StepOutput(loss, stats, self._counts(y, s_adv.detach(), s_nat.detach()))


METHODS: dict[str, type[Method]] = {t.name: t for t in (BMTARD, MTARD, Natural, SAT, TRADES, ARD, RSLAD)}
assert tuple(METHODS) == tuple(METHOD_TEACHERS)


def build_method(method: str, model: nn.Module, raw: nn.Module, cfg: RunConfig, teachers: Teachers, num_classes: int,
               **kwargs: Any) -> Method:
    return METHODS[method](model, raw, cfg, teachers, num_classes, **kwargs)
