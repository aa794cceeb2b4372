"""Faults injected into Ray Train workers by the tests, through the worker hook (never by product code).

Loaded on every worker by :func:`bmtard_ray.ray_train.worker.run_worker_hook` from this file's path, so it
needs no import path of its own on the workers.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch


def fail_once(trainer: Any, *, epoch: int, marker: str, rank: int = 0, mode: str = "exit", after_steps: int = 1,
              delay_s: float = 0.0) -> None:
    """Make one worker die in the middle of ``epoch``, once (a marker file every attempt sees records that
    it fired). ``mode`` 'exit' kills the process like a lost node; 'raise' raises in the training function.
    ``delay_s`` waits before failing (the other ranks block in their next collective meanwhile), so the
    Train controller has polled the previous epoch's report: a report is registered only once every
    worker's copy of it has been polled."""
    if trainer.dist.rank != int(rank) or Path(marker).exists():
        return
    step = trainer.method.step
    seen = {"n": 0}

    def failing_step(x: torch.Tensor, y: torch.Tensor) -> Any:
        if trainer.state.epoch + 1 == int(epoch):
            seen["n"] += 1
            if seen["n"] > int(after_steps):
                Path(marker).write_text(f"fired in epoch {epoch}\n")
                time.sleep(float(delay_s))
                if mode == "exit":
                    os._exit(1)
                raise RuntimeError(f"injected failure in epoch {epoch}")
        return step(x, y)

    trainer.method.step = failing_step


def lose_node_mid_epoch(trainer: Any, *, epoch: int, after_steps: int, marker: str, hold: str,
                        slow_s: float) -> None:
    """For a test that removes a node from under an elastic run. On the first attempt (no ``marker`` yet)
    rank 0 writes ``marker`` after ``after_steps`` steps of ``epoch`` and then waits there (every other rank
    blocks in its next collective) while the test removes a node. On any attempt with one worker, each step
    sleeps ``slow_s`` as long as the file ``hold`` exists, so that the run is still going when the test
    brings a node back and it grows again."""
    first = not Path(marker).exists()
    step = trainer.method.step
    seen = {"n": 0}

    def paced_step(x: torch.Tensor, y: torch.Tensor) -> Any:
        if first and trainer.dist.rank == 0 and trainer.state.epoch + 1 == int(epoch):
            seen["n"] += 1
            if seen["n"] == int(after_steps) + 1:
                Path(marker).write_text(f"paused in epoch {epoch} after {after_steps} steps\n")
                time.sleep(120.0)  # the group is torn down long before this ends
        if trainer.dist.world_size == 1 and Path(hold).exists():
            time.sleep(float(slow_s))
        return step(x, y)

    trainer.method.step = paced_step


def record_start(trainer: Any, *, path: str, slow_s: float = 0.0) -> None:
    """Rank 0 appends where each attempt of the run starts (world size, epochs done, batches of the next)
    to the file ``path``, one JSON line per attempt; every step then sleeps ``slow_s`` (so that a test has
    time to act while the run trains)."""
    import json

    if trainer.dist.rank == 0:
        part = trainer.state.partial
        start = {"world_size": trainer.dist.world_size, "epoch": trainer.state.epoch,
                 "batches": part.batches if part is not None else 0}
        with open(path, "a") as f:
            f.write(json.dumps(start) + "\n")
    step = trainer.method.step

    def paced_step(x: torch.Tensor, y: torch.Tensor) -> Any:
        time.sleep(float(slow_s))
        return step(x, y)

    trainer.method.step = paced_step


def request_stop(trainer: Any, *, epoch: int, name: str, namespace: str | None) -> None:
    """Rank 0 asks the run's stop signal (the named actor of bmtard_ray.ray_train.stop) to stop right after
    reporting ``epoch``, as a Tune trial does when ASHA stops it on that report; the other ranks learn it
    only from the workers' agreement."""
    if trainer.dist.rank != 0:
        return
    report = trainer.report

    def report_then_stop(metrics: dict[str, Any], checkpoint: Any) -> None:
        report(metrics, checkpoint)
        if metrics.get("epoch") == int(epoch):
            import ray

            ray.get(ray.get_actor(name, namespace=namespace).request.remote("test"))

    trainer.report = report_then_stop


def hook(function: str, **kwargs: Any) -> dict[str, Any]:
    """The ``worker_hook`` argument of ``run_ray`` that calls ``function`` of this file with ``kwargs``."""
    return {"file": str(Path(__file__).resolve()), "function": function, "kwargs": kwargs}
