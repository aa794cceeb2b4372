"""Every rule of docs/algorithm.md §2 (one B-MTARD iteration) and the schedule of §4.1 has a test here that fails
if the rule is changed."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bmtard_ray.config import EBBConfig, NLBConfig, RunConfig
from bmtard_ray.training import attacks
from bmtard_ray.training.balance import EntropyBalance, LossBalance
from bmtard_ray.training.losses import distill_kl, mean_entropy
from bmtard_ray.training.methods import METHODS, Teachers, build_method
from bmtard_ray.training.metrics import STAT_NAMES
from bmtard_ray.training.teachers import freeze
from bmtard_ray.training.trainer import schedule_factor  # noqa: E402

K = 10


def tiny(seed: int = 0, k: int = K) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, k))


def batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, K, (n,), generator=g)


class Recorder(nn.Module):
    """A frozen stand-in teacher that remembers what it was shown."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


# ---------------------------------------------------------------------------------------------------------
# §1.1 the attack


def test_attack_starts_from_gaussian_noise_of_std_0001() -> None:
    x = torch.full((64, 3, 16, 16), 0.5)
    model = tiny()
    torch.manual_seed(0)
    x0 = attacks.perturb(model, x, lambda z: z.sum(), eps=8 / 255, step_size=2 / 255, steps=0)
    noise = (x0 - x).flatten()
    assert noise.std().item() == pytest.approx(0.001, rel=0.05)
    # Gaussian, not uniform: a uniform start of the same std would have excess kurtosis -1.2, not 0.
    kurt = ((noise - noise.mean()) ** 4).mean() / noise.var() ** 2 - 3
    assert abs(kurt.item()) < 0.3
    torch.manual_seed(0)
    assert torch.equal(x0, x + 0.001 * torch.randn_like(x))


def test_sat_uniform_start_is_clamped_to_the_unit_box_before_the_first_gradient() -> None:
    x = torch.cat([torch.zeros(8, 3, 8, 8), torch.ones(8, 3, 8, 8), torch.full((8, 3, 8, 8), 0.5)])
    eps = 8 / 255
    model, seen = tiny(), Recorder(tiny())
    torch.manual_seed(0)
    x0 = attacks.perturb(model, x, lambda z: z.sum(), eps=eps, step_size=2 / 255, steps=0, start="uniform")
    assert x0.min().item() == 0.0 and x0.max().item() == 1.0
    assert (x0[:8] > 0).any() and (x0[8:16] < 1).any()  # the noise is there, only cut at the box
    torch.manual_seed(0)
    assert torch.equal(x0, (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1))
    # What the model sees at the first (and only) gradient step is the clamped start.
    torch.manual_seed(0)
    attacks.pgd_ce(seen, x, torch.zeros(24, dtype=torch.long), eps=eps, step_size=2 / 255, steps=1, start="uniform")
    assert len(seen.seen) == 1 and torch.equal(seen.seen[0], x0)


def test_attack_projects_to_eps_ball_and_unit_box_each_step() -> None:
    model = tiny()
    x, y = batch()
    x[0] = 0.0  # corners of the box must clamp
    x[1] = 1.0
    eps = 8 / 255
    for steps in (1, 3, 10):
        x_adv = attacks.pgd_ce(model, x, y, eps=eps, step_size=2 / 255, steps=steps)
        assert (x_adv - x).abs().max().item() <= eps + 1e-6
        assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    # A huge step shows the projection happens every step: the result sits on the ball's surface.
    x_adv = attacks.pgd_ce(model, x.clamp(0.1, 0.9), y, eps=eps, step_size=1.0, steps=1, init_std=0)
    assert torch.allclose((x_adv - x.clamp(0.1, 0.9)).abs(), torch.full_like(x, eps), atol=1e-6)


def test_attack_maximises_ce_in_eval_mode_and_leaves_bn_and_params_alone() -> None:
    model = tiny()
    model.train()
    x, y = batch()
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x_adv = attacks.pgd_ce(model, x, y, eps=8 / 255, step_size=2 / 255, steps=1, init_std=0.0)
    # Mode restored, BN statistics untouched, no parameter gradient.
    assert model.training
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    assert all(p.grad is None for p in model.parameters())
    # The step is the sign of the eval-mode CE gradient w.r.t. the input (train-mode BN gives another one).
    def one_step(train_mode: bool) -> torch.Tensor:
        model.train(train_mode)
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y, reduction="sum"), [xi])
        model.train()
        return (x + 2 / 255 * g.sign()).clamp(0, 1)
    expected = one_step(train_mode=False)
    assert torch.allclose(x_adv, expected, atol=1e-6)
    assert not torch.allclose(one_step(train_mode=True), expected)


def test_attack_raises_the_students_loss() -> None:
    model = tiny()
    x, y = batch(64)
    model.eval()
    x_adv = attacks.pgd_ce(model, x, y, eps=8 / 255, step_size=2 / 255, steps=10)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


