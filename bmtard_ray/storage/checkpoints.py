"""Training checkpoints, in one place: their file and folder names, format version, writing, reading, and
finding the one a run continues from.

A checkpoint is one file, :data:`FILE`, holding the trainer's full state (a dict stamped with
:data:`FORMAT`; :meth:`bmtard_ray.training.trainer.Trainer.state_dict` builds it). A run in this process
(``--local``) keeps it in its run folder; a run through Ray Train keeps one per checkpoint folder
(:func:`folder_name`, ``checkpoint_epochNNNN/``), and Ray records the newest in :data:`RAY_SNAPSHOT`.
Paths may be local or URIs (Ray's snapshot only; see :mod:`bmtard_ray.storage.paths`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from bmtard_ray.config import RunConfig, from_dict
from bmtard_ray.errors import CheckpointError
from bmtard_ray.runtime import fileio
from bmtard_ray.storage.paths import exists, filesystem, is_uri, join

FILE = "checkpoint.pt"                      # one full training state (local, or inside a Ray checkpoint folder)
FORMAT = "bmtard_ray.checkpoint/1"          # the version this code writes and reads
FORMAT_FAMILY = "bmtard_ray.checkpoint/"    # every version's prefix
# Written by Ray Train into every run folder; its presence means "Ray will resume from here".
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
FOLDER_PREFIX = "checkpoint_epoch"          # Ray checkpoint folders: checkpoint_epochNNNN[_batchBBBBB]


def folder_name(epochs_done: int, batches: int = 0) -> str:
    """The Ray checkpoint folder after ``epochs_done`` epochs and ``batches`` batches of the next one (a
    mid-epoch checkpoint): names sort in training order (checkpoint_epoch0002 < checkpoint_epoch0002_batch00050
    < checkpoint_epoch0003)."""
    name = f"{FOLDER_PREFIX}{epochs_done:04d}"
    return f"{name}_batch{batches:05d}" if batches else name


def is_folder(path: Path) -> bool:
    """Whether ``path`` is (named as) one of Ray's checkpoint folders of a run."""
    return path.name.startswith(FOLDER_PREFIX)


# --- format ----------------------------------------------------------------------------------------------
def check_format(state: Any, path: str | Path) -> None:
    """One line for a file that is not one of our training checkpoints, or one of another format version."""
    found = state.get("format") if isinstance(state, dict) else None
    if isinstance(found, str) and found.startswith(FORMAT_FAMILY) and found != FORMAT:
        raise CheckpointError(f"{path} is a training checkpoint of format {found}; this version reads "
                              f"{FORMAT} and cannot continue it")
    if found != FORMAT or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path} is not a bmtard_ray training checkpoint")


def is_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is a training checkpoint of this version."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT and isinstance(obj.get("config"), dict)


def is_other_version(found: Any) -> bool:
    """Whether a format tag names a training checkpoint of another version than this one."""
    return isinstance(found, str) and found.startswith(FORMAT_FAMILY) and found != FORMAT


# --- writing ---------------------------------------------------------------------------------------------
def write(state: dict[str, Any], folder: str | Path, *, atomic: bool = True) -> Path:
    """``state`` as ``folder``/checkpoint.pt (atomically: a crash leaves the previous file whole)."""
    path = Path(folder) / FILE
    if atomic:
        return fileio.atomic_torch_save(state, path)
    torch.save(state, path)
    return path


# --- reading ---------------------------------------------------------------------------------------------
def file_in(folder: str | Path) -> Path | None:
    """The training-state file inside a checkpoint folder (None if it holds none)."""
    path = Path(folder) / FILE
    return path if path.is_file() else None


def read_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint file's state, its format checked."""
    state = fileio.safe_load(Path(path))
    check_format(state, path)
    return state


def read_folder(folder: str | Path) -> dict[str, Any]:
    """The state in a checkpoint folder (a Ray checkpoint's, or a local run folder's)."""
    return fileio.safe_load(Path(folder) / FILE)


