"""Issue 15: the world size does not change what a step computes.

1, 2 and 3 gloo workers (torch.multiprocessing, no Ray) train the same B-MTARD epoch through the real
Trainer: global batch 16, so 3 workers hold 6 + 5 + 5 rows. With the student's BatchNorm held in eval mode
(the one thing that is per rank by design: each rank normalises its own rows), every example's computation
is independent of how the batch is split, so what the runs compute must agree to float rounding: the global
batches, crops and attack starts, the loss (each rank's mean scaled by its share, so that DDP's gradient
average is the global batch's gradient), the count-weighted balance statistics, and therefore the student's
weights, the temperatures and the loss weights. Measured: weights within 7e-9, statistics within 2e-7
(relative). Each mistake this guards against fails it (measured by putting it back): an unscaled loss
(weights 3e-5 apart), a plain mean of the ranks' means (statistics 1e-2 apart), per-rank attack starts
(weights 1.2e-5 apart). Tolerances: weights 1e-6, statistics 1e-5 relative.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bmtard_ray.config import build_config, to_dict
from bmtard_ray.data import DataBundle, DatasetInfo, Split
from bmtard_ray.models import build_model
from bmtard_ray.training.metrics import STAT_NAMES

K = 10
WEIGHT_TOL = 1e-6
STAT_RTOL = 1e-5
INFO = DatasetInfo("cifar10", K, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _data() -> DataBundle:
    g = torch.Generator().manual_seed(3)
    split = Split(torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(64) % K)
    return DataBundle(split, split.subset(torch.arange(8)), split.subset(torch.arange(8)), INFO)


def _config(folder: Path) -> dict:
    overrides = ["student=tiny_cnn", "attack.steps=2", "optim.batch_size=16", "optim.epochs=1", "optim.lr=0.2",
                 "val_every=0",
                 "checkpoint_every=0", f"output_dir={folder}", "device=cpu", "data.augment=true",
                 "nlb.ref_window=1"]
    for role, seed in (("clean", 1), ("robust", 2)):
        torch.manual_seed(seed)
        model = build_model("tiny_cnn", K)
        with torch.no_grad():
            model.fc.weight.mul_(20.0)  # confident teachers, so that the balance moves
        torch.save(model.state_dict(), folder / f"{role}.pt")
        overrides += [f"teachers.{role}.arch=tiny_cnn", f"teachers.{role}.checkpoint={folder / f'{role}.pt'}"]
    return to_dict(build_config("smoke", overrides=overrides))


def _worker(rank: int, world: int, store: str, cfg: dict, out: str) -> None:
    import torch.distributed as dist

    from bmtard_ray.config import from_dict
    from bmtard_ray.runtime.dist import DistContext
    from bmtard_ray.training.trainer import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        trainer = Trainer(from_dict(cfg), data=_data(), device=torch.device("cpu"), dist=DistContext())
        for m in trainer.student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                m.train = lambda mode=True, m=m: m  # stays in eval mode: running statistics, per example
        trainer.train_epoch(1)
        if rank == 0:
            torch.save({"trace": torch.cat(trainer.state.trace) if trainer.state.trace else None,
                        "table": trainer.state.trace[-1],
                        "weights": {k: v.clone() for k, v in trainer.student.state_dict().items()}},
                       Path(out) / f"world-{world}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see test_ray_train._traj_worker: gloo/DDP teardown can abort a spawned process


def _run(world: int, cfg: dict, folder: Path) -> dict:
    import torch.multiprocessing as mp

    store = folder / f"store-{world}-{time.time_ns()}"
    mp.spawn(_worker, args=(world, str(store), cfg, str(folder)), nprocs=world, join=True)
    return torch.load(folder / f"world-{world}.pt", weights_only=True)


def test_one_two_and_three_workers_compute_the_same_epoch(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    runs = {w: _run(w, cfg, tmp_path) for w in (1, 2, 3)}
    one = runs[1]
    cols = [2 + STAT_NAMES.index(n) for n in ("loss", "L_adv", "L_nat", "H_adv", "H_nat", "w_adv", "w_nat")]
    assert one["table"].shape[0] == 4  # 64 images / global batch 16
    w_adv = one["table"][:, 2 + STAT_NAMES.index("w_adv")]
    assert (w_adv - w_adv[0]).abs().max() > 5e-4  # the balance moved (otherwise agreement proves little)
    for world in (2, 3):
        other = runs[world]
        gap = max((other["weights"][k] - p).abs().max().item() for k, p in one["weights"].items()
                  if p.is_floating_point())
        diff = ((other["table"][:, cols] - one["table"][:, cols]).abs() / one["table"][:, cols].abs().clamp_min(1e-3))
        print(f"{world} workers: weights within {gap:.2e}, statistics within {diff.max():.2e} (relative)")
        assert gap < WEIGHT_TOL, f"{world} workers: the student's weights differ from 1 worker's by {gap:.2e}"
        assert diff.max() < STAT_RTOL, \
            f"{world} workers: statistics differ from 1 worker by {diff.max():.2e} (relative)"
        taus = [2 + STAT_NAMES.index(n) for n in ("tau_adv", "tau_nat")]
        assert torch.equal(other["table"][:, taus], one["table"][:, taus])