# ---------------------------------------------------------------------------------------------------------
# §1.3 the losses


def test_kl_has_temperature_on_teacher_only_no_t2_and_elementwise_mean() -> None:
    torch.manual_seed(0)
    t, s = torch.randn(5, K) * 3, torch.randn(5, K)
    tau = 2.5
    loss, p = distill_kl(t, s, tau)
    p_hand = torch.softmax(t / tau, 1)
    hand = (p_hand * (torch.log(p_hand + 1e-5) - torch.log_softmax(s, 1))).sum() / (5 * K)
    assert torch.allclose(p, p_hand)
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    # Not the student at temperature tau, not multiplied by tau^2, not the reverse direction.
    wrong_student = (p_hand * (torch.log(p_hand + 1e-5) - torch.log_softmax(s / tau, 1))).sum() / (5 * K)
    assert loss.item() != pytest.approx(wrong_student.item(), rel=1e-3)
    assert loss.item() != pytest.approx(tau ** 2 * hand.item(), rel=1e-3)
    q = torch.softmax(s, 1)
    reverse = (q * (torch.log(q) - torch.log(p_hand))).sum() / (5 * K)
    assert loss.item() != pytest.approx(reverse.item(), rel=1e-3)
    # Other reductions, and the teacher side carries no gradient.
    assert distill_kl(t, s, tau, reduction="batchmean")[0].item() == pytest.approx(hand.item() * K, rel=1e-6)
    t.requires_grad_(True)
    s.requires_grad_(True)
    distill_kl(t, s, tau)[0].backward()
    assert t.grad is None and s.grad is not None


