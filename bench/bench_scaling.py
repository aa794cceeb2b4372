#!/usr/bin/env python
"""Data-parallel scaling of one B-MTARD step on paper: bytes all-reduced, FLOPs, predicted step time.

For the paper's configuration (ResNet-18 student, WRN-34-10 robust and ResNet-56 clean teachers, global
batch 128, 10-step attack) on 1 to 64 GPUs it prints, per step:

* bytes all-reduced: the student's gradients (DDP, fp32: 4 bytes x parameters; the teachers are frozen and
  the attack's passes run on the unwrapped student, so nothing else) + the 4 balance statistics
  (L_adv, L_nat, H_adv, H_nat, fp32: 16 bytes) all-reduced before every EBB/NLB update;
* compute: FLOPs counted with torch's FlopCounterMode on each network's forward (bench_step.py's rule:
  attack step ~2F, each of the two student training passes ~3F, one forward per teacher), per GPU;
* predicted time and efficiency at NVLink, 100 and 400 Gb/s (ring all-reduce; formulas in the README,
  "Multi-node"):  t_comm = 2 (N-1)/N x S / B + 2 (N-1) x a  per collective,
                  t_step = F_gpu / R + t_comm(grads) + t_comm(stats)   (no overlap: an upper bound),
                  efficiency = t(1) / (N t(N)) at a fixed global batch, t(1) / t(N) at a fixed batch per GPU.

Two regimes: "fixed global batch" (the paper's 128 split over N GPUs: same schedule, fewer images per GPU)
and "batch 128 per GPU" (global batch 128 N: N x fewer iterations per epoch, the schedule changes; the
table states how). The compute rate R is an assumption (--tflops), not a measurement: small CIFAR images
keep a GPU well below its peak.

``--measure`` adds rows measured on this machine with the smoke preset through Ray Train (1 worker;
1 node x 2 workers; 2 nodes x 1 worker on a 2-node cluster on this machine). They share this machine's
CPUs and loopback, so they show Ray's overhead only, not scaling, and the table says so.

    python bench/bench_scaling.py                       # the paper-scale tables (a few seconds, CPU)
    python bench/bench_scaling.py --measure --data-root data   # plus the measured overhead rows (minutes)
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_step import CONFIGS, composed_step_flops

from bmtard_ray.config import build_config
from bmtard_ray.models import build_model

GPUS = (1, 2, 4, 8, 16, 32, 64)
NODE_GPUS = 8  # GPUs that share one NVLink domain (an 8-GPU HGX node)
# name: (bandwidth in bytes/s per GPU per direction, per-hop latency in s). Stated figures, not measured:
# NVLink 4 (H100) 450 GB/s per direction; InfiniBand/RoCE NICs at 100 and 400 Gb/s line rate.
LINKS = {"NVLink": (450e9, 3e-6), "400Gb/s": (400e9 / 8, 10e-6), "100Gb/s": (100e9 / 8, 10e-6)}
STATS_BYTES = 4 * 4  # L_adv, L_nat, H_adv, H_nat in fp32: one all-reduce per step
TRAIN_IMAGES = 45000  # CIFAR-10 training split after the 5,000-image validation split (paper preset)


@dataclass
class Paper:
    params: int            # student parameters (all-reduced gradients)
    flops_per_image: float  # one B-MTARD training step, per image
    batch: int
    lr: float
    epochs: int
    attack_steps: int


def paper_numbers(config: str = "paper") -> Paper:
    cfg = build_config("paper")
    student, robust, clean = CONFIGS[config]
    nets = [build_model(a, 10).eval() for a in (student, robust, clean)]
    x = torch.zeros(1, 3, 32, 32)
    flops = composed_step_flops(nets[0], nets[1], nets[2], cfg.attack.steps, x)
    params = sum(p.numel() for p in nets[0].parameters() if p.requires_grad)
    return Paper(params, flops, cfg.optim.batch_size, cfg.optim.lr, cfg.optim.epochs, cfg.attack.steps)


def allreduce_s(nbytes: float, n: int, link: str) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` GPUs: 2 (n-1)/n of the buffer through each GPU's link,
    2 (n-1) latency-bound hops."""
    if n == 1:
        return 0.0
    bw, alpha = LINKS[link]
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * alpha


def step_s(p: Paper, n: int, per_gpu_batch: float, link: str, tflops: float) -> float:
    compute = p.flops_per_image * per_gpu_batch / (tflops * 1e12)
    return compute + allreduce_s(4 * p.params, n, link) + allreduce_s(STATS_BYTES, n, link)


def link_ok(n: int, link: str) -> bool:
    return link != "NVLink" or n <= NODE_GPUS


def strong_table(p: Paper, tflops: float) -> list[str]:
    """The paper's global batch (128) split over N GPUs."""
    base = step_s(p, 1, p.batch, "NVLink", tflops)
    head = ["| GPUs | imgs/GPU | all-reduced per step (grads + stats) | GFLOP/GPU/step | compute ms |"
            + "".join(f" {k} ms / eff |" for k in LINKS),
            "| --- | --- | --- | --- | --- |" + " --- |" * len(LINKS)]
    rows = []
    for n in GPUS:
        b = p.batch / n
        cells = []
        for link in LINKS:
            if not link_ok(n, link):
                cells.append(" n/a (> 8 GPUs) |")
                continue
            t = step_s(p, n, b, link, tflops)
            cells.append(f" {t * 1e3:.2f} / {base / (n * t) * 100:.0f}% |")
        rows.append(f"| {n} | {b:g} | {4 * p.params / 1e6:.2f} MB + {STATS_BYTES} B | "
                    f"{p.flops_per_image * b / 1e9:.1f} | {p.flops_per_image * b / (tflops * 1e12) * 1e3:.2f} |"
                    + "".join(cells))
    return head + rows


