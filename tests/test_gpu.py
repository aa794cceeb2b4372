"""The GPU fast path against the plain one, on CUDA (``gpu`` marker: skipped without a CUDA GPU).

``bench/device_check.py`` runs these on a lent GPU (see BENCHMARKS.md); each test records what it
measured (``record_property``), so the JUnit file it writes carries the numbers behind every verdict:

- bf16 autocast + channels_last follows the true-fp32 B-MTARD trajectory (tau within 5 EBB steps, w within
  the 0.01 of the CPU test in test_precision.py, late losses within 5 %);
- a channels_last step and a torch.compile'd step equal the eager contiguous step (fp32, TF32 off);
- the CUDA-resident loader gives exactly the CPU loader's batches for the same seed, crops included;
- the evaluation attacks' accuracies on CUDA equal the CPU's on the same images within 1 point;
- evaluation runs in true fp32 (TF32 off while evaluating, the caller's flags restored after).

With ``BMTARD_GPU_TESTS_ON_CPU=1`` (the device check's ``--dry-run``) they run on the CPU at small sizes,
with the ``aot_eager`` compile backend, so that CI keeps this file working while no GPU is available; the
comparisons are then CPU against CPU and prove only that the code runs.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from test_evaluation import synthetic
from test_precision import trajectory
from torch import nn

from bmtard_ray.config import EvalConfig, RunConfig
from bmtard_ray.data import BatchLoader, Split
from bmtard_ray.evaluation import evaluate
from bmtard_ray.evaluation.precision import tf32_flags, true_fp32
from bmtard_ray.models import build_model
from bmtard_ray.training.attacks import eval_mode
from bmtard_ray.training.methods import Teachers, build_method
from bmtard_ray.training.metrics import STAT_NAMES
from bmtard_ray.training.teachers import freeze

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("BMTARD_GPU_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
COMPILE_BACKEND = "aot_eager" if ON_CPU else "inductor"
ETA_TAU = RunConfig().ebb.eta_tau
SMALL = "tiny_cnn" if ON_CPU else "small_cnn"  # the step tests' networks (teachers always; students mostly)
N_STEPS, BATCH = (2, 8) if ON_CPU else (3, 32)


# --- bf16 autocast + channels_last vs true fp32: the B-MTARD trajectory -----------------------------------


def test_bf16_fast_path_follows_the_fp32_trajectory(record_property: Callable[[str, object], None]) -> None:
    steps = 4 if ON_CPU else 200
    with true_fp32():
        fp32 = trajectory(lambda: torch.autocast(DEVICE.type, enabled=False), device=DEVICE, steps=steps)
    bf16 = trajectory(lambda: torch.autocast(DEVICE.type, dtype=torch.bfloat16), device=DEVICE, channels_last=True,
                      steps=steps)
    col = {c: STAT_NAMES.index(c) for c in ("L_adv", "L_nat", "tau_adv", "tau_nat", "w_adv", "w_nat")}
    assert torch.isfinite(bf16).all()
    # The balance moved in fp32 (otherwise agreement would prove nothing); 200 steps move w by > 0.1.
    moved = (fp32[:, col["w_adv"]] - fp32[0, col["w_adv"]]).abs().max().item()
    record_property("w_adv_range_fp32", round(moved, 6))
    assert moved > (0.0 if ON_CPU else 0.1)
    assert (fp32[:, col["tau_adv"]] != fp32[0, col["tau_adv"]]).any() or \
        (fp32[:, col["tau_nat"]] != fp32[0, col["tau_nat"]]).any()
    for name, tol in (("w_adv", 0.01), ("w_nat", 0.01), ("tau_adv", 5 * ETA_TAU), ("tau_nat", 5 * ETA_TAU)):
        diff = (fp32[:, col[name]] - bf16[:, col[name]]).abs().max().item()
        record_property(f"{name}_max_diff", round(diff, 6))
        assert diff <= tol + 1e-7, f"{name}: bf16 differs from fp32 by {diff:.5f} (tolerance {tol})"
    tail = max(1, steps // 4)
    for name in ("L_adv", "L_nat"):
        a, b = fp32[-tail:, col[name]].mean().item(), bf16[-tail:, col[name]].mean().item()
        record_property(f"{name}_late_rel_diff", round(abs(a - b) / abs(a), 6))
        assert abs(a - b) <= 0.05 * abs(a), f"{name}: fp32 {a:.4f} vs bf16 {b:.4f}"
    assert (fp32[:, STAT_NAMES.index("H_adv")] != bf16[:, STAT_NAMES.index("H_adv")]).any()  # bf16 really ran


# --- channels_last and torch.compile vs the eager contiguous step --------------------------------------------


class Steps(NamedTuple):
    rows: torch.Tensor             # (n_steps, len(STAT_NAMES))
    params: list[torch.Tensor]     # after the steps
    initial: list[torch.Tensor]    # before them
    input_grad: torch.Tensor       # the attack's gradient (eval mode, CE summed) at the first batch


def _bmtard_steps(student_arch: str, *, attack_steps: int, channels_last: bool = False, compiled: bool = False,
                  n_steps: int = N_STEPS, batch: int = BATCH) -> Steps:
    """``n_steps`` B-MTARD steps in fp32 from fixed weights and batches, made on the CPU for every variant.

    The attack starts at x itself (init_std 0) so that every variant attacks from the same point: a
    Gaussian start drawn into a channels_last tensor would be another draw."""
    cfg = RunConfig()
    cfg.attack.steps = attack_steps
    cfg.attack.init_std = 0.0
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    student = build_model(student_arch, 10).to(DEVICE, memory_format=fmt)
    teachers = Teachers(clean=freeze(build_model(SMALL, 10).to(DEVICE, memory_format=fmt)),
                        robust=freeze(build_model(SMALL, 10).to(DEVICE, memory_format=fmt)))
    raw = model = student
    if compiled:  # as the Trainer does: the attack's and the training passes' wrappers, both compiled
        raw = torch.compile(student, backend=COMPILE_BACKEND)
        model = torch.compile(student, backend=COMPILE_BACKEND)
    task = build_method("bmtard", model, raw, cfg, teachers, 10)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    initial = [p.detach().cpu().clone() for p in student.parameters()]
    g = torch.Generator().manual_seed(1)
    data = torch.rand(n_steps * batch, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (n_steps * batch,), generator=g)
    batches = [(data[i * batch:(i + 1) * batch].to(DEVICE).contiguous(memory_format=fmt),
                labels[i * batch:(i + 1) * batch].to(DEVICE)) for i in range(n_steps)]
    x0 = batches[0][0].clone().requires_grad_(True)
    with eval_mode(student):
        (grad,) = torch.autograd.grad(F.cross_entropy(raw(x0), batches[0][1], reduction="sum"), [x0])
    rows = []
    for x, y in batches:
        out = task.step(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        rows.append(out.row().float().cpu())
    return Steps(torch.stack(rows), [p.detach().cpu() for p in student.parameters()], initial, grad.cpu())


def _compare(a: Steps, ref: Steps) -> dict[str, float]:
    losses = [STAT_NAMES.index(c) for c in ("loss", "L_adv", "L_nat", "H_adv", "H_nat")]
    w = [STAT_NAMES.index(c) for c in ("w_adv", "w_nat")]
    tau = [STAT_NAMES.index(c) for c in ("tau_adv", "tau_nat")]
    return {
        "loss_rel": ((a.rows[:, losses] - ref.rows[:, losses]).abs()
                     / ref.rows[:, losses].abs().clamp_min(1e-8)).max().item(),
        "w": (a.rows[:, w] - ref.rows[:, w]).abs().max().item(),
        "tau": (a.rows[:, tau] - ref.rows[:, tau]).abs().max().item(),
        # The parameters' change against the size of the update itself: the update's relative error.
        "update_rel": max((p - r).norm().item() / max((r - p0).norm().item(), 1e-12)
                          for p, r, p0 in zip(a.params, ref.params, ref.initial, strict=False)),
        "grad_rel": ((a.input_grad - ref.input_grad).norm() / ref.input_grad.norm()).item(),
    }


def _assert_same_steps(name: str, arch: str, variant: dict[str, Any],
                       record_property: Callable[[str, object], None]) -> None:
    """The step of ``arch`` with ``variant`` (keywords of _bmtard_steps) against the eager contiguous step.

    Two comparisons, because PGD's sign(grad) is discontinuous: a pixel whose gradient is within rounding
    of 0 may step the other way, and a few such pixels move L_adv by ~1e-3 and the update by a few %
    (measured on the CPU for channels_last vs contiguous: 1.3e-3 and 5 % at the third step) without
    anything being wrong. So (1) without the attack's steps every pass, loss, balance step and update must
    agree tightly, and the attack's input gradient too; (2) with the PGD-5 attack the step must agree
    within what sign flips explain."""
    checks = ((0, {"loss_rel": 1e-4, "w": 1e-5, "tau": ETA_TAU + 1e-7, "update_rel": 1e-3, "grad_rel": 1e-4}),
              (5, {"loss_rel": 2e-2, "w": 1e-3, "tau": ETA_TAU + 1e-7, "update_rel": 0.25, "grad_rel": 1e-4}))
    for attack_steps, tol in checks[:1] if ON_CPU else checks:  # the dry run: the code path, once
        ref = _bmtard_steps(arch, attack_steps=attack_steps)
        got = _compare(_bmtard_steps(arch, attack_steps=attack_steps, **variant), ref)
        for key, value in got.items():
            record_property(f"{name}_pgd{attack_steps}_{key}", f"{value:.3g}")
        for key, value in got.items():
            assert value <= tol[key], f"{name}, PGD-{attack_steps}: {key} {value:.3g} > {tol[key]:.3g}"


@pytest.mark.parametrize("arch", ["small", "resnet18"])
def test_channels_last_step_equals_the_contiguous_step(arch: str,
                                                       record_property: Callable[[str, object], None]) -> None:
    if ON_CPU and arch == "resnet18":
        pytest.skip("resnet18 is for the GPU; the dry run keeps to a tiny CNN")
    arch = SMALL if arch == "small" else arch
    with true_fp32():
        _assert_same_steps(f"channels_last_{arch}", arch, {"channels_last": True}, record_property)


def test_compiled_step_equals_the_eager_step(record_property: Callable[[str, object], None]) -> None:
    with true_fp32():
        _assert_same_steps(f"compiled_{COMPILE_BACKEND}_{SMALL}", SMALL, {"compiled": True}, record_property)


# --- the device-resident loader ------------------------------------------------------------------------------


@pytest.mark.parametrize("rank,world_size,drop_last", [(0, 1, False), (1, 2, True)])
def test_device_loader_gives_the_cpu_loaders_batches(rank: int, world_size: int, drop_last: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n = 300
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n))
    kwargs = dict(shuffle=True, augment=True, seed=7, rank=rank, world_size=world_size, drop_last=drop_last)
    cpu = BatchLoader(split, 64, **kwargs)
    dev = BatchLoader(split, 64, device=DEVICE, channels_last=True, **kwargs)
    for epoch in (1, 2):
        cpu.set_epoch(epoch)
        dev.set_epoch(epoch)
        a, b = list(cpu), list(dev)
        assert len(a) == len(b) == len(cpu)
        for (xa, ya), (xb, yb) in zip(a, b, strict=False):
            assert xb.device.type == DEVICE.type and xb.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(ya, yb.cpu())
            assert torch.equal(xa, xb.cpu())  # crops, flips and the uint8 -> float conversion, bit for bit


# --- evaluation: CUDA vs CPU, and true fp32 ------------------------------------------------------------------


def _trained_tiny(steps: int) -> nn.Module:
    """A tiny CNN fitted on the CPU to the synthetic template task of test_evaluation (clean acc ~100 %)."""
    torch.manual_seed(0)
    train = synthetic(2000, seed=1)
    model = build_model("tiny_cnn", 10)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(train), (128,), generator=g)
        loss = F.cross_entropy(model(train.images[idx].float() / 255), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_evaluation_attacks_on_cuda_equal_the_cpus(record_property: Callable[[str, object], None]) -> None:
    # eps 5/255: on this task accuracies are intermediate there (measured on the CPU, 512 images: FGSM 77 %,
    # PGD-20 57 %), so a difference would show; at 8/255 every attack is near 0 %.
    model = _trained_tiny(10 if ON_CPU else 120)
    source = _trained_tiny(5 if ON_CPU else 60)  # another model for the black-box transfers
    split = synthetic(16 if ON_CPU else 512, seed=2)
    cfg = EvalConfig(attacks=("clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "bb_pgd", "bb_cw"), eps=5 / 255,
                     batch_size=256, seed=0)
    on_cpu = evaluate(model, split, cfg, device="cpu", source_model=source)
    on_dev = evaluate(model.to(DEVICE), split, cfg, device=DEVICE, source_model=source.to(DEVICE))
    for name, acc in on_cpu.accuracy.items():
        record_property(f"{name}_cpu_vs_device", f"{acc:.2f} vs {on_dev.accuracy[name]:.2f}")
    assert 0 < on_cpu.accuracy["pgd_sat"] < 100 or ON_CPU  # intermediate, so the comparison means something
    for name, acc in on_cpu.accuracy.items():
        # 1 point: 5 of 512 images may flip where fp32 rounding differs between the CPU and the GPU.
        assert abs(acc - on_dev.accuracy[name]) <= 1.0, \
            f"{name}: CPU {acc:.2f} vs {DEVICE.type} {on_dev.accuracy[name]:.2f}"


class _Probe(nn.Module):
    """A wide conv and a linear layer that measure, on every forward, their own error against float64 on
    the CPU and the TF32 flags they ran under."""

    def __init__(self, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * 8 * 8, 10)
        self.errors: list[float] = []
        self.flags: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        out = self.fc(F.avg_pool2d(self.conv2(h), 2).flatten(1))
        with torch.no_grad():
            h64 = F.relu(F.conv2d(x.cpu().double(), self.conv.weight.cpu().double(), self.conv.bias.cpu().double(),
                                  padding=1))
            c64 = F.conv2d(h64, self.conv2.weight.cpu().double(), self.conv2.bias.cpu().double(), padding=1)
            ref = F.linear(F.avg_pool2d(c64, 2).flatten(1), self.fc.weight.cpu().double(), self.fc.bias.cpu().double())
            self.errors.append(((out.detach().cpu().double() - ref).norm() / ref.norm()).item())
        self.flags.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return out


def test_evaluation_runs_in_true_fp32_and_restores_the_flags(record_property: Callable[[str, object], None]) -> None:
    probe = _Probe(32 if ON_CPU else 256).to(DEVICE)  # wide on the GPU: long sums show TF32's rounding
    split = synthetic(16, seed=3)
    before = tf32_flags()
    torch.backends.cudnn.allow_tf32 = True  # what a fast-path training loop may run under
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.no_grad():  # the same layers outside evaluation, TF32 allowed: the error the test must catch
            probe(split.images.to(DEVICE).float() / 255)
        outside = probe.errors.pop()
        probe.flags.pop()
        evaluate(probe, split, EvalConfig(attacks=("clean",), batch_size=16), device=DEVICE)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored
    finally:
        torch.set_float32_matmul_precision(before.matmul_precision)
        torch.backends.cuda.matmul.allow_tf32 = before.matmul_allow_tf32
        torch.backends.cudnn.allow_tf32 = before.cudnn_allow_tf32
    inside = max(probe.errors)
    record_property("rel_error_evaluating", f"{inside:.3g}")
    record_property("rel_error_tf32_allowed_outside", f"{outside:.3g}")
    assert probe.flags and all(f == (False, False) for f in probe.flags)
    # float32 lands near 1e-7 here; TF32 (10 mantissa bits) near 3e-4.
    assert inside <= 3e-5, f"evaluation's relative error {inside:.3g} is TF32's, not float32's"
