"""Every node that could host a worker is checked before anything of the run is written.

One zero-CPU task pinned to each such node (hard node affinity, as the driver pins its view's queue) runs
:func:`node_problem` there: the data folder and the teacher files the run reads
(:func:`~bmtard_ray.ray_train.node_check.missing_inputs`) and every folder it will write (the run folder on the
storage path, a teacher cache still to fill) by a real write probe that leaves nothing behind
(:func:`~bmtard_ray.launch.preflight.probe_writable`). The first problem found ends the run with one line naming the
node, the path and the reason, before ``config.yaml``, the event files or Ray's storage marker exist, and
without spending a retry on a fault that retrying cannot fix (a worker's own check would, and Ray retries it).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bmtard_ray.config import RunConfig, from_dict, to_dict
from bmtard_ray.errors import BmtardError, CheckpointError, ClusterError, ConfigError, DataError
from bmtard_ray.ray_train.scaling import ScalingOptions

ANSWER_TIMEOUT_S = 180.0   # a node starts a worker process for the task: slow on a busy machine, never minutes
ERRORS: dict[str, type[BmtardError]] = {"DataError": DataError, "CheckpointError": CheckpointError,
                                        "ConfigError": ConfigError, "ClusterError": ClusterError}


def node_problem(cfg_dict: dict[str, Any], writable: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """On a node: (error kind, one line naming this node and the path) for the first thing wrong, else None."""
    from bmtard_ray.launch.preflight import probe_writable
    from bmtard_ray.ray_train.node_check import SHARE_HINT, check_node_inputs, node_label

    label = node_label()
    try:
        check_node_inputs(from_dict(cfg_dict), label)
        for path, what in writable:
            try:
                probe_writable(path, what)
            except ConfigError as exc:
                raise ConfigError(f"{label}: {exc}: {SHARE_HINT}") from None
    except (DataError, CheckpointError, ConfigError) as exc:
        return type(exc).__name__, str(exc)
    return None


def hosts_a_worker(node: dict[str, Any], scaling: ScalingOptions) -> bool:
    """Whether an alive node's total resources hold one of the run's workers."""
    if not node.get("Alive", False):
        return False
    have = node.get("Resources", {})
    need = {"CPU": scaling.cpus_per_worker or 0.0, "GPU": scaling.gpus_per_worker or 0.0}
    return all(have.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v)


def preflight_nodes(cfg: RunConfig, scaling: ScalingOptions, writable: Sequence[tuple[str, str]],
                    timeout_s: float = ANSWER_TIMEOUT_S) -> int:
    """Check every node that could host a worker (Ray is connected); raise the first problem as one line.
    Returns how many nodes were checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if hosts_a_worker(n, scaling))
    task = ray.remote(num_cpus=0, max_retries=0)(node_problem)
    cfg_dict = to_dict(cfg)
    refs = {}
    for node in nodes:
        pinned = task.options(name="bmtard_node_preflight",
                              scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        refs[pinned.remote(cfg_dict, writable)] = node
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    problems = []
    for ref in ready:
        try:
            found = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - the task itself failed there (no Python, no package, ...)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            found = ("ClusterError", f"node {refs[ref]} could not run the run's node check: {first}")
        if found is not None:
            problems.append(found)
    if problems:
        kind, line = sorted(problems, key=lambda p: p[1])[0]
        more = f" (and {len(problems) - 1} more node(s))" if len(problems) > 1 else ""
        raise ERRORS.get(kind, ConfigError)(line + more)
    if pending:
        for ref in pending:
            ray.cancel(ref, force=True)
        silent = ", ".join(refs[r] for r in pending)
        raise ClusterError(f"node(s) {silent} did not answer the run's node check within {timeout_s:g} s: check "
                           "that they are up (`ray status`) and resume or start the run again")
    return len(nodes)
