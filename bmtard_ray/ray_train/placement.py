"""How long a run waits for its workers to be placed, its failure budget, and the one line it ends with
when the cluster cannot place its workers in time.

Mechanism (Ray 2.60, Train V2). The controller waits for a worker group's placement group for at most
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (that wait only: ``worker_group.py`` ``pg_handle.wait``), then
raises ``WorkerGroupStartupTimeoutError``, which the default failure policy charges to
``FailureConfig.controller_failure_limit``, by default -1: retry forever. That retry loop is why a fixed
run on a cluster that lost a node used to wait forever. A **fixed** run therefore sets the timeout to
``--wait-for-workers`` and the limit to 0: the first placement that times out ends the run inside Ray, the
controller shuts its worker group down itself, and ``fit()`` raises a ``ControllerError`` that is turned
into one line here. (A driver-side watchdog would have to read the controller's state and kill its actor:
more moving parts for the same result.) The cost: a worker actor that fails to *start* on a placed group
(``WorkerGroupStartupFailedError``, the other retryable controller error) also ends a fixed run.

An **elastic** run keeps Ray's defaults: there a start timeout is the normal way out of the autoscaling
coordinator's stale node view (up to ~20 s after a node loss it may still count the dead node); the next
decision picks a size that fits. Ray only sizes an elastic group with what the cluster holds, so it never
waits on a placement it cannot get, but it does wait (without a deadline) while fewer than its minimum fit.

Ray reads the variable in the controller process, which inherits it from the driver's environment only if
it is set before ``fit()`` (``get_env_vars_to_propagate``): :func:`placement_deadline` wraps the fit.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ray.train import FailureConfig

from bmtard_ray.errors import ClusterError, find_cause
from bmtard_ray.ray_train.scaling import ScalingOptions

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def failure_config(scaling: ScalingOptions, failure_max: int) -> FailureConfig:
    """``failure_max`` (--max-failures) worker-group failures (a dead worker, a lost node: elastic or not,
    Ray charges a node death to ``max_failures``) are retried from the last checkpoint; preemptions keep
    Ray's separate unlimited budget. A fixed run ends at its first placement timeout (see the module)."""
    if scaling.elastic:
        return FailureConfig(max_failures=failure_max)
    return FailureConfig(max_failures=failure_max, controller_failure_limit=0)


@contextmanager
def placement_deadline(scaling: ScalingOptions) -> Iterator[None]:
    """Around ``fit()`` on the driver: a fixed run's placement timeout is ``scaling.wait_for_workers_s``."""
    if scaling.elastic:
        yield
        return
    saved = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = f"{scaling.wait_for_workers_s:g}"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = saved


def placeable_workers(scaling: ScalingOptions) -> int:
    """How many of this run's workers the cluster's *free* resources hold now, node by node."""
    from ray._private.state import available_resources_per_node

    need = {"CPU": scaling.cpus_per_worker or 1.0}
    if scaling.gpus_per_worker:
        need["GPU"] = scaling.gpus_per_worker
    free = available_resources_per_node().values()
    return sum(int(min(math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in need.items())) for have in free)


def _startup_timeout(exc: BaseException) -> bool:
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return find_cause(exc, WorkerGroupStartupTimeoutError) is not None


def not_placed(exc: BaseException, scaling: ScalingOptions) -> ClusterError | None:
    """The one-line error for a fixed run whose workers could not be placed in time (None for any other)."""
    if scaling.elastic or not _startup_timeout(exc):
        return None
    try:
        could = f"could place only {min(placeable_workers(scaling), scaling.max_workers - 1)}"
    except Exception:  # the cluster went away meanwhile: say what is known
        could = "could not place all"
    gpus = f" and {scaling.gpus_per_worker:g} GPU" if scaling.gpus_per_worker else ""
    want = f"{scaling.cpus_per_worker:g} CPU{gpus}"
    return ClusterError(f"the Ray cluster {could} of the {scaling.num_workers} workers ({want} each) this run needs "
                        f"within {scaling.wait_for_workers_s:g} s (--wait-for-workers): free resources or add nodes "
                        f"and resume the run, or give an elastic range such as --workers 1-{scaling.num_workers}")
