"""Run folders: what a run leaves where, and how an existing folder is treated.

Shared by the in-process launch and the Ray Train layer, so both agree on what a run folder holds and when
one may be reused. Its checkpoints are :mod:`bmtard_ray.storage.checkpoints`'.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bmtard_ray.config import CONFIG_FORMAT, RunConfig, from_dict, to_dict
from bmtard_ray.errors import ConfigError
from bmtard_ray.names import is_robustbench
from bmtard_ray.storage import checkpoints
from bmtard_ray.storage.paths import exists, filesystem, is_uri, join, remove_run, write_text

CONFIG_FILE = "config.yaml"     # the fully resolved configuration, written when a run starts
MODEL_FILE = "model.pt"         # the final student, written when a run ends
SUMMARY_FILE = "summary.json"   # the final evaluation and the run's facts, written last when a run ends


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy with every file path absolute: Ray workers (and Tune trials) run in another directory."""
    out = from_dict(to_dict(cfg))

    def fix(p: str) -> str:
        if not p or is_uri(p) or p == "pyautoattack" or is_robustbench(p):  # names, not paths
            return p
        return str(Path(p).expanduser().resolve())

    out.data.root = fix(out.data.root)
    out.data.cache_dir = fix(out.data.cache_dir)
    out.output_dir = fix(out.output_dir)
    out.teachers.cache_dir = fix(out.teachers.cache_dir)
    out.teachers.model_dir = fix(out.teachers.model_dir)
    out.teachers.logit_cache = fix(out.teachers.logit_cache)
    for role in ("clean", "robust"):
        tc = getattr(out.teachers, role)
        tc.checkpoint = fix(tc.checkpoint) if tc.checkpoint is not None else None
    return out


def write_config(cfg: RunConfig, run_dir: str | Path) -> None:
    write_text(str(run_dir), CONFIG_FILE, yaml.safe_dump({"format": CONFIG_FORMAT, **to_dict(cfg)}, sort_keys=False))


def check_run_folder(run_dir: str, *, resume: bool, overwrite: bool) -> None:
    """Never clobber, and never silently continue, a run of the same name (Ray would resume it).

    ``overwrite`` removes the old run (else Ray Train would restore it from its snapshot)."""
    if resume or not exists(run_dir):
        return
    held = ([MODEL_FILE] if exists(join(run_dir, MODEL_FILE)) else []) + checkpoints.held(run_dir)
    if not held:
        return
    if overwrite:
        remove_run(run_dir)
        return
    raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                      "or --name to start another")


def read_summary(run_dir: str) -> dict[str, Any]:
    """The summary a finished run left in its folder (local or in remote storage)."""
    if not is_uri(run_dir):
        path = Path(run_dir) / SUMMARY_FILE
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} cannot be read as a run summary ({type(exc).__name__})") from exc
    fs, path_in = filesystem(run_dir)
    with fs.open_input_stream(f"{path_in}/{SUMMARY_FILE}") as f:
        return dict(json.loads(f.read().decode()))
