"""TensorBoard event files of a training run (bmtard_ray.launch.events): one point per metric per epoch, grouped tags,
no NaN points, a fresh run replacing an old run's files and a resumed one continuing them."""
from __future__ import annotations

import math
import time
from pathlib import Path

from conftest import read_scalars

from bmtard_ray.launch.events import EpochEvents, tag_of


def epoch(e: int, **extra: float) -> dict[str, float]:
    return {"epoch": e, "lr": 0.1, "seconds": 2.0, "images_per_s": 100.0, "train_loss": 1.0 / e, "train_L_adv": 0.5,
            "train_L_nat": 0.4, "tau_adv": 1.0 + e, "tau_nat": 1.0, "w_adv": 0.5, "w_nat": 0.5, "H_adv": 2.0,
            "H_nat": 2.1, "train_acc_adv": 20.0, "train_acc_nat": 30.0, "val_clean": 40.0 + e, "val_robust": 10.0,
            "val_w_robust": 25.0 + e / 2, **extra}


def test_tags_group_the_losses_the_balance_and_validation() -> None:
    assert [tag_of(m) for m in ("val_w_robust", "train_loss", "train_L_adv", "tau_adv", "w_nat", "H_adv",
                                "train_acc_nat", "lr", "images_per_s", "epoch")] == [
        "validation/val_w_robust", "loss/train_loss", "loss/train_L_adv", "balance/tau_adv", "balance/w_nat",
        "balance/H_adv", "train/train_acc_nat", "train/lr", "speed/images_per_s", None]


def test_each_epoch_is_a_point_and_nan_is_skipped(tmp_path: Path) -> None:
    events = EpochEvents(tmp_path / "run", fresh=True)
    events(epoch(1))
    events(epoch(2, tau_adv=math.nan))  # a baseline's temperatures are NaN
    # On disk within seconds: readable while the run is still going (before close).
    deadline = time.monotonic() + 20
    while len(read_scalars(tmp_path / "run").get("validation/val_w_robust", {})) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    scalars = read_scalars(tmp_path / "run")
    assert scalars["validation/val_w_robust"] == {1: 25.5, 2: 26.0}
    assert scalars["balance/tau_adv"] == {1: 2.0} and scalars["loss/train_loss"] == {1: 1.0, 2: 0.5}
    assert {t.split("/")[0] for t in scalars} == {"validation", "loss", "balance", "train", "speed"}
    events.close()


def test_a_resumed_run_continues_and_a_fresh_one_replaces(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = EpochEvents(run, fresh=True)
    first(epoch(1, val_w_robust=10.0))
    first(epoch(2, val_w_robust=11.0))
    first.close()
    resumed = EpochEvents(run, fresh=False)
    resumed(epoch(3, val_w_robust=12.0))
    resumed.close()
    assert read_scalars(run)["validation/val_w_robust"] == {1: 10.0, 2: 11.0, 3: 12.0}
    again = EpochEvents(run, fresh=True)  # --overwrite: the old run's curves must not linger
    again(epoch(1, val_w_robust=30.0))
    again.close()
    assert read_scalars(run)["validation/val_w_robust"] == {1: 30.0}
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
