#!/usr/bin/env python
"""One real epoch of B-MTARD through the training loop (no Ray), timed end to end with its evaluation.

The paper's configuration by default: ResNet-18 student, WRN-34-10 robust and ResNet-56 clean teachers
(randomly initialised: speed does not depend on weights), batch 128, PGD-10, the fast path (device-resident
uint8 data, bf16 autocast, channels_last on GPU), on the CIFAR-10 copy's 45,000 training images (5,000
are the validation split). ``Trainer.fit()`` runs the epoch and its validation (clean + PGD-20 on 1,000
validation images), ``Trainer.finish()`` the final evaluation (1,000 validation and 1,000 test images) and
writes the run's files, as a real run does. The loop's own images/s is what the step benchmark's fast-mode
figure is checked against.

    python bench/device_epoch.py --data-root data --json epoch.json
    python bench/device_epoch.py --data-root synthetic --dry-run --json epoch.json   # tiny, CPU, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_step import environment, random_teachers  # noqa: E402
from bmtard_ray.config import build_config  # noqa: E402
from bmtard_ray.data import DataBundle, Split, dataset_info, prepare_data  # noqa: E402
from bmtard_ray.errors import BmtardError  # noqa: E402
from bmtard_ray.training.trainer import Trainer  # noqa: E402

SYNTHETIC = "synthetic"


def synthetic_bundle(n_train: int, n_val: int, n_test: int) -> DataBundle:
    """Random uint8 images with random labels, CIFAR-10's shapes: for timing only."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (n,), generator=g))

    return DataBundle(split(n_train), split(n_val), split(n_test), dataset_info("cifar10"))


def overrides(args: argparse.Namespace) -> list[str]:
    dry = args.dry_run
    student, robust, clean = ("tiny_cnn",) * 3 if dry else (args.student, args.robust, args.clean)
    out = [f"student={student}", f"optim.batch_size={32 if dry else args.batch_size}", "optim.epochs=1",
           "fast=true", "compile=false", "val_every=1", f"val_examples={64 if dry else 1000}",
           f"eval.n_examples={64 if dry else 1000}", "eval.attacks=[clean,pgd_sat]", "trace=true",
           f"attack.steps={2 if dry else 10}", f"device={args.device}", f"output_dir={args.tmp}",
           f"name={'dry-epoch' if dry else 'epoch'}", f"data.root={args.data_root}"]
    if dry:
        out += ["data.train_subset=256", "data.val_size=500"]
    return out + [f"teachers.robust.arch={robust}", f"teachers.clean.arch={clean}"]


def write(path: Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    out_json = Path(args.json) if args.json else None
    wall = time.perf_counter()
    cfg = build_config(None, overrides=overrides(args))
    random_teachers(cfg, cfg.teachers.robust.arch, cfg.teachers.clean.arch, Path(args.tmp) / "random-teachers")
    result: dict[str, Any] = {"env": environment(), "dry_run": args.dry_run, "student": cfg.student,
                              "teachers": f"{cfg.teachers.robust.arch} + {cfg.teachers.clean.arch}",
                              "batch_size": cfg.optim.batch_size, "attack_steps": cfg.attack.steps,
                              "phase": "loading data"}
    write(out_json, result)
    t = time.perf_counter()
    if args.data_root == SYNTHETIC:
        data = synthetic_bundle(256, 500, 256) if args.dry_run else synthetic_bundle(45_000, 5_000, 10_000)
        result["data"] = "synthetic images (random uint8, random labels): timing only"
    else:
        data = prepare_data(cfg)
        result["data"] = f"CIFAR-10 copy at {args.data_root}"
    result["data_s"] = time.perf_counter() - t
    result["train_images"] = len(data.train)
    t = time.perf_counter()
    trainer = Trainer(cfg, data=data)
    result.update(setup_s=time.perf_counter() - t, device=str(trainer.device), phase="training")
    write(out_json, result)
    t = time.perf_counter()
    trainer.fit()
    fit_s = time.perf_counter() - t
    m = trainer.state.history[-1]
    result.update(train_s=m["seconds"], loop_images_per_s=m["images_per_s"], steps=len(trainer.loader),
                  validation_s=fit_s - m["seconds"], val_clean=m.get("val_clean"), val_robust=m.get("val_robust"),
                  tau=[m.get("tau_adv"), m.get("tau_nat")], w=[m.get("w_adv"), m.get("w_nat")],
                  train_loss=m.get("train_loss"), phase="final evaluation")
    write(out_json, result)
    t = time.perf_counter()
    summary = trainer.finish(Path(cfg.output_dir) / cfg.name)
    result.update(final_eval_s=time.perf_counter() - t, wall_s=time.perf_counter() - wall, phase="done",
                  test=summary["results"]["test"])
    if trainer.device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    write(out_json, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="data", help=f"folder holding cifar-10-batches-py/, or '{SYNTHETIC}'")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--robust", default="wrn34_10")
    p.add_argument("--clean", default="resnet56")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dry-run", action="store_true", help="tiny models and sizes (CPU, seconds)")
    p.add_argument("--tmp", default="runs/device-epoch", help="the run's folder (model, trace, reports)")
    p.add_argument("--json", help="write the timings here (rewritten after every phase)")
    args = p.parse_args(argv)
    try:
        r = run(args)
    except BmtardError as exc:  # a missing data folder, a bad setting: one line, exit status 2
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"epoch: {r['train_images']} images in {r['steps']} steps, {r['train_s']:.1f} s in the loop "
          f"({r['loop_images_per_s']:.0f} img/s), validation {r['validation_s']:.1f} s, final evaluation "
          f"{r['final_eval_s']:.1f} s, wall {r['wall_s']:.1f} s on {r['device']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
