#!/usr/bin/env python
"""Images/s of one B-MTARD configuration in-process, on 1 Ray Train worker and on 2 (CPU), and on a GPU
(in-process and 1 GPU worker) when one is visible; the Ray overhead of 1 worker versus in-process.

    python bench/bench_ray_train.py --data-root /tmp/cifar            # CPU rows (+ GPU rows if CUDA is visible)
    python bench/bench_ray_train.py --data-root data --images 4096 --epochs 4 --student small_cnn

Throughput is the median over epochs 2..N of (images trained) / (training time of the epoch), as the loop
measures it (one host sync per epoch); epoch 1 is warm-up. "start-up" is the wall time from the start of
the run to its end minus the epochs' training time: data loading, model building, per-epoch checkpoint
dicts (for Ray: ray.init excluded; worker group start, checkpoint writes and shutdown included). Teachers are randomly
initialised (speed does not depend on their weights). Prints a table; never asserts a time.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bmtard_ray.config import RunConfig, build_config, replace  # noqa: E402
from bmtard_ray.data import dataset_info  # noqa: E402
from bmtard_ray.models import build_model  # noqa: E402
from bmtard_ray.models.files import model_record  # noqa: E402
from bmtard_ray.runtime.fileio import atomic_torch_save  # noqa: E402
from bmtard_ray.training.trainer import Trainer  # noqa: E402


def random_teachers(cfg: RunConfig, folder: Path) -> RunConfig:
    info = dataset_info(cfg.data.dataset)
    for role in ("clean", "robust"):
        tc = getattr(cfg.teachers, role)
        path = folder / f"{role}.pt"
        atomic_torch_save(model_record(build_model(tc.arch, info.num_classes), tc.arch, info, cfg), path)
        tc.checkpoint = str(path)
    return cfg


def steady(history: list[dict[str, Any]]) -> tuple[float, float]:
    """(median images/s over epochs 2.., training seconds of epoch 1)"""
    rates = [h["images_per_s"] for h in history[1:]] or [history[0]["images_per_s"]]
    return statistics.median(rates), history[0]["seconds"]


def in_process(cfg: RunConfig, device: str) -> dict[str, Any]:
    start = time.perf_counter()
    trainer = Trainer(cfg, device=torch.device(device), report=lambda metrics, checkpoint: None)
    trainer.fit()
    wall = time.perf_counter() - start
    rate, _ = steady(trainer.state.history)
    return {"images_per_s": rate, "startup_s": wall - sum(h["seconds"] for h in trainer.state.history)}


def on_ray(cfg: RunConfig, workers: int, gpus: float, storage: Path) -> dict[str, Any]:
    from bmtard_ray.ray_train import ScalingOptions, make_torch_trainer

    cfg = replace(cfg, name=f"bench-{workers}w-{int(gpus)}g-{time.time_ns()}")
    trainer = make_torch_trainer(cfg, ScalingOptions(num_workers=workers, gpus_per_worker=gpus),
                                 storage_path=str(storage), keep_checkpoints=cfg.optim.epochs, failure_max=0)
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    history = [m for _, m in sorted(result.best_checkpoints, key=lambda cm: cm[1]["epoch"])]
    rate, _ = steady(history)
    # Reports carry no wall clock: start-up = the run's wall time minus all epochs' training time (so it
    # also holds the per-epoch checkpoint writes and the worker group's shutdown).
    return {"images_per_s": rate, "startup_s": wall - sum(h["seconds"] for h in history)}


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    import ray

    return (f"CPU: {cpu}, {os.cpu_count()} logical cores; GPU: {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, ray {ray.__version__}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="data")
    p.add_argument("--images", type=int, default=2048, help="training images per epoch")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--student", default="tiny_cnn")
    p.add_argument("--teacher", default="tiny_cnn")
    p.add_argument("--attack-steps", type=int, default=10)
    args = p.parse_args()
    overrides = [f"data.root={args.data_root}", f"data.train_subset={args.images}", f"optim.epochs={args.epochs}",
                 f"optim.batch_size={args.batch_size}", f"student={args.student}", f"attack.steps={args.attack_steps}",
                 f"teachers.clean.arch={args.teacher}", f"teachers.robust.arch={args.teacher}", "val_every=0",
                 "checkpoint_every=1", "trace=false", "optim.milestones=[1000]"]
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = random_teachers(build_config("smoke", overrides=overrides + [f"output_dir={tmp / 'runs'}"]), tmp)
        import ray

        from bmtard_ray.ray_train import absolute_paths

        cfg = absolute_paths(cfg)
        rows: list[tuple[str, dict[str, Any]]] = []
        cpu_cfg = replace(cfg, device="cpu")
        torch.set_num_threads(os.cpu_count() or 1)
        rows.append((f"in-process CPU ({torch.get_num_threads()} threads)", in_process(cpu_cfg, "cpu")))
        # Ray's workers must import bmtard_ray too (this script is not in the repository's root).
        root = str(Path(__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        from bmtard_ray.ray_train import start_local_ray, stop_local_ray

        start_local_ray(log_to_driver=False)
        cores = int(ray.cluster_resources().get("CPU", 1))
        for workers in (1, 2):
            label = f"Ray, {workers} CPU worker(s) x {max(1, cores // workers)} CPU"
            rows.append((label, on_ray(cpu_cfg, workers, 0, tmp / "ray")))
        if torch.cuda.is_available():
            gpu_cfg = replace(cfg, device="cuda")
            rows.append(("in-process GPU", in_process(gpu_cfg, "cuda")))
            rows.append(("Ray, 1 GPU worker", on_ray(gpu_cfg, 1, 1, tmp / "ray")))
        stop_local_ray()
    base = rows[0][1]["images_per_s"]
    print()
    print(f"B-MTARD, student {args.student}, teachers {args.teacher}, PGD-{args.attack_steps} training attack, "
          f"global batch {args.batch_size}, {args.images} images x {args.epochs} epochs (CIFAR-10)")
    print(hardware())
    print()
    print(f"| {'setup':<40} | {'images/s':>9} | {'vs in-process CPU':>17} | {'start-up s':>10} |")
    print(f"|{'-' * 42}|{'-' * 10}:|{'-' * 18}:|{'-' * 11}:|")
    for label, r in rows:
        print(f"| {label:<40} | {r['images_per_s']:>9.0f} | {r['images_per_s'] / base:>16.2f}x "
              f"| {r['startup_s']:>10.1f} |")
    one = rows[1][1]["images_per_s"]
    print(f"\nRay overhead of 1 worker vs in-process (throughput): {100 * (base / one - 1):+.1f}% time per image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
