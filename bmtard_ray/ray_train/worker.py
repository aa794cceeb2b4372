"""What runs on every Ray Train worker: the core Trainer with Ray's process group and checkpoints."""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint

from bmtard_ray.config import from_dict
from bmtard_ray.errors import ConfigError
from bmtard_ray.ray_train.node_check import check_node_inputs
from bmtard_ray.ray_train.stop import STOPPED_KEY, StopAddress, StopPoll, StopRequested
from bmtard_ray.runtime.dist import DistContext
from bmtard_ray.storage import checkpoints, paths
from bmtard_ray.training.trainer import Trainer


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Ray stores reported metrics as JSON in its checkpoint snapshot: plain floats, NaN as None."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def run_worker_hook(trainer: Trainer, hook: dict[str, Any] | None) -> None:
    """Testing hook: call ``hook['function'](trainer, **hook['kwargs'])`` from the Python file
    ``hook['file']`` on every worker, after the trainer is built and restored and before it trains.

    The tests inject worker failures through it (tests/faults.py); the product itself passes none."""
    if not hook:
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("bmtard_worker_hook", hook["file"])
    if spec is None or spec.loader is None:
        raise ConfigError(f"worker hook file {hook['file']} cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    getattr(module, hook["function"])(trainer, **hook.get("kwargs", {}))


class PreemptionPoll:
    """The Trainer's ``checkpoint_now`` hook: True once per preemption notice, so the run saves a checkpoint
    at once (then trains on, as Ray recommends; when the node goes, Ray restarts the group from that
    checkpoint and charges the restart to the preemption budget, not to ``--max-failures``).

    ``ray.train.get_preemption_info()`` is a broadcast from rank 0 that every rank must call equally often,
    so it is asked every ``every`` iterations (counted alike on every rank), not on a timer: Ray's watcher
    polls the drained nodes every 5 s, and a drain gives its node tens of seconds or more."""

    def __init__(self, every: int = 10) -> None:
        self.every, self.calls, self.seen = every, 0, None

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls % self.every:
            return False
        info = ray.train.get_preemption_info()
        if info is None or info == self.seen:
            return False
        self.seen = info
        return True


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Runs on every Ray Train worker. ``config`` is what :func:`make_torch_trainer` built:
    ``cfg`` (RunConfig as a dict, absolute paths), ``run_dir`` (storage path or URI of the run folder),
    ``resume_from`` (a checkpoint file to start from when Ray has none), ``finish``, ``worker_hook``
    (tests: see :func:`run_worker_hook`), ``stop_signal`` (a :class:`~bmtard_ray.ray_train.stop.StopAddress`
    as a dict, or None). Returns the run's summary when ``finish`` (Ray hands rank 0's to the driver), else
    None; a run stopped through its signal returns ``{"stopped": reason, "epoch": last epoch done}`` instead."""
    _quiet_ray_train_worker()
    cfg = from_dict(config["cfg"])
    check_node_inputs(cfg)  # this node's copy of the data and teachers, before any collective or step
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist = DistContext()  # the process group Ray Train initialised (gloo on CPU, nccl on GPU)

    gcs = ray.get_runtime_context().gcs_address
    stop = StopPoll(StopAddress.from_dict(config.get("stop_signal")), rank=rank, world_size=dist.world_size,
                    inner=PreemptionPoll())
    reported = {"epoch": 0, "start": 0}  # the last epoch reported; the epoch the run (re)started from

    def report(metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        orphaned_stop(gcs)  # a worker whose cluster is gone writes no checkpoint the driver cannot know of
        if "epoch" in metrics:  # an epoch's end (every rank): a stop requested during it wins over its report,
            # which waits for the owner's verdict on the previous one (see bmtard_ray.ray_train.stop)
            stop.check(acked_at_least=reported["epoch"] if reported["epoch"] > reported["start"] else 0)
        metrics = _jsonable(metrics)
        reported["epoch"] = int(metrics.get("epoch", reported["epoch"]))
        if checkpoint is None or rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="bmtard-ckpt-") as tmp:
            checkpoints.write(checkpoint, tmp, atomic=False)
            # An epoch's report names the epoch; a mid-epoch one (no "epoch" key) the batches done after the
            # epochs its checkpoint holds.
            name = (checkpoints.folder_name(metrics["epoch"]) if "epoch" in metrics
                    else checkpoints.folder_name(checkpoint["epoch"], metrics["batches"]))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)

    trainer = Trainer(cfg, device=device, dist=dist, report=report, checkpoint_now=stop)
    state = None
    restored = ray.train.get_checkpoint()  # set after a worker failure, or when the run folder has a snapshot
    if restored is not None:
        with restored.as_directory() as folder:
            state = checkpoints.read_folder(folder)
    elif config.get("resume_from"):
        state = checkpoints.read_file(config["resume_from"])
    if state is not None:
        trainer.load_state_dict(state)
    reported["epoch"] = reported["start"] = trainer.state.epoch
    run_worker_hook(trainer, config.get("worker_hook"))
    try:
        trainer.fit()
    except StopRequested:  # every rank, after the same step: return normally, the run ends FINISHED
        return {STOPPED_KEY: stop.reason, "epoch": reported["epoch"]}
    if not config.get("finish"):
        return None
    run_dir = str(config["run_dir"])
    if not paths.is_uri(run_dir):
        return trainer.finish(Path(run_dir))
    with tempfile.TemporaryDirectory(prefix="bmtard-out-") as tmp:
        summary = trainer.finish(Path(tmp))
        if dist.is_main:
            paths.upload_dir(Path(tmp), run_dir)
    return summary


def orphaned_stop(gcs: str, patience_s: float = 5.0) -> None:
    """End this worker when its cluster's GCS has not answered for ``patience_s`` (the head is lost).

    Such a worker would otherwise train on until its node notices (up to a minute), writing checkpoints into
    the run folder after the driver has reported the loss and held the folder to ``--keep-checkpoints``. One
    TCP connection per report (an epoch, or ``checkpoint_every_iters``): microseconds on a live cluster."""
    from bmtard_ray.ray_train.lost import gcs_answers

    deadline = time.monotonic() + patience_s
    while not gcs_answers(gcs, timeout_s=1.0):
        if time.monotonic() > deadline:
            os._exit(1)
        time.sleep(0.5)


def _quiet_ray_train_worker() -> None:
    """Ray 2.60 logs every report's full metrics at INFO through loggers named by file path, which
    ``LoggingConfig(log_level)`` does not reach; the driver's view shows the same numbers once."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    for module in (context, storage):
        for name in (module.__file__, module.__name__):
            logging.getLogger(name).setLevel(logging.WARNING)
