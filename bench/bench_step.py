#!/usr/bin/env python
"""Images/s of one B-MTARD training step: the released code's way (reference) vs our fast path.

Reference mode = fp32, eager, a CPU DataLoader with worker processes and a host copy per step, and a
per-step ``.item()`` (what the paper's scripts do). Fast mode = the uint8 dataset resident on the device and
augmented there, bf16 autocast with channels_last on GPU, one host sync per epoch; fast+compile adds
torch.compile. All modes run the same engine on the same machine, in one invocation, so the ratio is a
like-for-like figure. The same run measures the machine's own ceilings (bench/ceilings.py: sgemm and 3x3
convolutions, NCHW and channels_last) and prints each step's achieved FLOP/s as a fraction of them.

    python bench/bench_step.py --config cpu                   # CPU: small models (what CI-class machines run)
    python bench/bench_step.py --config paper --config paper-mbv2 --compile   # GPU: the paper's models
    python bench/bench_step.py ... --write BENCHMARKS.md      # append the table to BENCHMARKS.md
    python bench/bench_step.py ... --json step.json           # every row as JSON, rewritten after each mode

Prints a table; never asserts a time. Teachers are randomly initialised (speed does not depend on weights);
images are synthetic. A mode that fails (e.g. no compile backend) is recorded with its error and the run
goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import ceilings as ceil  # noqa: E402
from bmtard_ray.config import RunConfig, build_config  # noqa: E402
from bmtard_ray.data import DataBundle, Split, dataset_info  # noqa: E402
from bmtard_ray.models import build_model  # noqa: E402
from bmtard_ray.training.trainer import Trainer  # noqa: E402

# Dense peak throughput in TFLOP/s (vendor datasheets, SXM, without sparsity) for the "vs device peak" column:
# bf16 for the fast modes; TF32 for the reference mode, whose float32 convolutions cuDNN runs in TF32 under
# torch's default flags (the convolutions are nearly all of a step's FLOPs).
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "tf32": 494.0}, "H200": {"bf16": 989.0, "tf32": 494.0},
               "A100": {"bf16": 312.0, "tf32": 156.0}}

CONFIGS = {
    # name: (student, robust teacher, clean teacher)
    "paper": ("resnet18", "wrn34_10", "resnet56"),
    "paper-mbv2": ("mobilenetv2", "wrn34_10", "resnet56"),
    "cpu": ("small_cnn", "small_cnn", "small_cnn"),
    "tiny": ("tiny_cnn", "tiny_cnn", "tiny_cnn"),  # dry runs: seconds, numbers meaningless
}
MODES = ("reference", "fast", "fast+compile")
EPOCH_IMAGES = 50_000  # "seconds per epoch" is for CIFAR's 50,000 training images


@dataclass
class Row:
    config: str
    student: str
    teachers: str
    mode: str
    batch_size: int
    attack_steps: int
    timed_steps: int
    images_per_s: float | None = None
    epoch_s: float | None = None           # seconds per EPOCH_IMAGES images
    peak_mem_gib: float | None = None      # CUDA only
    step_gflop: float | None = None        # model FLOPs of one step (the whole batch)
    tflops: float | None = None            # achieved
    device_peak_tflops: float | None = None
    ceiling: str | None = None             # the measured convolution ceiling compared with
    ceiling_tflops: float | None = None
    sgemm_tflops: float | None = None
    warmup_s: float | None = None          # warm-up steps' wall time (compile, autotune, allocator)
    error: str | None = None


def synthetic_data(n: int) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    split = Split(imgs, labels)
    return DataBundle(split, Split(imgs[:256], labels[:256]), Split(imgs[:256], labels[:256]), dataset_info("cifar10"))


def random_teachers(cfg: RunConfig, robust: str, clean: str, folder: Path) -> None:
    """Point ``cfg``'s teachers at randomly initialised checkpoints of ``robust`` and ``clean`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for role, arch in (("robust", robust), ("clean", clean)):
        path = folder / f"{role}-{arch}.pt"
        if not path.exists():
            torch.save(build_model(arch, 10).state_dict(), path)
        t = getattr(cfg.teachers, role)
        t.arch, t.checkpoint = arch, str(path)


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
    return composed_step_flops(trainer.student, t.robust, t.clean, trainer.cfg.attack.steps, x)


