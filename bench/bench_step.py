#!/usr/bin/env python
"""Images/s of one B-MTARD training step: the released code's way (reference) vs our fast path.

Reference mode = fp32, eager, a CPU DataLoader with worker processes and a host copy per step, and a
per-step ``.item()`` (what the paper's scripts do). Fast mode = the uint8 dataset resident on the device and
augmented there, bf16 autocast with channels_last on GPU, optional torch.compile, one host sync per epoch.
Both run the same engine on the same machine, in one invocation, so the ratio is a like-for-like figure.

    python bench/bench_step.py --config cpu              # CPU: small models (what CI-class machines can run)
    python bench/bench_step.py --config paper --compile  # GPU: ResNet-18 / WRN-34-10 / ResNet-56, and MobileNetV2
    python bench/bench_step.py ... --write BENCHMARKS.md  # append the table to BENCHMARKS.md

Prints a table; never asserts a time. Teachers are randomly initialised (speed does not depend on weights).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bmtard_ray.config import RunConfig, build_config  # noqa: E402
from bmtard_ray.data import Split  # noqa: E402
from bmtard_ray.data import DataBundle  # noqa: E402
from bmtard_ray.loop import Trainer  # noqa: E402
from bmtard_ray.models import build_model  # noqa: E402
from bmtard_ray.data import dataset_info  # noqa: E402

# Dense peak throughput in TFLOP/s (vendor figures, without sparsity) for the "achieved vs peak" column.
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 67.0}, "H200": {"bf16": 989.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "fp32": 19.5}}

CONFIGS = {
    # name: (student, robust teacher, clean teacher)
    "paper": ("resnet18", "wrn34_10", "resnet56"),
    "paper-mbv2": ("mobilenetv2", "wrn34_10", "resnet56"),
    "cpu": ("small_cnn", "small_cnn", "small_cnn"),
}


@dataclass
class Row:
    config: str
    mode: str
    images_per_s: float
    epoch_s: float
    peak_mem_gib: float
    tflops: float
    peak: float | None



def synthetic_data(n: int) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    split = Split(imgs, labels)
    return DataBundle(split, Split(imgs[:256], labels[:256]), Split(imgs[:256], labels[:256]), dataset_info("cifar10"))


def make_trainer(cfg: RunConfig, data: DataBundle, robust: str, clean: str, tmp: Path) -> Trainer:
    for role, arch in (("robust", robust), ("clean", clean)):
        path = tmp / f"{role}-{arch}.pt"
        if not path.exists():
            torch.save(build_model(arch, 10).state_dict(), path)
        t = getattr(cfg.teachers, role)
        t.arch, t.checkpoint = arch, str(path)
    return Trainer(cfg, data=data)


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def step_flops(trainer: Trainer, x: torch.Tensor) -> float:
    """Model FLOPs of one B-MTARD step, from counted forward FLOPs F of each network.

    An attack step is a forward and an input-only backward (~2F); each of the two student training passes is
    forward + full backward (~3F); each teacher runs one forward. (FlopCounterMode cannot wrap the attack's
    autograd.grad on a leaf, so the step is composed from counted forwards.)
    """
    t = trainer.teachers
    f_s = forward_flops(trainer.student, x)
    steps = trainer.cfg.attack.steps
    return steps * 2 * f_s + 2 * 3 * f_s + forward_flops(t.robust, x) + forward_flops(t.clean, x)


def run_mode(name: str, mode: str, args: argparse.Namespace, tmp: Path) -> Row:
    student, robust, clean = CONFIGS[name]
    fast = mode == "fast"
    cfg = build_config(None, overrides=[f"student={student}", f"optim.batch_size={args.batch_size}",
                                        f"fast={fast}", f"compile={fast and args.compile}",
                                        f"sync_every_step={not fast}", f"data.loader={'device' if fast else 'reference'}",
                                        f"data.num_workers={args.workers}", "val_every=0", "trace=false",
                                        f"device={args.device}"])
    data = synthetic_data(args.batch_size * (args.warmup + args.steps))
    trainer = make_trainer(cfg, data, robust, clean, tmp)
    device = trainer.device
    it = iter(trainer.loader)
    batches = [next(it) for _ in range(1)]
    x0, y0 = (t.to(device) for t in batches[0])
    flops = step_flops(trainer, x0)

    def run(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        done = 0
        for x, y in trainer.loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = trainer.task.step(x, y)
            trainer.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            trainer.optimizer.step()
            if cfg.sync_every_step:
                out.loss.item()
            done += 1
            if done == n:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(args.warmup)  # warm-up: compile, cudnn autotune, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = run(args.steps)
    ips = args.steps * args.batch_size / seconds
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    peak = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name()
        for key, val in PEAK_TFLOPS.items():
            if key in gpu:
                peak = val["bf16" if fast else "fp32"]
    return Row(name, mode, ips, 45000 / ips, mem, flops * args.steps / seconds / 1e12, peak)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}", f"CPU {cpu} x{torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, driver via nvidia-smi)")
    return ", ".join(parts)


def table(rows: list[Row], args: argparse.Namespace) -> str:
    out = [f"Hardware: {hardware()}", f"Command: python bench/bench_step.py {' '.join(sys.argv[1:])}", "",
           "| config | mode | images/s | s/epoch (45k imgs) | speed-up | peak GPU mem GiB | achieved TFLOP/s | device peak TFLOP/s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    ref = {r.config: r.images_per_s for r in rows if r.mode == "reference"}
    for r in rows:
        speed = r.images_per_s / ref[r.config] if r.config in ref else float("nan")
        out.append(f"| {r.config} | {r.mode} | {r.images_per_s:.1f} | {r.epoch_s:.1f} | {speed:.2f}x | "
                   f"{r.peak_mem_gib:.2f} | {r.tflops:.3f} | {r.peak if r.peak else '-'} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", choices=sorted(CONFIGS), help="repeatable (default: cpu)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers in reference mode")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--write", metavar="FILE", help="append the table to this Markdown file")
    args = p.parse_args()
    tmp = Path("runs/bench-tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.config or ["cpu"]:
        for mode in ("reference", "fast"):
            rows.append(run_mode(name, mode, args, tmp))
            print(f"{name} {mode}: {rows[-1].images_per_s:.1f} img/s", flush=True)
    text = table(rows, args)
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
