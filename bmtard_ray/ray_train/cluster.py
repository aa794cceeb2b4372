"""Joining a Ray cluster or starting a private one, and what the cluster can give (Train and Tune alike)."""
from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import ray

from bmtard_ray.errors import ConfigError
from bmtard_ray.ray_train.scaling import ScalingOptions


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ray.init on a dead address retries for minutes: try a TCP connection first."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"address {address} is a dashboard / job-server URL; give the cluster's GCS address "
                          "(host:6379) or submit the run with `ray job submit --address " + address + "`")
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"cluster address '{address}' must look like host:port (or ray://host:port, or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
                          "`ray start --head` or fix --address / RAY_ADDRESS") from None


_STARTED_ENV: dict[str, str | None] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def start_local_ray(**init: Any) -> None:
    """Start a private Ray instance on this machine that Ray Train's own helpers can find.

    ``address="local"``: plain ``ray.init()`` would silently join a cluster someone else started here with
    ``ray start``. Ray Train V2's placement-group cleaner and state actor ask the State API (served by the
    dashboard, so it is kept) about the run's controller; they look "their" cluster up through RAY_ADDRESS,
    else through the last cluster recorded in /tmp/ray, which may be a dead one (a crashed or stopped
    instance) and then they time out with tracebacks, and a stopped trial's resources are never freed.
    So the instance gets a known GCS port and every process it starts inherits RAY_ADDRESS pointing at it.
    """
    from ray._private.services import get_node_ip_address

    port = free_port()
    env = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{get_node_ip_address()}:{port}"}
    _STARTED_ENV.update({k: os.environ.get(k) for k in env})
    os.environ.update(env)  # before ray.init: the raylet and every worker inherit it
    try:
        ray.init(address="local", include_dashboard=True, **init)
    except BaseException:
        _restore_env()
        raise


def _restore_env() -> None:
    for key, value in _STARTED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _STARTED_ENV.clear()


def stop_local_ray() -> None:
    """Stop what :func:`start_local_ray` started and restore the environment."""
    ray.shutdown()
    _restore_env()


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: ``--address``, else RAY_ADDRESS (as under ``ray job submit``), else None."""
    return address or os.environ.get("RAY_ADDRESS") or None


def join_cluster(target: str) -> None:
    """The one way into an existing cluster, for run_train.py and run_tune.py alike: a TCP check first (a
    dead address otherwise retries for minutes), then ``ray.init``; what goes wrong is one line."""
    check_reachable(target)
    from bmtard_ray.ray_train.lost import bound_gcs_wait

    bound_gcs_wait()  # a head that dies later must not hold this driver for Ray's default minute
    try:
        # Joining a cluster: its resources are what they are, so no counts are passed. Workers' output stays
        # in the cluster's logs (and a failed worker's text in the run's error log): the driver prints the
        # one-line cause, not every worker's traceback.
        ray.init(address=target, log_to_driver=False)
    except (ConnectionError, TimeoutError) as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {target}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # AuthenticationError and friends: one line, with the usual fix
        if type(exc).__name__ == "AuthenticationError":
            raise ConfigError(f"the Ray cluster at {target} refused the connection (token authentication): set "
                              "RAY_AUTH_MODE=token and make its token available (~/.ray/auth_token or "
                              "RAY_AUTH_TOKEN)") from None
        raise


def connect(address: str | None = None, **local_init: Any) -> bool:
    """Join ``address`` (or RAY_ADDRESS, as under ``ray job submit``) or start a local Ray with this
    machine's resources. Returns True when this call started the connection (the caller shuts it down).
    An existing connection (tests, a Tune trial) is reused as is."""
    if ray.is_initialized():
        return False
    target = cluster_address(address)
    if target:
        join_cluster(target)
        return True
    # Ray Train keeps its state (served as JSON at the dashboard's /api/train/v2/runs/v1; Ray 2.60 has no
    # Train page) only with this flag, set in the driver before the trainer is built.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    # The driver's live view is fed by a queue, not by worker output; what workers and Ray's own
    # actors print (deprecation notes, internal warnings) stays in the session's log folder.
    start_local_ray(**{"log_to_driver": False, **local_init})
    return True


def check_resources(scaling: ScalingOptions, nodes: Sequence[dict[str, Any]] | None = None) -> None:
    """Refuse a request that no node set of this cluster can ever hold (Ray would wait forever).

    Counts, per alive node, how many workers fit in its *total* resources (not what is free now). An elastic
    run needs its minimum to fit (it runs with what fits, up to its maximum)."""
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive", True)]
    need = {"CPU": scaling.cpus_per_worker}
    if scaling.gpus_per_worker:
        need["GPU"] = scaling.gpus_per_worker
    fit = 0
    for node in nodes:
        have = node.get("Resources", {})
        fit += int(min(math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in need.items()))
    if fit >= scaling.min_workers:
        return
    total = {k: sum(n.get("Resources", {}).get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    want = " and ".join(f"{v:g} {k}" for k, v in need.items())
    count = f"at least {scaling.min_workers}" if scaling.elastic else str(scaling.num_workers)
    raise ConfigError(f"{count} workers with {want} each do not fit on this Ray cluster "
                      f"({len(nodes)} node(s), {total['CPU']:g} CPUs, {total['GPU']:g} GPUs in all; at most {fit} "
                      "such workers): lower --workers, --cpus-per-worker or --gpus-per-worker")


# ---------------------------------------------------------------------------------------------------------
# Tune's way in: a private instance sized by --num-cpus, or the cluster given.


def init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Join a cluster (:func:`join_cluster`: ``--address``, or RAY_ADDRESS as under ``ray job submit``) or
    start a private one (:func:`start_local_ray`: one that Ray Train's clean-up of a trial that ASHA stopped
    can find; without it a stopped trial's CPUs stay reserved and the next trials wait forever). True when
    this call started Ray here (call :func:`shutdown_ray` at the end)."""
    if ray.is_initialized():
        return False
    target = cluster_address(address)
    if target:
        if num_cpus is not None:
            raise ConfigError(f"--num-cpus sizes a Ray instance started here; it cannot resize the cluster at {target}")
        join_cluster(target)
        return False
    # Ray Train's state (the trials' runs and workers, /api/train/v2/runs/v1 on the dashboard) is kept only with
    # this flag, read by each trial's Train controller: they inherit it from the instance started here.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    start_local_ray(num_cpus=num_cpus)
    return True


def dashboard_url() -> str | None:
    """The connected cluster's dashboard as http://host:port (None when it runs none)."""
    # ray.init on a connected driver only returns the context (Ray's documented way to the dashboard URL).
    url = ray.init(ignore_reinit_error=True).address_info.get("webui_url")
    if not url:
        return None
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


def identity() -> tuple[str, str]:
    """The connected cluster's session name (unique: its start time and a pid) and GCS address."""
    ctx = ray.get_runtime_context()
    return ctx.get_session_name(), ctx.gcs_address


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
