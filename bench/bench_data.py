#!/usr/bin/env python
"""Images/s of the device loader on its two paths: resident vs streamed from a memory map (issue 27).

Both paths serve CIFAR-10's 45,000 training images (50,000 less the 5,000-image validation split) as global
batches of 128 with crop + flip, exactly as a run draws them (``BatchLoader``, drop_last). Resident: the uint8
split held in memory (on the device). Streamed: the same images written to an .npz file and loaded as
``--dataset npz`` with ``data.memory_budget_mb=0``, which decodes them once into a memory-mapped cache entry
and reads each batch's rows from it (a thread reads one batch ahead). The cache was just written, so the
streamed rows come from the page cache: this is the warm-cache figure (a cold disk adds its read time).

The streamed path is timed with its read-ahead thread (the default) and without it (``read_ahead=False``).
Rows: the loader alone (one full epoch per round), and with ``--step``, the loader feeding a natural
training step of ``small_cnn`` per batch (forward, cross-entropy, backward, SGD), where the loader's share of
the time shows. The paths are timed in interleaved rounds and the median is reported, so that a change in
the machine's load hits every path alike. Prints a table with the hardware; never asserts a time.

    python bench/bench_data.py                     # loader only
    python bench/bench_data.py --step              # and the loader + small_cnn step rows
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_step import environment, hardware  # noqa: E402
from bmtard_ray.data import BatchLoader, Split, load_dataset, train_val_split  # noqa: E402
from bmtard_ray.models import build_model  # noqa: E402
from bmtard_ray.runtime.device import select_device  # noqa: E402


def splits(root: str, tmp: Path) -> tuple[Split, Split]:
    """(resident, streamed) training split of CIFAR-10 less its validation split, the same rows in both."""
    train, _, _ = load_dataset("cifar10", root)
    test_x = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp / "cifar10.npz", x_train=train.images.numpy(), y_train=train.labels.numpy(), x_test=test_x,
             y_test=np.zeros(1, dtype=np.int64))
    start = time.perf_counter()
    streamed, _, _ = load_dataset("npz", tmp / "cifar10.npz", memory_budget_mb=0, cache_dir=tmp / "cache")
    print(f"decoded {len(streamed)} images into the memory-map cache in {time.perf_counter() - start:.1f} s",
          flush=True)
    assert streamed.is_streamed
    return train_val_split(train, 5000, 0)[0], train_val_split(streamed, 5000, 0)[0]


PATHS = ("resident", "streamed, read-ahead thread", "streamed, read when needed")


def make_loader(path: str, splits_: dict[str, Split], device: torch.device, batch: int) -> BatchLoader:
    split = splits_["resident" if path == "resident" else "streamed"]
    return BatchLoader(split, batch, shuffle=True, augment=True, device=device, seed=0, drop_last=True,
                       channels_last=True, read_ahead=path != "streamed, read when needed")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_epoch(loader: BatchLoader, device: torch.device, epoch: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process, all threads) of one epoch of the loader
    alone. The second is the loader's cost, which other jobs on the machine do not inflate."""
    loader.set_epoch(epoch)
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in loader:
        pass
    sync(device)
    return (loader.num_examples / (time.perf_counter() - start),
            loader.num_examples / max(time.process_time() - cpu, 1e-9))


def step_run(loader: BatchLoader, device: torch.device, steps: int, epoch: int) -> float:
    """Images/s of ``steps`` natural training steps of small_cnn fed by the loader (after 3 warm-up steps)."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader.set_epoch(epoch)
    seen, start = 0, 0.0
    for k, (x, y) in enumerate(loader):
        if k == 3:
            sync(device)
            start, seen = time.perf_counter(), 0
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
        if k == steps + 2:
            break
    sync(device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--data-root", default="data")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="timed epochs per path, interleaved (median reported)")
    p.add_argument("--step", action="store_true", help="also time the loader feeding a small_cnn training step")
    p.add_argument("--steps", type=int, default=40, help="timed steps per round of the --step rows")
    args = p.parse_args()
    device = select_device(args.device)
    rates: dict[tuple[str, str], list[float]] = {}
    cpu_rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_data") as tmp:
        resident, streamed = splits(args.data_root, Path(tmp))
        data = {"resident": resident, "streamed": streamed}
        loaders = {path: make_loader(path, data, device, args.batch_size) for path in PATHS}
        for loader in loaders.values():  # warm-up: first touches, page cache, allocator
            loader_epoch(loader, device, 99)
        # Interleaved rounds: a change in the machine's load hits every path alike.
        for r in range(args.rounds):
            for path, loader in loaders.items():
                wall, cpu = loader_epoch(loader, device, r)
                rates.setdefault(("loader only", path), []).append(wall)
                cpu_rates.setdefault(path, []).append(cpu)
                if args.step:
                    rates.setdefault(("loader + small_cnn step", path), []).append(
                        step_run(loader, device, args.steps, r))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{w}/{p_}: {v[-1]:,.0f}"
                                                            for (w, p_), v in rates.items()), flush=True)
    print()
    print(f"Hardware: {hardware(environment())}; device {device}")
    print(f"Command: python bench/bench_data.py {' '.join(sys.argv[1:])}")
    print(f"CIFAR-10 train less val: {len(resident)} images, global batch {args.batch_size}, crop + flip, drop_last; "
          f"median (min-max) of {args.rounds} interleaved rounds")
    print()
    print("| what | path | images/s, median | min - max | vs resident | images per CPU-second, median |")
    print("|---|---|---:|---:|---:|---:|")
    for (what, path), v in rates.items():
        base = float(np.median(rates[(what, "resident")]))
        cpu = f"{np.median(cpu_rates[path]):,.0f}" if what == "loader only" else "-"
        print(f"| {what} | {path} | {np.median(v):,.0f} | {min(v):,.0f} - {max(v):,.0f} | "
              f"{np.median(v) / base:.2f}x | {cpu} |")


if __name__ == "__main__":
    main()
