"""What a run prints: what it trains, one line per epoch (a run in this process), the summary table and,
last, where everything went (every run)."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

from rich.console import Console
from rich.table import Table

from bmtard_ray.config import RunConfig
from bmtard_ray.storage.run_folder import CONFIG_FILE, MODEL_FILE
from bmtard_ray.training.teachers import BUILDING


def is_teacher_run(cfg: RunConfig) -> bool:
    """A teacher is always trained in the teacher cache's building area (training/teachers.py), then moved."""
    return PurePath(cfg.output_dir).name == BUILDING


def what_trains(cfg: RunConfig) -> str:
    """``<name>: <method> student <arch>`` or, for a teacher the run trains for the cache, ``... teacher ...``."""
    return f"{cfg.name}: {cfg.method.name} {'teacher' if is_teacher_run(cfg) else 'student'} {cfg.student}"


def print_outputs(cfg: RunConfig, run_dir: str, console: Console) -> None:
    """The run's last lines: where everything went. A teacher's folder is moved into the cache next (its
    entry is named by ensure_teachers' log), so only a student's files are listed."""
    if is_teacher_run(cfg):
        console.print("teacher trained: its folder now moves into the teacher cache (the next line names it)")
        return
    console.print(f"outputs in {run_dir}:\n"
                  f"  {MODEL_FILE} (the student), summary.json and summary.md (the table above), {CONFIG_FILE}\n"
                  "  metrics.parquet (per epoch), trace.parquet (per iteration), eval/ (the validation and test "
                  "reports)\n"
                  f"  curves: tensorboard --logdir {run_dir}   (or python run_tune.py --review {run_dir})",
                  soft_wrap=True, markup=False)


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


def epoch_logger(console: Console, epochs: int) -> Callable[[dict[str, Any]], None]:
    """One line per epoch for a local run."""
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
