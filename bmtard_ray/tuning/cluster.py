"""Ray for a tuning run: join a cluster or start a private instance, and what it has to offer."""
from __future__ import annotations

import os
import time

import ray

from bmtard_ray.errors import ConfigError
from bmtard_ray.ray_train import start_local_ray, stop_local_ray


def init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to a cluster (``--address``, or RAY_ADDRESS as under ``ray job submit``) or start a private one
    (:func:`bmtard_ray.ray_train.start_local_ray`: one that Ray Train's clean-up of a trial that ASHA stopped
    can find; without it a stopped trial's CPUs stay reserved and the next trials wait forever). True when
    this call started Ray here (call :func:`shutdown_ray` at the end)."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        if num_cpus is not None:
            raise ConfigError("--num-cpus sizes a Ray instance started here; it cannot resize the cluster at "
                              f"{address or os.environ['RAY_ADDRESS']}")
        ray.init(address=address or None)
        return False
    start_local_ray(num_cpus=num_cpus)
    return True


def shutdown_ray(started: bool) -> None:
    """Stop the Ray instance :func:`init_ray` started (a joined cluster is left alone)."""
    if started:
        stop_local_ray()


def local_resources(address: str | None, num_cpus: int | None) -> dict[str, float] | None:
    """What a Ray instance started here will have (None when joining a cluster: ask it after connecting)."""
    if address or os.environ.get("RAY_ADDRESS"):
        return None
    import torch

    return {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def cluster_resources(wait_s: float = 30.0) -> dict[str, float]:
    """``ray.cluster_resources()``, waiting briefly for the node(s) to register their CPUs."""
    deadline = time.monotonic() + wait_s
    while True:
        res = ray.cluster_resources()
        if res.get("CPU", 0) > 0 or time.monotonic() > deadline:
            return res
        time.sleep(0.5)
