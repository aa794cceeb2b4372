"""A real multi-node Ray cluster on this machine, for the tests (as Ray's own multi-node tests build one).

Each node is its own raylet with its own resources, started by ``ray.cluster_utils.Cluster``; every node
shares this machine's IP address, so the tests tell nodes apart by node id. A node that lacks a folder is a
``ray start`` raylet in its own mount namespace (``unshare -m``) with an empty tmpfs over that folder: the folder is
really missing for every process of that node, and nowhere else. Everything here is stopped by the
fixture that started it (a process by its id, never ``ray stop``, which would stop every Ray here).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import free_port


def node_ports() -> dict[str, int]:
    """Free ports for every listener of one node (the defaults clash with other Rays on this machine)."""
    return {"node_manager_port": free_port(), "object_manager_port": free_port(),
            "dashboard_agent_listen_port": free_port(), "metrics_agent_port": free_port(),
            "metrics_export_port": free_port(), "runtime_env_agent_port": free_port()}


@contextmanager
def local_cluster(*nodes: dict[str, Any], connect: bool = True) -> Iterator[Any]:
    """A Cluster whose first node is the head (with the dashboard: the State API lives there), the driver
    connected to it, RAY_ADDRESS pointing at it (Ray Train's helpers find the cluster through it).

    ``connect=False``: this process stays out of it (a test that kills the head must not be connected: Ray
    ends a process whose GCS stays away, and that would be pytest)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # A temp dir of our own: this cluster does not become "the latest" one other processes here would join.
    temp_dir = tempfile.mkdtemp(prefix="raymn", dir="/tmp")
    # The nodes take the machine's address (Ray's choice): a head on 127.0.0.1 advertises its GCS on the
    # machine's address and the driver then never reaches it.
    head = {"num_cpus": 1, "temp_dir": temp_dir, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": free_port(), "ray_client_server_port": free_port(),
            **node_ports(), **nodes[0]}
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS",)}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.bmtard_temp_dir = temp_dir  # for add_node below
    try:
        for extra in nodes[1:]:
            add_node(cluster, **extra)
        cluster.wait_for_nodes()
        os.environ["RAY_ADDRESS"] = cluster.address
        if connect:
            ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)  # the nodes' sessions and logs
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def add_node(cluster: Any, **extra: Any) -> Any:
    """One more node (1 CPU unless ``extra`` says otherwise) in a :func:`local_cluster`; waits until it is up."""
    node = cluster.add_node(**{"num_cpus": 1, "temp_dir": cluster.bmtard_temp_dir, **node_ports(), **extra})
    cluster.wait_for_nodes()
    return node


@contextmanager
def node_without(folder: Path, gcs_address: str, log: Path, resources: dict[str, float],
                 read_only: bool = False) -> Iterator[subprocess.Popen]:
    """Join ``gcs_address`` with one more 1-CPU node on which ``folder`` is an empty tmpfs (its own mount
    namespace; ``read_only``: mounted read-only), until the block ends; the node is stopped by its process
    group id."""
    import ray

    ray_cli = Path(sys.executable).parent / "ray"
    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    flags = ["--address", gcs_address, "--block", "--num-cpus", "1",
             "--resources", json.dumps(resources), "--disable-usage-stats",
             "--node-manager-port", free_port(), "--object-manager-port", free_port(),
             "--dashboard-agent-listen-port", free_port(), "--dashboard-agent-grpc-port", free_port(),
             "--metrics-export-port", free_port(), "--runtime-env-agent-port", free_port()]
    options = "-o ro " if read_only else ""
    script = (f"mount -t tmpfs {options}bmtard-empty {shlex.quote(str(folder))} "
              f"&& exec {shlex.quote(str(ray_cli))} start " + " ".join(shlex.quote(str(f)) for f in flags))
    out = open(log, "w")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script], stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ({n["NodeID"] for n in ray.nodes() if n["Alive"]} - before):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the node without the folder did not join"
            time.sleep(1)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        out.close()


def train_worker_nodes(since: set[str] = frozenset()) -> dict[str, str]:
    """Ray Train workers (actor id -> node id) the cluster's State API knows, dead ones included."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000, raise_on_missing_output=False)
    return {a.actor_id: a.node_id for a in actors if a.actor_id not in since}


def alive_train_worker_nodes() -> list[str]:
    """The node id of every Ray Train worker alive now (one entry per worker)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], limit=1000,
                         raise_on_missing_output=False)
    return [a.node_id for a in actors]


def kill_head(cluster: Any) -> list[int]:
    """SIGKILL the head node's GCS server and raylet (by process id): the head is lost as if its machine went.
    Returns the process ids killed."""
    from ray._private import ray_constants

    killed = []
    for kind in (ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET):
        for info in cluster.head_node.all_processes.get(kind, []):
            try:
                os.kill(info.process.pid, signal.SIGKILL)
                killed.append(info.process.pid)
            except ProcessLookupError:
                pass
    return killed
