"""The driver's live view of a Ray Train run: rank 0's reports forwarded from the controller to a table."""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ray.train import UserCallback
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


class ForwardToDriver(UserCallback):
    """Runs in the Train controller: forwards rank 0's report (and worker failures) to the driver's view."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        # One metrics dict per worker: their number is the run's current world size (an elastic run's changes).
        self.queue.put(("report", metrics[0] if metrics else {}, len(metrics)))

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        text = {rank: f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160] if str(e).strip() else ''}"
                for rank, e in worker_exceptions.items()}
        self.queue.put(("failure", text))


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class EpochView:
    """Driver output: a live table on a terminal, one line per epoch otherwise (job logs, CI)."""

    COLUMNS = ("epoch", "loss", "L_adv", "L_nat", "tau_adv", "tau_nat", "w_adv", "w_nat", "val W-Robust", "img/s",
               "time", "ETA")

    def __init__(self, console: Console, epochs: int, title: str) -> None:
        self.console, self.epochs, self.title = console, epochs, title
        self.rows: dict[int, list[str]] = {}
        self.events: list[str] = []
        self.started = time.perf_counter()
        self.last_time = self.started
        self.epoch_walls: list[float] = []
        self.live: Live | None = None
        self.world_size: int | None = None

    def __enter__(self) -> EpochView:
        if self.console.is_terminal:
            self.live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.__exit__(*exc)

    # The live table pairs the adv/nat values and leaves out the weighted loss and the elapsed time (both
    # in the lines and metrics.parquet) so that it fits 80 columns.
    TABLE_COLUMNS = ("epoch", "L adv/nat", "tau adv/nat", "w adv/nat", "val W-Rob", "img/s", "ETA")

    def _table(self) -> Group:
        table = Table(title=self.title, box=None, pad_edge=False, header_style="bold underline")
        for c in self.TABLE_COLUMNS:
            table.add_column(c, justify="right", no_wrap=True)
        shown = sorted(self.rows)[-max(3, self.console.height - 12):]  # the newest epochs that fit
        for epoch in shown:
            r = self.rows[epoch]
            table.add_row(r[0], f"{r[2]}/{r[3]}", f"{r[4][:5]}/{r[5][:5]}", f"{r[6][:5]}/{r[7][:5]}", r[8], r[9], r[11])
        # Events go below the table, not in its caption (a long caption would widen and squeeze the table).
        return Group(table, *(Text(e, style="yellow") for e in self.events[-3:]))

    def report(self, m: dict[str, Any]) -> None:
        if "epoch" not in m:
            return
        now = time.perf_counter()
        # ETA from the recent wall time per epoch (validation and checkpointing included); the first epoch
        # after a (re)start also holds the workers' start-up, so its training time stands in for it.
        first = not self.epoch_walls
        self.epoch_walls.append(float(m.get("seconds") or 0.0) if first else now - self.last_time)
        self.last_time = now
        epoch = int(m["epoch"])
        recent = self.epoch_walls[-5:]
        eta = (sum(recent) / len(recent)) * (self.epochs - epoch)
        row = [f"{epoch}/{self.epochs}", _fmt(m.get("train_loss")), _fmt(m.get("train_L_adv")),
               _fmt(m.get("train_L_nat")), _fmt(m.get("tau_adv")), _fmt(m.get("tau_nat")), _fmt(m.get("w_adv")),
               _fmt(m.get("w_nat")), _fmt(m.get("val_w_robust"), ".2f"), _fmt(m.get("images_per_s"), ".0f"),
               _duration(now - self.started), _duration(eta)]
        if epoch in self.rows:
            self.events.append(f"epoch {epoch} redone after a restart")
        self.rows[epoch] = row
        if self.live is not None:
            self.live.update(self._table())
        else:
            self.console.print(" | ".join(f"{c} {v}" for c, v in zip(self.COLUMNS, row, strict=False)), soft_wrap=True)

    def workers(self, n: int) -> None:
        """The number of workers behind the latest report: a change (an elastic resize) is an event."""
        if self.world_size is not None and n != self.world_size:
            self._event(f"now {n} worker(s) (was {self.world_size})")
        self.world_size = n

    def _event(self, msg: str) -> None:
        self.events.append(msg)
        if self.live is not None:
            self.live.update(self._table())
        else:
            self.console.print(Text(msg, style="yellow"), soft_wrap=True)

    def failure(self, errors: dict[int, str]) -> None:
        msg = "worker failure (" + "; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items())) + \
              "): restarting from the last checkpoint"
        self.events.append(msg)
        self.epoch_walls.clear()
        if self.live is not None:
            self.live.update(self._table())
        else:
            self.console.print(Text(msg, style="yellow"), soft_wrap=True)


def pump(queue: Any, view: EpochView, stop: threading.Event,
         listeners: Sequence[Callable[[dict[str, Any]], None]] = ()) -> None:
    """Feed the view (and each of ``listeners``, e.g. TensorBoard events) from the controller's queue."""
    from ray.util.queue import Empty

    while True:
        try:
            kind, payload, *extra = queue.get(timeout=0.5)
        except Empty:
            if stop.is_set():
                return
            continue
        except Exception:  # the queue actor went away (shutdown): nothing more to show
            return
        try:
            if kind == "report":
                if extra:
                    view.workers(int(extra[0]))
                view.report(payload)
                for listen in listeners:
                    listen(payload)
            elif kind == "failure":
                view.failure(payload)
        except Exception as exc:  # a display problem must never stop the run or the view
            view.console.print(f"(driver view: {type(exc).__name__}: {exc})", markup=False)