def composed_step_flops(student: torch.nn.Module, robust: torch.nn.Module, clean: torch.nn.Module, attack_steps: int,
                        x: torch.Tensor) -> float:
    """:func:`step_flops` from the three networks (also used by bench_scaling.py, which builds no trainer)."""
    f_s = forward_flops(student, x)
    return attack_steps * 2 * f_s + 2 * 3 * f_s + forward_flops(robust, x) + forward_flops(clean, x)


def mode_config(name: str, mode: str, args: argparse.Namespace) -> RunConfig:
    student = CONFIGS[name][0]
    fast = mode != "reference"
    return build_config(None, overrides=[
        f"student={student}", f"optim.batch_size={args.batch_size}", f"fast={fast}",
        f"compile={mode == 'fast+compile'}", f"sync_every_step={not fast}",
        f"data.loader={'device' if fast else 'reference'}", f"data.num_workers={args.workers}",
        f"attack.steps={args.attack_steps}", "val_every=0", "trace=false", f"device={args.device}"])


def run_mode(name: str, mode: str, args: argparse.Namespace, tmp: Path, found: list[ceil.Ceiling]) -> Row:
    student, robust, clean = CONFIGS[name]
    row = Row(name, student, f"{robust} + {clean}", mode, args.batch_size, args.attack_steps, args.steps)
    cfg = mode_config(name, mode, args)
    random_teachers(cfg, robust, clean, tmp)
    data = synthetic_data(args.batch_size * (args.warmup + args.steps))
    trainer = Trainer(cfg, data=data, compile_backend=args.compile_backend)
    device = trainer.device
    x0, _ = next(iter(trainer.loader))
    flops = step_flops(trainer, x0.to(device))

    def run(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        done = 0
        for x, y in trainer.loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = trainer.method.step(x, y)
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

    row.warmup_s = run(args.warmup)  # compile, cuDNN heuristics, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = run(args.steps)
    row.images_per_s = args.steps * args.batch_size / seconds
    row.epoch_s = EPOCH_IMAGES / row.images_per_s
    row.step_gflop = flops / 1e9
    row.tflops = flops * args.steps / seconds / 1e12
    fast = mode != "reference"
    if device.type == "cuda":
        row.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
        gpu = torch.cuda.get_device_name()
        row.device_peak_tflops = next((v["bf16" if fast else "tf32"] for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    best = ceil.ceiling_for(found, device, fast)
    if best is not None:
        row.ceiling, row.ceiling_tflops = f"{best.name} {best.dtype} {best.layout}", best.tflops
    sgemm = next((c for c in found if c.op == "matmul" and c.dtype == ("bf16" if fast and device.type == "cuda"
                                                                      else "fp32")), None)
    row.sgemm_tflops = sgemm.tflops if sgemm else None
    return row


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Device, driver and library versions, recorded with every table."""
    import numpy
    import torchvision

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torchvision": torchvision.__version__, "numpy": numpy.__version__,
                           "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   driver=_driver_version(),
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return env


def hardware(env: dict[str, Any]) -> str:
    parts = [f"torch {env['torch']}", f"torchvision {env['torchvision']}", f"python {env['python']}",
             f"CPU {env['cpu']} ({env['cpu_count']} logical CPUs, {env['torch_threads']} torch threads)"]
    if "gpu" in env:
        parts.append(f"GPU {env['gpu']} ({env['gpu_memory_gib']} GiB; driver {env['driver']}, CUDA {env['cuda']}, "
                     f"cuDNN {env['cudnn']})")
    return ", ".join(parts)


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[Row], env: dict[str, Any], found: list[ceil.Ceiling]) -> str:
    out = [f"Hardware: {hardware(env)}", f"Command: python bench/bench_step.py {' '.join(sys.argv[1:])}", "",
           "| config | mode | images/s | s/epoch (50k imgs) | speed-up | peak GPU mem GiB | achieved TFLOP/s | "
           "device peak TFLOP/s | measured conv ceiling TFLOP/s | step / conv ceiling | step / sgemm |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = {r.config: r.images_per_s for r in rows if r.mode == "reference" and r.images_per_s}
    for r in rows:
        if r.error:
            out.append(f"| {r.config} | {r.mode} | failed: {r.error} | | | | | | | | |")
            continue
        speed = f"{r.images_per_s / ref[r.config]:.2f}x" if r.config in ref else "-"
        frac = f"{r.tflops / r.ceiling_tflops:.0%}" if r.ceiling_tflops else "-"
        frac_mm = f"{r.tflops / r.sgemm_tflops:.0%}" if r.sgemm_tflops else "-"
        out.append(f"| {r.config} | {r.mode} | {r.images_per_s:.1f} | {r.epoch_s:.1f} | {speed} | "
                   f"{_num(r.peak_mem_gib, '.2f')} | {r.tflops:.3g} | {_num(r.device_peak_tflops, 'g')} | "
                   f"{_num(r.ceiling_tflops, '.3g')} | {frac} | {frac_mm} |")
    if found:
        out += ["", "Ceilings measured in the same run (bench/ceilings.py):", "", ceil.table(found)]
    return "\n".join(out)


def write_json(path: Path, env: dict[str, Any], found: list[ceil.Ceiling], rows: list[Row]) -> None:
    """The whole result so far, replaced atomically: a run killed at its deadline leaves every finished row."""
    data = {"command": "python bench/bench_step.py " + " ".join(sys.argv[1:]), "env": env,
            "ceilings": [c.to_dict() for c in found], "rows": [asdict(r) for r in rows]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", choices=sorted(CONFIGS), help="repeatable (default: cpu)")
    p.add_argument("--modes", default="reference,fast", help=f"comma-separated, from: {', '.join(MODES)}")
    p.add_argument("--compile", action="store_true", help="add the fast+compile mode")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for fast+compile")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--attack-steps", type=int, default=10, help="PGD steps of the training attack (paper: 10)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers in reference mode")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring sgemm and conv ceilings")
    p.add_argument("--small-ceilings", action="store_true", help="tiny ceiling sizes (dry runs)")
    p.add_argument("--tmp", default="runs/bench-tmp", help="folder for the random teachers' checkpoints")
    p.add_argument("--write", metavar="FILE", help="append the table to this Markdown file")
    p.add_argument("--json", metavar="FILE", help="write every row, the ceilings and the versions as JSON")
    args = p.parse_args(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.compile and "fast+compile" not in args.mode_list:
        args.mode_list.append("fast+compile")
    bad = [m for m in args.mode_list if m not in MODES]
    if bad or not args.mode_list:
        p.error(f"--modes takes a comma-separated list from: {', '.join(MODES)} (got {args.modes!r})")
    for flag in ("batch_size", "steps", "warmup"):
        if getattr(args, flag) < (0 if flag == "warmup" else 1):
            p.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(args.tmp)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    env = environment()
    found: list[ceil.Ceiling] = []
    if not args.no_ceilings:
        found = ceil.measure(device, small=args.small_ceilings)
        for c in found:
            print(f"ceiling {c.name} {c.dtype} {c.layout}: {c.tflops:.3g} TFLOP/s", flush=True)
    rows: list[Row] = []
    if args.json:
        write_json(Path(args.json), env, found, rows)
    for name in args.config or ["cpu"]:
        for mode in args.mode_list:
            try:
                row = run_mode(name, mode, args, tmp, found)
            except Exception as exc:  # a missing compile backend, out of memory, ...: recorded, and on
                student, robust, clean = CONFIGS[name]
                row = Row(name, student, f"{robust} + {clean}", mode, args.batch_size, args.attack_steps, args.steps,
                          error=_one_line(exc))
            rows.append(row)
            if row.error:
                print(f"{name} {mode}: FAILED {row.error}", flush=True)
            else:
                frac = f", {row.tflops / row.ceiling_tflops:.0%} of the conv ceiling" if row.ceiling_tflops else ""
                print(f"{name} {mode}: {row.images_per_s:.1f} img/s, {row.tflops:.3g} TFLOP/s{frac}", flush=True)
            if args.json:
                write_json(Path(args.json), env, found, rows)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    text = table(rows, env, found)
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text + "\n")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