def test_entropy_matches_hand_computation() -> None:
    p = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert mean_entropy(p).item() == pytest.approx((math.log(2) + math.log(3)) / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# §1.4 EBB


def test_ebb_sharpens_the_higher_entropy_teacher_and_softens_the_other_within_bounds() -> None:
    ebb = EntropyBalance(EBBConfig(tau_adv_init=2.0, tau_nat_init=2.0, eta_tau=0.1), K)
    ebb.step(torch.tensor(2.0), torch.tensor(1.0))  # robust teacher's entropy is higher
    assert ebb.tau.tolist() == pytest.approx([1.9, 2.1])
    ebb.step(torch.tensor(1.0), torch.tensor(2.0))
    assert ebb.tau.tolist() == pytest.approx([2.0, 2.0])
    ebb.step(torch.tensor(1.5), torch.tensor(1.5))  # equal: sign(0) = 0, no move
    assert ebb.tau.tolist() == pytest.approx([2.0, 2.0])
    # Bounds: from the floor (released start) only the lower-entropy teacher's temperature rises.
    ebb = EntropyBalance(EBBConfig(eta_tau=0.5, tau_max=1.6), K)
    for _ in range(3):
        ebb.step(torch.tensor(2.0), torch.tensor(1.0))
    assert ebb.tau.tolist() == pytest.approx([1.0, 1.6])


def test_ebb_target_entropy_absolute_and_fraction() -> None:
    ebb = EntropyBalance(EBBConfig(tau_adv_init=2, tau_nat_init=2, eta_tau=0.1, target_entropy=1.0), K)
    ebb.step(torch.tensor(1.5), torch.tensor(0.5))  # both pulled toward H* = 1
    assert ebb.tau.tolist() == pytest.approx([1.9, 2.1])
    frac = EntropyBalance(EBBConfig(target_entropy=0.5, target_mode="fraction"), K)
    assert frac.target == pytest.approx(0.5 * math.log(K))
    off = EntropyBalance(EBBConfig(enabled=False, tau_adv_init=3, tau_nat_init=3), K)
    off.step(torch.tensor(2.0), torch.tensor(1.0))
    assert off.tau.tolist() == [3.0, 3.0]


# ---------------------------------------------------------------------------------------------------------
# §1.5 NLB


def test_nlb_reference_is_the_first_iteration_and_rule_matches_hand() -> None:
    nlb = LossBalance(NLBConfig(rho=0.5, beta=2.0))
    nlb.step(torch.tensor(4.0), torch.tensor(2.0))
    assert nlb.w_adv.item() == pytest.approx(0.5)  # r = (1, 1) at the first iteration
    nlb.step(torch.tensor(2.0), torch.tensor(0.5))  # r = (0.5, 0.25) against the FIRST losses
    q = 0.5 ** 2 / (0.5 ** 2 + 0.25 ** 2)
    assert nlb.w_adv.item() == pytest.approx(0.5 * 0.5 + 0.5 * q)
    w_adv, w_nat = nlb.weights()
    assert (w_adv + w_nat).item() == pytest.approx(1.0)
    assert nlb.reference.tolist() == [4.0, 2.0]


def test_nlb_reference_window_holds_the_weights_until_the_mean_of_the_first_n_is_complete() -> None:
    rho, init = 0.5, 0.25  # 0.25: exact in float32, so "held" can be checked with ==
    nlb = LossBalance(NLBConfig(ref_window=3, rho=rho, w_adv_init=init))
    losses = [(4.0, 2.0), (2.0, 4.0), (3.0, 6.0), (1.0, 3.0), (0.5, 0.5)]
    ref = (3.0, 4.0)  # mean of the first three iterations
    expected, w = [], init
    for i, (la, ln) in enumerate(losses, start=1):
        if i >= 3:  # iteration 3 completes the reference and takes the first update against it
            ra, rn = la / ref[0], ln / ref[1]
            w = (1 - rho) * w + rho * ra / (ra + rn)
        expected.append(w)
    got = []
    for i, (la, ln) in enumerate(losses, start=1):
        nlb.step(torch.tensor(la), torch.tensor(ln))
        got.append(nlb.w_adv.item())
        if i < 3:
            assert nlb.w_adv.item() == init  # held exactly: no update against a partial mean
    assert got == pytest.approx(expected, rel=1e-6)
    assert nlb.reference.tolist() == pytest.approx(list(ref))
    assert got[2] != pytest.approx(init)  # the rule does act once the window is full
    # Window 1 is the released rule: the first iteration updates with r = (1, 1).
    one = LossBalance(NLBConfig(ref_window=1, rho=rho, w_adv_init=init))
    one.step(torch.tensor(4.0), torch.tensor(2.0))
    assert one.w_adv.item() == pytest.approx((1 - rho) * init + rho * 0.5)


def test_nlb_window_state_survives_a_checkpoint_mid_window() -> None:
    a = LossBalance(NLBConfig(ref_window=3, rho=0.5, w_adv_init=0.3))
    a.step(torch.tensor(4.0), torch.tensor(2.0))
    b = LossBalance(NLBConfig(ref_window=3, rho=0.5, w_adv_init=0.3))
    b.load_state_dict(a.state_dict())
    for la, ln in ((2.0, 4.0), (3.0, 6.0), (1.0, 3.0)):
        a.step(torch.tensor(la), torch.tensor(ln))
        b.step(torch.tensor(la), torch.tensor(ln))
        assert a.w_adv.item() == b.w_adv.item()


# ---------------------------------------------------------------------------------------------------------
# The B-MTARD step as a whole: order of updates, who sees what, two passes.


def make_bmtard(cfg: RunConfig | None = None, method: str = "bmtard"):
    cfg = cfg or RunConfig()
    student = tiny(0)
    robust, clean = Recorder(freeze(tiny(1))), Recorder(freeze(tiny(2)))
    task = build_method(method, student, student, cfg, Teachers(clean=clean, robust=robust), K)
    return task, student, robust, clean


def test_bmtard_step_teachers_see_the_right_batches_and_student_makes_two_train_passes() -> None:
    task, student, robust, clean = make_bmtard()
    x, y = batch()
    bn = student[1]
    n0 = int(bn.num_batches_tracked)
    out = task.step(x, y)
    assert int(bn.num_batches_tracked) == n0 + 2  # two separate train-mode passes (x_adv, then x)
    assert len(robust.seen) == 1 and len(clean.seen) == 1
    assert torch.equal(clean.seen[0], x)
    x_adv = robust.seen[0]
    assert not torch.equal(x_adv, x) and (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert out.loss.requires_grad and all(p.grad is None for p in student.parameters())
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in robust.parameters())


def test_bmtard_losses_use_tau_before_and_weights_after_the_update() -> None:
    cfg = RunConfig()
    cfg.ebb.eta_tau = 0.5
    cfg.nlb.rho = 0.5
    task, student, robust, clean = make_bmtard(cfg)
    x, y = batch()
    outs = []
    for _ in range(3):
        torch.manual_seed(5)
        outs.append(task.step(x, y))
        task.model.zero_grad()
    cols = {c: i for i, c in enumerate(STAT_NAMES)}
    r0, r1, r2 = (o.row() for o in outs)
    # Iteration 1: temperatures at their start, weights after an update with r = (1, 1).
    assert r0[cols["tau_adv"]].item() == 1.0 and r0[cols["tau_nat"]].item() == 1.0
    assert r0[cols["w_adv"]].item() == pytest.approx(0.5)
    # EBB step from iteration 1's entropies shows up in iteration 2's temperatures.
    h_adv, h_nat = r0[cols["H_adv"]].item(), r0[cols["H_nat"]].item()
    expect = [min(max(1.0 - 0.5 * math.copysign(1, h_adv / h_nat - 1), 1), 10),
              min(max(1.0 - 0.5 * math.copysign(1, h_nat / h_adv - 1), 1), 10)]
    assert [r1[cols["tau_adv"]].item(), r1[cols["tau_nat"]].item()] == pytest.approx(expect)
    assert sorted(expect) == [1.0, 1.5]  # from the floor only the lower-entropy teacher softens
    # Iteration 2's weights are the update with iteration 2's losses relative to iteration 1's.
    ra = r1[cols["L_adv"]].item() / r0[cols["L_adv"]].item()
    rn = r1[cols["L_nat"]].item() / r0[cols["L_nat"]].item()
    w1 = 0.5 * 0.5 + 0.5 * ra / (ra + rn)
    assert r1[cols["w_adv"]].item() == pytest.approx(w1, rel=1e-5)
    # ... and the loss of iteration 3 is computed with them: loss = w_adv L_adv + w_nat L_nat.
    assert r2[cols["loss"]].item() == pytest.approx(
        r2[cols["w_adv"]].item() * r2[cols["L_adv"]].item() + r2[cols["w_nat"]].item() * r2[cols["L_nat"]].item(),
        rel=1e-5)
    # The losses of iteration 2 were computed at iteration 2's (pre-update) temperatures, not iteration 3's.
    student.train()
    with torch.no_grad():
        t_adv, s_adv = robust.inner(robust.seen[1]), student(robust.seen[1])
        t_nat, s_nat = clean.inner(x), student(x)
    for name, t, s in (("adv", t_adv, s_adv), ("nat", t_nat, s_nat)):
        tau_now, tau_next = r1[cols[f"tau_{name}"]].item(), r2[cols[f"tau_{name}"]].item()
        got = r1[cols[f"L_{name}"]].item()
        assert got == pytest.approx(distill_kl(t, s, tau_now)[0].item(), rel=1e-5)
        if tau_now != tau_next:
            assert got != pytest.approx(distill_kl(t, s, tau_next)[0].item(), rel=1e-4)
    assert (r1[cols["tau_adv"]].item() != r2[cols["tau_adv"]].item()
            or r1[cols["tau_nat"]].item() != r2[cols["tau_nat"]].item())


def test_bmtard_loss_is_weighted_sum_with_no_hard_label_term() -> None:
    task, student, robust, clean = make_bmtard()
    x, y = batch()
    torch.manual_seed(3)
    x_adv = attacks.pgd_ce(student, x, y, eps=8 / 255, step_size=2 / 255, steps=10)
    torch.manual_seed(3)
    out = task.step(x, y)
    student.train()
    l_adv, _ = distill_kl(robust.inner(x_adv), student(x_adv), 1.0)
    l_nat, _ = distill_kl(clean.inner(x), student(x), 1.0)
    assert out.loss.item() == pytest.approx((0.5 * l_adv + 0.5 * l_nat).item(), rel=1e-5)
    # The robust teacher saw exactly the student's adversarial batch.
    assert torch.equal(robust.seen[0], x_adv)


def test_mtard_keeps_temperatures_at_one() -> None:
    cfg = RunConfig()
    cfg.ebb.eta_tau = 0.5
    task, *_ = make_bmtard(cfg, method="mtard")
    x, y = batch()
    for _ in range(3):
        out = task.step(x, y)
    cols = {c: i for i, c in enumerate(STAT_NAMES)}
    assert out.row()[cols["tau_adv"]].item() == 1.0 and out.row()[cols["tau_nat"]].item() == 1.0


def test_schedule_decays_lr_eta_and_rho_together_after_the_milestone_epochs() -> None:
    # The released loop decays at the END of epochs 215, 260 and 285: each milestone epoch still trains at
    # the old rate, the next one is the first at the new rate. A shift by one epoch either way fails here.
    ms = (215, 260, 285)
    factors = {e: schedule_factor(e, ms, 0.1) for e in range(1, 301)}
    assert all(factors[e] == 1 for e in range(1, 216))
    assert all(factors[e] == pytest.approx(0.1) for e in range(216, 261))
    assert all(factors[e] == pytest.approx(0.01) for e in range(261, 286))
    assert all(factors[e] == pytest.approx(0.001) for e in range(286, 301))
    assert schedule_factor(5, (4,), 0.1) == pytest.approx(0.1) and schedule_factor(4, (4,), 0.1) == 1  # cpu preset
    task, *_ = make_bmtard()
    task.decay(0.1)
    assert task.ebb.eta == pytest.approx(0.0001) and task.nlb.rho == pytest.approx(0.0025)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_finite_loss_and_moves_the_student(method: str) -> None:
    cfg = RunConfig()
    cfg.method.name = method
    cfg.method.ard_alpha = 0.9
    task, student, *_ = make_bmtard(cfg, method=method)
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x, y = batch()
    out = task.step(x, y)
    assert torch.isfinite(out.loss)
    assert out.row().shape == (len(STAT_NAMES),)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=False))
