"""What a node must hold before its worker takes a step: the data folder and the teacher files.

The driver checks them on its own node; on a multi-node cluster a worker lands on another node, where the
same paths may not exist (a data folder copied to the head only, a teacher cache on the head's local disk).
Without this check the worker fails deep inside loading with a traceback, or, with retries, seems to hang.
It runs on every worker at start-up and raises a one-line error naming the node and the path, which the
driver finds through Ray's wrappers (:func:`bmtard_ray.ray_train.driver.user_error`).
"""
from __future__ import annotations

import os
from pathlib import Path

from bmtard_ray.config import RunConfig
from bmtard_ray.data import dataset_folder
from bmtard_ray.errors import CheckpointError, DataError
from bmtard_ray.models.files import PYAUTOATTACK
from bmtard_ray.names import teacher_roles

SHARE_HINT = "every node needs the same path: put it on a shared filesystem or copy it to each node"


def node_label() -> str:
    """This process's Ray node, as the dashboard and `ray list nodes` show it (id and IP)."""
    import ray

    ctx = ray.get_runtime_context()
    from ray.util import get_node_ip_address

    return f"node {ctx.get_node_id()} ({get_node_ip_address()})"


def missing_inputs(cfg: RunConfig) -> list[tuple[str, Path]]:
    """What of the run's inputs this process cannot read: (what, path) pairs, data folder first."""
    missing: list[tuple[str, Path]] = []
    folder = dataset_folder(cfg.data.dataset, Path(cfg.data.root))
    readable = folder.is_file() and os.access(folder, os.R_OK) if cfg.data.dataset == "npz" and folder.is_file() \
        else folder.is_dir() and os.access(folder, os.R_OK | os.X_OK)  # npz: a file, or a folder holding one
    if not readable and not cfg.data.download:
        missing.append(("data folder", folder))
    for role in teacher_roles(cfg.method.name):
        path = getattr(cfg.teachers, role).checkpoint
        if path and path != PYAUTOATTACK and not (Path(path).is_file() and os.access(path, os.R_OK)):
            missing.append((f"{role} teacher file", Path(path)))
    return missing


def check_node_inputs(cfg: RunConfig, label: str | None = None) -> None:
    """Raise DataError (data) or CheckpointError (teacher) naming this node and the first missing path."""
    missing = missing_inputs(cfg)
    if not missing:
        return
    what, path = missing[0]
    error = DataError if what == "data folder" else CheckpointError
    raise error(f"{label or node_label()} cannot read the {what} {path}: {SHARE_HINT}")
