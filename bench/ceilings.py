"""The machine's own ceilings, measured in the same run as a benchmark: sgemm and 3x3 convolutions.

A step's achieved FLOP/s means little against a datasheet (a 2-vCPU cloud machine reaches a fraction of
its vendor peak; a GPU's fp32 convolutions run through other kernels than its bf16 ones). So the step
benchmark measures, beside the step, what this machine's libraries reach on the operations the step is
made of, and reports the step as a fraction of that:

- sgemm: a square float32 matrix product (true fp32, TF32 off); on a GPU also the bf16 product;
- conv3x3: the 64-channel 3x3 convolution of ResNet-18's first stage at batch 128 (32x32), forward, in
  NCHW and channels_last; on a GPU also the 320-channel one of WRN-34-10's second stage (16x16), in fp32
  under torch's default flags (cuDNN may use TF32, as the reference mode does) and in bf16.

Each figure is the median of several timed runs after warm-up (CUDA: synchronised around each run).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bmtard_ray.evaluation.precision import true_fp32


@dataclass(frozen=True)
class Ceiling:
    name: str        # e.g. "conv3x3 64ch 32x32 b128"
    op: str          # "matmul" or "conv"
    dtype: str       # "fp32" (true fp32), "fp32-default" (torch's default TF32 flags) or "bf16"
    layout: str      # "-", "NCHW" or "channels_last"
    tflops: float
    seconds: float   # median time of one run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` (device work included)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _matmul(n: int, dtype: torch.dtype, device: torch.device, warmup: int, repeat: int) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)  # random data: zeros run faster than real numbers
    b = torch.randn(n, n, generator=g).to(device, dtype)
    return median_seconds(lambda: a @ b, device, warmup, repeat)


def _conv(batch: int, channels: int, size: int, dtype: torch.dtype, channels_last: bool, device: torch.device,
          warmup: int, repeat: int) -> float:
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, size, size, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    w = torch.randn(channels, channels, 3, 3, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    with torch.no_grad():
        return median_seconds(lambda: F.conv2d(x, w, padding=1), device, warmup, repeat)


def conv_flops(batch: int, channels: int, size: int) -> float:
    """Multiply-adds x 2 of a same-padded 3x3 convolution, channels -> channels, stride 1."""
    return 2.0 * batch * channels * channels * 9 * size * size


def measure(device: torch.device, *, small: bool = False) -> list[Ceiling]:
    """The ceilings for ``device``; ``small`` shrinks every size (dry runs: seconds, numbers meaningless)."""
    out: list[Ceiling] = []
    cuda = device.type == "cuda"
    warmup, repeat = (1, 2) if small else (3, 10 if cuda else 5)
    n = 128 if small else (8192 if cuda else 2048)
    with true_fp32():
        t = _matmul(n, torch.float32, device, warmup, repeat)
    out.append(Ceiling(f"sgemm {n}^3", "matmul", "fp32", "-", 2.0 * n ** 3 / t / 1e12, t))
    if cuda:
        t = _matmul(n, torch.bfloat16, device, warmup, repeat)
        out.append(Ceiling(f"gemm {n}^3", "matmul", "bf16", "-", 2.0 * n ** 3 / t / 1e12, t))
    shapes = [(8, 16, 16)] if small else [(128, 64, 32)] + ([(128, 320, 16)] if cuda else [])
    dtypes = [("fp32-default", torch.float32), ("bf16", torch.bfloat16)] if cuda else [("fp32", torch.float32)]
    for batch, ch, size in shapes:
        for label, dtype in dtypes:
            for cl in (False, True):
                t = _conv(batch, ch, size, dtype, cl, device, warmup, repeat)
                out.append(Ceiling(f"conv3x3 {ch}ch {size}x{size} b{batch}", "conv", label,
                                   "channels_last" if cl else "NCHW", conv_flops(batch, ch, size) / t / 1e12, t))
    return out


def ceiling_for(ceilings: list[Ceiling], device: torch.device, fast: bool) -> Ceiling | None:
    """The convolution ceiling a step is measured against: what its convolutions could reach at best.

    CPU: fp32 channels_last (the faster layout there too). GPU fast mode: bf16 channels_last; GPU reference
    mode: fp32 NCHW under torch's default flags, which is how the released code runs."""
    if device.type == "cuda":
        dtype, layout = ("bf16", "channels_last") if fast else ("fp32-default", "NCHW")
    else:
        dtype, layout = "fp32", "channels_last"
    matching = [c for c in ceilings if c.op == "conv" and c.dtype == dtype and c.layout == layout]
    return max(matching, key=lambda c: c.tflops, default=None)


def table(ceilings: list[Ceiling]) -> str:
    lines = ["| operation | dtype | layout | TFLOP/s | ms per run |", "|---|---|---|---:|---:|"]
    lines += [f"| {c.name} | {c.dtype} | {c.layout} | {c.tflops:.3g} | {c.seconds * 1e3:.2f} |" for c in ceilings]
    return "\n".join(lines)
