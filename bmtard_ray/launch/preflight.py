"""Checks every entry point runs before anything starts: the paths it will write, and data that holds a batch.

A write probe creates and deletes one empty file in the nearest folder that exists on the way to a path, so
it finds what a permission guess misses (a read-only mount, root on a read-only filesystem, a path under a
regular file) and leaves nothing behind. Both checks raise :class:`~bmtard_ray.errors.ConfigError`: one line
naming the path or the value, before any teacher is trained, Ray is started or a file is written.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from bmtard_ray.config import RunConfig
from bmtard_ray.data import DataBundle
from bmtard_ray.errors import ConfigError
from bmtard_ray.storage.paths import is_uri


def probe_writable(path: str | os.PathLike[str], what: str) -> None:
    """Refuse a folder ``path`` that cannot be created (or written, if it exists), by a real write probe.

    Cloud URIs are left to their client (a probe there would write an object)."""
    if is_uri(path):
        return
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == target else f"cannot be created: {existing} is a file, not a folder"
        raise ConfigError(f"{what} {target} {where}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".bmtard-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{what} {target} is not writable: {existing} refuses new files ({reason})") from None


def probe_all(paths: Iterable[tuple[str | os.PathLike[str], str]]) -> None:
    for path, what in paths:
        probe_writable(path, what)


def _train_source(cfg: RunConfig, n: int) -> str:
    """Which setting decided the training split's size (the value a user would change)."""
    if cfg.data.train_subset == n:  # the subset, not the split, decided the size
        return f"data.train_subset={cfg.data.train_subset} leaves {n} training image(s)"
    return f"the training split holds {n} image(s) (after data.val_size={cfg.data.val_size})"


def check_batches(cfg: RunConfig, data: DataBundle, teacher_roles: Iterable[str] = (), workers: int = 1) -> None:
    """Every split and subset a run uses holds at least one batch (training drops the incomplete last batch,
    so a training split smaller than one batch would train on nothing and report NaN).

    ``teacher_roles``: the teachers this run will train on the same training split; ``workers``: Ray Train
    workers that each take ``batch / workers`` images per step from ``1 / workers`` of the split."""
    n = len(data.train)
    per_worker = n // workers
    needs = [("optim.batch_size", cfg.optim.batch_size)]
    needs += [(f"teachers.{role}.batch_size", getattr(cfg.teachers, role).batch_size) for role in teacher_roles]
    for key, batch in needs:
        if per_worker < max(batch // workers, 1):
            spread = f" over {workers} workers" if workers > 1 else ""
            raise ConfigError(f"{_train_source(cfg, n)}, less than one batch of {key}={batch}{spread}: raise the "
                              f"subset or lower {key}")
    if cfg.data.val_size > 0 and len(data.val) == 0:
        raise ConfigError(f"data.val_size={cfg.data.val_size} gives an empty validation split")
    if len(data.test) == 0:
        raise ConfigError(f"data.test_subset={cfg.data.test_subset} leaves no test images")
