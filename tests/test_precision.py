"""Issue 6, what a CPU can check: the fast path's bf16 autocast keeps B-MTARD's losses and EBB/NLB
trajectories close to the fp32 path's over a few hundred steps.

On GPUs the fast path runs the attack and both training passes under bf16 autocast (device.autocast_for);
the engine takes that context as an argument, so the same engine runs here under CPU bf16 autocast. The
check is on the *trajectories* (tau, w, L_adv, L_nat), which is what could silently drift: EBB takes the
sign of an entropy difference every step, and NLB's weights integrate loss ratios.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bmtard_ray.config import RunConfig, build_config
from bmtard_ray.data import DataBundle, DatasetInfo, Split
from bmtard_ray.models import build_model
from bmtard_ray.training.methods import Teachers, build_method
from bmtard_ray.training.metrics import STAT_NAMES
from bmtard_ray.training.teachers import freeze
from bmtard_ray.training.trainer import Trainer

STEPS = 200
K = 10


def net(seed: int, sharpness: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, K))
    with torch.no_grad():  # a random network is near-uniform; teachers need confident, differing outputs
        model[-1].weight.mul_(sharpness)
    return model


def trajectory(autocast: object, *, device: torch.device | str = "cpu", channels_last: bool = False,
               steps: int = STEPS) -> torch.Tensor:
    """``steps`` B-MTARD steps of a small student on a fixed stream of batches; rows of STAT_NAMES (on the
    CPU). The networks and data are made on the CPU, so every device starts from the same numbers;
    ``channels_last`` puts the networks and batches in that memory format (the GPU fast path does)."""
    cfg = RunConfig()
    cfg.attack.steps = 3
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student = net(0).to(device, memory_format=fmt)
    teachers = Teachers(clean=freeze(net(1, 60.0).to(device, memory_format=fmt)),
                        robust=freeze(net(2, 20.0).to(device, memory_format=fmt)))
    task = build_method("bmtard", student, student, cfg, teachers, K, autocast=autocast)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    data = torch.rand(256, 3, 16, 16, generator=g).to(device)
    labels = torch.randint(0, K, (256,), generator=g).to(device)
    torch.manual_seed(4)  # the attack's Gaussian start
    rows = []
    for i in range(steps):
        idx = torch.arange(i * 32, i * 32 + 32, device=device) % 256
        out = task.step(data[idx].contiguous(memory_format=fmt), labels[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        rows.append(out.row().float())
    return torch.stack(rows).cpu()


def assert_follows(ref: torch.Tensor, other: torch.Tensor, label: str, *, balance_tol: float, loss_rtol: float) -> None:
    """``other``'s tau and w within ``balance_tol`` of ``ref``'s at every step, and its last-50-step mean
    losses within ``loss_rtol`` (relative)."""
    col = {c: STAT_NAMES.index(c) for c in STAT_NAMES}
    for name in ("w_adv", "w_nat", "tau_adv", "tau_nat"):
        diff = (ref[:, col[name]] - other[:, col[name]]).abs().max().item()
        assert diff <= balance_tol, f"{name}: {label} differs from the reference by {diff:.5f}"
    for name in ("L_adv", "L_nat"):
        a, b = ref[-50:, col[name]].mean().item(), other[-50:, col[name]].mean().item()
        assert abs(a - b) <= loss_rtol * abs(a), f"{name}: reference {a:.5f} vs {label} {b:.5f}"


def test_bf16_autocast_follows_the_fp32_trajectory() -> None:
    torch.set_num_threads(2)
    fp32 = trajectory(lambda: torch.autocast("cpu", enabled=False))
    bf16 = trajectory(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    col = {c: STAT_NAMES.index(c) for c in ("L_adv", "L_nat", "tau_adv", "tau_nat", "w_adv", "w_nat")}
    assert torch.isfinite(bf16).all()
    # The balance moved in fp32 (otherwise agreement would prove nothing).
    assert (fp32[:, col["w_adv"]] - fp32[0, col["w_adv"]]).abs().max() > 0.1
    assert (fp32[:, col["tau_adv"]] != fp32[0, col["tau_adv"]]).any() or \
        (fp32[:, col["tau_nat"]] != fp32[0, col["tau_nat"]]).any()
    # Measured (200 steps, torch 2.14 CPU): w moves over 0.44..0.67 and bf16 stays within 3e-4 of it, tau_nat
    # moves 1.0..1.2 with every sign step identical, the last-50-step mean losses agree to 4 digits.
    # Tolerances: w 0.01, tau 0.01 (ten disagreeing EBB sign steps of eta_tau = 0.001), losses 5%.
    assert_follows(fp32, bf16, "bf16", balance_tol=0.01, loss_rtol=0.05)
    # And bf16 really ran: the entropies differ in their low digits.
    assert (fp32[:, STAT_NAMES.index("H_adv")] != bf16[:, STAT_NAMES.index("H_adv")]).any()


def test_channels_last_on_cpu_follows_the_contiguous_trajectory() -> None:
    """The CPU fast path (``fast: true``) runs the networks in channels_last; oneDNN then sums in another
    order, so the numbers may move in their last bits but the trajectory must not."""
    torch.set_num_threads(2)
    plain = trajectory(lambda: torch.autocast("cpu", enabled=False))
    cl = trajectory(lambda: torch.autocast("cpu", enabled=False), channels_last=True)
    col = {c: STAT_NAMES.index(c) for c in STAT_NAMES}
    assert torch.isfinite(cl).all()
    assert (plain[:, col["w_adv"]] - plain[0, col["w_adv"]]).abs().max() > 0.1  # the balance moved
    # Measured (200 steps, torch 2.14 CPU): w within 2e-5, every EBB sign step identical, the last-50-step mean
    # losses to 4 digits.
    # Tolerances as for bf16 above but ten times tighter: fp32 in either layout.
    assert_follows(plain, cl, "channels_last", balance_tol=0.001, loss_rtol=0.005)


def test_fast_trainer_on_cpu_runs_channels_last(tmp_path: Path) -> None:
    """``fast: true`` is the CPU default: the student, both teachers and the loader's batches are channels_last
    (the measured CPU speed-up); ``fast: false`` keeps the plain contiguous path; neither autocasts on CPU."""
    for fast in (True, False):
        trainer = _tiny_trainer(tmp_path / str(fast), fast)
        fmt = torch.channels_last if fast else torch.contiguous_format
        convs = [m.weight for net in (trainer.student, trainer.teachers.clean, trainer.teachers.robust)
                 for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=fmt) for w in convs)
        x, _ = next(iter(trainer.loader))
        assert x.is_contiguous(memory_format=fmt) and x.dtype == torch.float32
        assert not trainer.fast  # bf16 autocast stays off on the CPU


def _tiny_trainer(folder: Path, fast: bool) -> Trainer:
    folder.mkdir(parents=True)
    overrides = ["student=tiny_cnn", "attack.steps=1", "optim.batch_size=8", "optim.epochs=1", "val_every=0",
                 "checkpoint_every=0", f"output_dir={folder}", f"fast={fast}", "device=cpu"]
    for role in ("clean", "robust"):
        torch.save(build_model("tiny_cnn", K).state_dict(), folder / f"{role}.pt")
        overrides += [f"teachers.{role}.arch=tiny_cnn", f"teachers.{role}.checkpoint={folder / f'{role}.pt'}"]
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % K)

    info = DatasetInfo("cifar10", K, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return Trainer(build_config("smoke", overrides=overrides), data=DataBundle(split(32), split(8), split(8), info),
                   device=torch.device("cpu"))
