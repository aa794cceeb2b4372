"""Training a missing teacher as Ray work, on a node of the cluster that has the resources for it.

Under ``ray job submit`` the search's driver runs on the head node, which may have no GPU (or few CPUs);
training a WRN-34-10 teacher there, in the driver process, would be slow or impossible. So each missing
teacher is one Ray task that reserves what one trial worker reserves (``--cpus-per-worker`` and
``--gpus-per-worker``) and runs the in-process trainer wherever Ray finds those resources. The task writes
into the teacher cache, which must therefore be a path every node shares (the README's "Multi-node").
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from rich.console import Console

from bmtard_ray.config import RunConfig, from_dict, to_dict
from bmtard_ray.errors import BmtardError, CheckpointError
from bmtard_ray.launch.local import run_local
from bmtard_ray.ray_train.node_check import SHARE_HINT, check_node_inputs, node_label
from bmtard_ray.storage.run_folder import absolute_paths


def _train_teacher(cfg_dict: dict[str, Any]) -> str:
    """The task body: check this node's inputs, train the teacher in this process, return where it ran."""
    cfg = from_dict(cfg_dict)
    check_node_inputs(cfg)
    run_local(cfg, overwrite=True, console=Console(quiet=True))
    return node_label()


def train_teacher_on_cluster(tcfg: RunConfig, *, cpus: float, gpus: float,
                             log: Callable[[str], None] = print) -> str:
    """Train one teacher as a Ray task (``cpus`` / ``gpus`` reserved) and wait for it; returns the node's label.

    The model file must then be readable here too (the trials on every node load it): a cache the task's
    node wrote but this driver cannot see is refused with one line."""
    cfg = absolute_paths(tcfg)
    task = ray.remote(_train_teacher).options(num_cpus=cpus, num_gpus=gpus, max_retries=0,
                                              name=f"train_teacher:{cfg.name}")
    try:
        where = ray.get(task.remote(to_dict(cfg)))
    except ray.exceptions.RayTaskError as exc:
        # A user error on that node (say, its data folder is missing) stays one line: Ray's wrapper would
        # print the task's whole traceback.
        if isinstance(exc.cause, BmtardError):
            raise type(exc.cause)(str(exc.cause)) from None
        raise
    model = Path(cfg.output_dir) / cfg.name / "model.pt"
    if not model.is_file():  # trained on a node whose cache this driver does not see
        raise CheckpointError(f"the teacher trained on {where} wrote {model}, which this driver cannot read: "
                              f"{SHARE_HINT}")
    log(f"  trained on {where}")
    return where