def find(path: str | Path) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file to continue from, or a one-line error.

    A folder written through Ray Train keeps its checkpoints in ``checkpoint_epochNNNN/checkpoint.pt``;
    the newest file (of those and a local ``checkpoint.pt``) is the one to continue from."""
    p = Path(path)
    if p.is_dir():
        found = [f for f in (p / FILE, *p.glob(f"{FOLDER_PREFIX}*/{FILE}")) if f.is_file()]
        p = max(found, key=lambda f: f.stat().st_mtime) if found else p / FILE
    if not p.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path} (expected a run folder holding {FILE} "
                              "or the file itself)")
    return p


def latest_ray(run_dir: str) -> str | None:
    """The newest checkpoint folder Ray recorded in a run folder's snapshot (None if none)."""
    snap = join(run_dir, RAY_SNAPSHOT)
    if not exists(snap):
        return None
    fs, path = filesystem(snap)
    with fs.open_input_stream(path) as f:
        state = json.loads(f.read().decode())
    latest = state.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return join(run_dir, name) if name else None


def run_dir_of(resume: str | os.PathLike[str]) -> str:
    """The run folder that ``--resume`` names: a run folder (local path or URI), or a checkpoint file in it
    (one level further up for a file in one of Ray's checkpoint folders)."""
    if is_uri(resume):
        return str(resume).rstrip("/")
    target = Path(resume).expanduser().resolve()
    if not target.is_file():
        return str(target)
    return str(target.parent.parent if is_folder(target.parent) else target.parent)


def load_resume_state(path: str | Path) -> tuple[dict[str, Any], RunConfig]:
    """The state to continue from in a run folder (or a checkpoint file), and the config it saved."""
    state = read_file(find(path))
    return state, from_dict(state["config"])


def resumable(run_dir: str | Path) -> bool:
    """Whether an interrupted run left a checkpoint in ``run_dir`` that ``--resume`` can continue."""
    run_dir = str(run_dir)
    if is_uri(run_dir):
        return latest_ray(run_dir) is not None
    try:
        find(run_dir)
        return True
    except CheckpointError:
        return False


def held(run_dir: str) -> list[str]:
    """The checkpoint files (ours, Ray's snapshot) that ``run_dir`` holds: a run lives there."""
    return [name for name in (FILE, RAY_SNAPSHOT) if exists(join(run_dir, name))]


def snapshot_names(run_dir: Path) -> set[str]:
    """The checkpoint folders Ray's own snapshot names (Ray refuses to resume if one of them is missing)."""
    try:
        state = json.loads((run_dir / RAY_SNAPSHOT).read_text())
    except (OSError, ValueError):
        return set()
    results: list[Any] = [*state.get("checkpoint_results", []), state.get("latest_checkpoint_result"),
                          *state.get("pending_training_results", [])]
    return {r["checkpoint_dir_name"] for r in results if isinstance(r, dict) and r.get("checkpoint_dir_name")}


def is_good(folder: Path) -> bool:
    """A checkpoint folder whose file is whole: it loads (a copy cut short by a dying node does not)."""
    file = folder / FILE
    if not file.is_file():
        return False
    try:
        state = fileio.safe_load(file)
    except Exception:  # noqa: BLE001 - any failure to load means: not a checkpoint to continue from
        return False
    return isinstance(state, dict) and "epoch" in state


def prune(run_dir: str, keep: int) -> list[str]:
    """Hold a run folder (one a lost cluster left, say) to the newest ``keep`` good checkpoint folders (names sort in
    training order), keeping also every folder Ray's snapshot still names; removes the rest (older ones the
    controller had no time to delete, copies cut short). Returns the removed folders' names."""
    if is_uri(run_dir) or not Path(run_dir).is_dir():
        return []
    folder = Path(run_dir)
    found = sorted(p for p in folder.glob(f"{FOLDER_PREFIX}*") if p.is_dir())
    good: list[str] = []
    for p in reversed(found):
        if len(good) == keep:
            break
        if is_good(p):
            good.append(p.name)
    kept = set(good) | snapshot_names(folder)
    removed = []
    for p in found:
        if p.name not in kept:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed
