"""Ray for a tuning run: join a cluster or start a private instance, and what it has to offer."""
from __future__ import annotations

import os
import socket
import time

import ray

from bmtard_ray.errors import ConfigError

_STARTED_ENV: dict[str, str | None] = {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to a cluster (``--address``, or RAY_ADDRESS as under ``ray job submit``) or start a private one;
    True when this call started Ray here (call :func:`shutdown_ray` at the end).

    A private instance (``address="local"``: plain ``ray.init()`` would silently join a cluster someone else
    started on this machine with ``ray start``) keeps its dashboard: Ray Train V2 frees the workers of a
    trial that ASHA stopped through a placement-group cleaner that asks the State API (served by the
    dashboard) whether the trial's Train controller is still alive. That cleaner finds "its" cluster by
    RAY_ADDRESS or by scanning the machine, and gives up when it sees more than one Ray instance; so the
    instance gets a known GCS port and every process it starts inherits RAY_ADDRESS pointing at it.
    Without this a stopped trial's CPUs stay reserved and the next trials wait for them forever.
    """
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        if num_cpus is not None:
            raise ConfigError("--num-cpus sizes a Ray instance started here; it cannot resize the cluster at "
                              f"{address or os.environ['RAY_ADDRESS']}")
        ray.init(address=address or None)
        return False
    from ray._private.services import get_node_ip_address

    port = _free_port()
    env = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{get_node_ip_address()}:{port}"}
    _STARTED_ENV.update({k: os.environ.get(k) for k in env})
    os.environ.update(env)  # before ray.init: the raylet and every worker inherit it
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True)
    except BaseException:
        _restore_env()
        raise
    return True


def _restore_env() -> None:
    for key, value in _STARTED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _STARTED_ENV.clear()


def shutdown_ray(started: bool) -> None:
    """Stop the Ray instance :func:`init_ray` started (a joined cluster is left alone)."""
    if started:
        ray.shutdown()
        _restore_env()


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
