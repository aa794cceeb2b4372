"""What a run prints: one line per epoch (a run in this process) and the summary table (every run)."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table


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
