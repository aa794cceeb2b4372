"""Run folders: where a run's files live, local or behind a URI, and how an existing one is treated.

Shared by the in-process runner and the Ray Train layer, so both agree on what a run folder holds, when
one may be reused, and which checkpoint continues it. Paths may be local or cloud URIs (``s3://``,
``gs://``; read and written through ``pyarrow.fs``). No Ray import: Ray's snapshot is read as JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from bmtard_ray import io
from bmtard_ray.config import CONFIG_FORMAT, RunConfig, from_dict, to_dict
from bmtard_ray.errors import CheckpointError, ConfigError
from bmtard_ray.names import is_robustbench

CHECKPOINT_FILE = "checkpoint.pt"          # one full training state (ours, local or inside a Ray checkpoint)
CHECKPOINT_FORMAT = "bmtard_ray.checkpoint/1"
# Written by Ray Train into every run folder; its presence means "Ray will resume from here".
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
CHECKPOINT_DIR = "checkpoint_epoch{:04d}"   # one Ray checkpoint folder per checkpointed epoch


def checkpoint_dir_name(epochs_done: int, batches: int = 0) -> str:
    """The Ray checkpoint folder after ``epochs_done`` epochs and ``batches`` batches of the next one (a
    mid-epoch checkpoint): names sort in training order (checkpoint_epoch0002 < checkpoint_epoch0002_batch00050
    < checkpoint_epoch0003)."""
    name = CHECKPOINT_DIR.format(epochs_done)
    return f"{name}_batch{batches:05d}" if batches else name


def is_uri(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy with every file path absolute: Ray workers (and Tune trials) run in another directory."""
    out = from_dict(to_dict(cfg))

    def fix(p: str | None) -> str | None:
        if not p or is_uri(p) or p == "pyautoattack" or is_robustbench(p):  # names, not paths
            return p
        return str(Path(p).expanduser().resolve())

    out.data.root = fix(out.data.root)
    out.output_dir = fix(out.output_dir)
    out.teachers.cache_dir = fix(out.teachers.cache_dir)
    out.teachers.model_dir = fix(out.teachers.model_dir)
    out.teachers.logit_cache = fix(out.teachers.logit_cache)
    for role in ("clean", "robust"):
        tc = getattr(out.teachers, role)
        tc.checkpoint = fix(tc.checkpoint)
    return out


def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs

    if not is_uri(uri):  # pyarrow takes local paths only when absolute
        uri = str(Path(uri).expanduser().resolve())
    return pyarrow.fs.FileSystem.from_uri(uri)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def latest_ray_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint folder Ray recorded in a run folder's snapshot (None if none)."""
    snap = join(run_dir, RAY_SNAPSHOT)
    if not exists(snap):
        return None
    fs, path = _fs(snap)
    with fs.open_input_stream(path) as f:
        state = json.loads(f.read().decode())
    latest = state.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return join(run_dir, name) if name else None


def write_text(run_dir: str, name: str, text: str) -> None:
    if not is_uri(run_dir):
        io.atomic_text(text, Path(run_dir) / name)
        return
    fs, path = _fs(run_dir)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(text.encode())


def write_config(cfg: RunConfig, run_dir: str | Path) -> None:
    write_text(str(run_dir), "config.yaml", yaml.safe_dump({"format": CONFIG_FORMAT, **to_dict(cfg)}, sort_keys=False))


def upload_dir(local: Path, run_dir: str) -> None:
    import pyarrow.fs

    fs, path = _fs(run_dir)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)


def remove_run(run_dir: str) -> None:
    fs, path = _fs(run_dir)
    fs.delete_dir(path)


def check_run_folder(run_dir: str, *, resume: bool, overwrite: bool) -> None:
    """Never clobber, and never silently continue, a run of the same name (Ray would resume it).

    ``overwrite`` removes the old run (else Ray Train would restore it from its snapshot)."""
    if resume or not exists(run_dir):
        return
    held = [n for n in ("model.pt", CHECKPOINT_FILE, RAY_SNAPSHOT) if exists(join(run_dir, n))]
    if not held:
        return
    if overwrite:
        remove_run(run_dir)
        return
    raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                      "or --name to start another")


def find_checkpoint(path: str | Path) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file, or a one-line error.

    A folder written through Ray Train keeps its checkpoints in ``checkpoint_epochNNNN/checkpoint.pt``;
    the newest file (of those and a local ``checkpoint.pt``) is the one to continue from."""
    p = Path(path)
    if p.is_dir():
        found = [f for f in (p / CHECKPOINT_FILE, *p.glob(f"checkpoint_epoch*/{CHECKPOINT_FILE}")) if f.is_file()]
        p = max(found, key=lambda f: f.stat().st_mtime) if found else p / CHECKPOINT_FILE
    if not p.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path} (expected a run folder holding {CHECKPOINT_FILE} "
                              "or the file itself)")
    return p


def run_dir_of_checkpoint(checkpoint: Path) -> Path:
    """The run folder a checkpoint file belongs to (one level up for Ray Train's checkpoint folders)."""
    parent = checkpoint.parent
    return parent.parent if parent.name.startswith("checkpoint_epoch") else parent


def check_checkpoint_format(state: Any, path: str | Path) -> None:
    """One line for a file that is not one of our training checkpoints, or one of another format version."""
    found = state.get("format") if isinstance(state, dict) else None
    if isinstance(found, str) and found.startswith("bmtard_ray.checkpoint/") and found != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a training checkpoint of format {found}; this version reads "
                              f"{CHECKPOINT_FORMAT} and cannot continue it")
    if found != CHECKPOINT_FORMAT or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path} is not a bmtard_ray training checkpoint")


def load_resume_state(path: str | Path) -> tuple[dict[str, Any], RunConfig]:
    file = find_checkpoint(path)
    state = io.safe_load(file)
    check_checkpoint_format(state, file)
    return state, from_dict(state["config"])


def resumable(run_dir: str | Path) -> bool:
    """Whether an interrupted run left a checkpoint in ``run_dir`` that ``--resume`` can continue."""
    run_dir = str(run_dir)
    if is_uri(run_dir):
        return latest_ray_checkpoint(run_dir) is not None
    try:
        find_checkpoint(run_dir)
        return True
    except CheckpointError:
        return False