def weak_table(p: Paper, tflops: float) -> list[str]:
    """128 images per GPU: the global batch grows with N, and with it what the schedule does."""
    base = step_s(p, 1, p.batch, "NVLink", tflops)
    head = ["| GPUs | global batch | iterations/epoch | lr (linear rule) | EBB/NLB updates in 300 epochs |"
            + "".join(f" {k} ms / eff |" for k in LINKS),
            "| --- | --- | --- | --- | --- |" + " --- |" * len(LINKS)]
    rows = []
    for n in GPUS:
        iters = TRAIN_IMAGES // (p.batch * n)
        cells = []
        for link in LINKS:
            if not link_ok(n, link):
                cells.append(" n/a (> 8 GPUs) |")
                continue
            t = step_s(p, n, p.batch, link, tflops)
            cells.append(f" {t * 1e3:.2f} / {base / t * 100:.0f}% |")
        rows.append(f"| {n} | {p.batch * n} | {iters} | {p.lr * n:g} | {iters * p.epochs:,} |" + "".join(cells))
    return head + rows


# ---------------------------------------------------------------------------------------------------------
# Measured on this machine: Ray's overhead only.


def measured_rows(data_root: str, out: Path) -> list[str]:
    import pyarrow.parquet as pq
    from rich.console import Console

    from bmtard_ray.launch.local import run_local
    from bmtard_ray.ray_train import (
        ScalingOptions,
        run_ray,
        start_local_ray,
        stop_local_ray,
    )
    from bmtard_ray.training.teachers import ensure_teachers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from multinode import (  # the tests' 2-node cluster on this machine
        local_cluster,
        train_worker_nodes,
    )

    quiet = Console(quiet=True)
    teachers = out / "teachers"

    def cfg(name: str):
        return build_config("smoke", overrides=[f"data.root={Path(data_root).resolve()}", f"output_dir={out / 'runs'}",
                                                f"teachers.cache_dir={teachers}", f"name={name}", "optim.epochs=2"])

    ensure_teachers(cfg("t"), lambda t: run_local(t, overwrite=True, console=quiet), log=lambda s: None)

    def one(label: str, scaling: ScalingOptions) -> tuple[str, float, float, int]:
        name = label.replace(" ", "-")
        before = set(train_worker_nodes())
        start = time.perf_counter()
        run_ray(cfg(name), scaling, overwrite=True, console=quiet)
        wall = time.perf_counter() - start
        ips = pq.read_table(out / "runs" / name / "metrics.parquet").column("images_per_s").to_pylist()[-1]
        nodes = len(set(train_worker_nodes(since=before).values()))  # where the workers ran, from Ray's state
        return label, ips, wall, nodes

    rows = []
    start_local_ray(num_cpus=2, log_to_driver=False)
    try:
        rows.append(one("1 worker", ScalingOptions(1, 1.0, 0.0)))
        rows.append(one("1 node x 2 workers", ScalingOptions(2, 1.0, 0.0, "PACK")))
    finally:
        stop_local_ray()
    with local_cluster({"resources": {"node_a": 1}}, {"resources": {"node_b": 1}}):
        rows.append(one("2 nodes x 1 worker", ScalingOptions(2, 1.0, 0.0, "SPREAD")))
    lines = ["| measured here (smoke preset, tiny_cnn, global batch 32, 2 epochs; overhead only) | images/s reported "
             "(epoch 2) | run wall s (teachers cached) | distinct node ids of the workers |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {ips:.0f} | {wall:.0f} | {nodes} |" for label, ips, wall, nodes in rows]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tflops", type=float, default=200.0,
                    help="assumed sustained TFLOP/s per GPU for the step (default 200, about 20%% of an H100's "
                         "dense bf16 peak)")
    ap.add_argument("--measure", action="store_true", help="also run the overhead rows on this machine (minutes)")
    ap.add_argument("--data-root", default="data", help="folder holding cifar-10-batches-py/ (for --measure)")
    ap.add_argument("--out", default="runs/bench_scaling", help="where --measure writes its runs")
    args = ap.parse_args()
    p = paper_numbers()
    print(f"paper configuration: ResNet-18 student ({p.params / 1e6:.2f} M parameters), WRN-34-10 + ResNet-56 "
          f"teachers, {p.attack_steps}-step attack, global batch {p.batch}; {p.flops_per_image / 1e9:.2f} GFLOP per "
          f"image per step (counted); assumed {args.tflops:g} TFLOP/s per GPU; links "
          + ", ".join(f"{k} {bw / 1e9:g} GB/s + {a * 1e6:g} us/hop" for k, (bw, a) in LINKS.items()) + "\n")
    print("Fixed global batch 128 (the paper's schedule unchanged; efficiency = t(1) / (N t(N))):\n")
    print("\n".join(strong_table(p, args.tflops)) + "\n")
    print("128 images per GPU (global batch 128 N; efficiency = t(1) / t(N)). The schedule changes: the linear "
          "rule scales lr with the batch, and EBB and NLB update once per iteration, so N x fewer iterations "
          "mean N x fewer balance updates (less movement of tau and w) unless ebb.eta_tau and nlb.rho are "
          "scaled up too:\n")
    print("\n".join(weak_table(p, args.tflops)) + "\n")
    if args.measure:
        out = Path(args.out).resolve()
        print("\n".join(measured_rows(args.data_root, out)))
        print("\nThese rows share this machine's CPUs and loopback: they show Ray Train's overhead (start-up, "
              "gloo on loopback), not how the step scales.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
