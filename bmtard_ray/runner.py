"""Running a configuration in this process: teachers first, then the run, with local checkpoints.

The Ray Train layer (:mod:`bmtard_ray.ray_train`) reuses every piece of this except the process it runs in.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from bmtard_ray import io
from bmtard_ray.config import RunConfig, from_dict, to_dict
from bmtard_ray.errors import CheckpointError, ConfigError
from bmtard_ray.loop import Trainer, check_given_teachers, prepare_data
from bmtard_ray.teachers import ensure_teachers

CHECKPOINT_FILE = "checkpoint.pt"


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Never clobber a finished or interrupted run by accident."""
    if resume or overwrite or not run_dir.exists():
        return
    if (run_dir / "model.pt").exists() or (run_dir / CHECKPOINT_FILE).exists():
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


def load_resume_state(path: str | Path) -> tuple[dict[str, Any], RunConfig]:
    state = io.safe_load(find_checkpoint(path))
    if not isinstance(state, dict) or state.get("format") != "bmtard_ray.checkpoint/1":
        raise CheckpointError(f"{path} is not a bmtard_ray training checkpoint")
    return state, from_dict(state["config"])


def write_config(cfg: RunConfig, run_dir: Path) -> None:
    io.atomic_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), run_dir / "config.yaml")


def epoch_logger(console: Console, epochs: int) -> Callable[[dict[str, Any]], None]:
    def log(m: dict[str, Any]) -> None:
        parts = [f"epoch {m['epoch']:>3}/{epochs}", f"loss {m['train_loss']:.4f}", f"lr {m['lr']:.4g}"]
        for key in ("tau_adv", "tau_nat", "w_adv", "w_nat"):
            if key in m and not math.isnan(m[key]):
                parts.append(f"{key} {m[key]:.4f}")
        if "val_w_robust" in m:
            parts.append(f"val clean {m['val_clean']:.2f} robust {m['val_robust']:.2f} W {m['val_w_robust']:.2f}")
        parts.append(f"{m['images_per_s']:.0f} img/s, {m['seconds']:.1f} s")
        console.print(" | ".join(parts))
    return log


def print_summary(summary: dict[str, Any], console: Console) -> None:
    attacks = list(summary["results"]["test"]["accuracy"])
    table = Table(title=f"{summary['name']}: {summary['method']} / {summary['student']} / {summary['dataset']}")
    table.add_column("split")
    table.add_column("n", justify="right")
    for a in attacks:
        table.add_column(a, justify="right")
    for a in attacks:
        if a != "clean":
            table.add_column(f"W-Robust {a}", justify="right")
    for split, r in summary["results"].items():
        table.add_row(split, str(r["n_examples"]), *(f"{r['accuracy'][a]:.2f}" for a in attacks),
                      *(f"{r['w_robust'][a]:.2f}" for a in attacks if a != "clean"))
    console.print(table)


def run_local(cfg: RunConfig, *, resume: str | Path | None = None, overwrite: bool = False,
              console: Console | None = None) -> dict[str, Any]:
    """Train (teachers first if needed) and evaluate in this process; returns the summary."""
    console = console or Console()
    state = None
    if resume is not None:
        state, _ = load_resume_state(resume)
    run_dir = run_dir_of_checkpoint(find_checkpoint(resume)) if resume is not None else run_dir_of(cfg)
    check_run_dir(run_dir, resume=resume is not None, overwrite=overwrite)
    data = prepare_data(cfg)  # fails on a bad data folder before anything is written
    check_given_teachers(cfg, data.info)  # ... and on a teacher checkpoint that does not fit
    cfg = ensure_teachers(cfg, lambda t: run_local(t, overwrite=True, console=console),
                          log=lambda s: console.print(f"[bold]{s}[/bold]"))

    def report(metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        if checkpoint is not None:
            io.atomic_torch_save(checkpoint, run_dir / CHECKPOINT_FILE)

    trainer = Trainer(cfg, data=data, report=report, log=epoch_logger(console, cfg.optim.epochs))
    if state is not None:
        trainer.load_state_dict(state)
        console.print(f"resuming {run_dir} after epoch {trainer.state.epoch}")
    write_config(cfg, run_dir)
    console.print(f"[bold]{cfg.name}[/bold]: {cfg.method.name} student {cfg.student} on {cfg.data.dataset} "
                  f"({len(data.train)} train / {len(data.val)} val / {len(data.test)} test images) on {trainer.device}")
    trainer.fit()
    summary = trainer.finish(run_dir)
    print_summary(summary, console)
    console.print(f"outputs in {run_dir}")
    return summary
