"""Trials as plain records: ranking, the Pareto front, the Parquet table and the leaderboard.

Everything here works on :class:`TrialRecord` lists (built from a Ray ``ResultGrid`` by
:func:`bmtard_ray.tuning.experiment.collect_records`), so it is testable without Ray.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from bmtard_ray.runtime import fileio
from bmtard_ray.training.metrics import EPOCH_METRICS, VALIDATION_METRICS, default_mode, label_of, w_robust_se
from bmtard_ray.tuning.settings import TuneSettings


@dataclass
class TrialRecord:
    trial_id: str
    status: str                                       # TERMINATED | ERROR | (anything else: unfinished)
    params: dict[str, Any]                            # as sampled by Optuna
    effective: dict[str, Any] = field(default_factory=dict)  # as run (after clipping)
    metrics: dict[str, Any] = field(default_factory=dict)    # the last reported epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # every reported epoch
    checkpoint_path: str | None = None
    trial_dir: str | None = None
    time_s: float = math.nan
    error: str | None = None
    max_epochs: int = 0
    number: int = 0                                   # creation order (Tune's trial list order)

    @property
    def epochs(self) -> int:
        return int(self.metrics.get("epoch") or 0)

    @property
    def stopped_early(self) -> bool:
        return self.status == "TERMINATED" and 0 < self.epochs < self.max_epochs

    def value(self, metric: str) -> float:
        v = self.metrics.get(metric)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else math.nan


def _ok(r: TrialRecord, metrics: Sequence[str]) -> bool:
    return r.status == "TERMINATED" and all(math.isfinite(r.value(m)) for m in metrics)


def pareto_mask(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[bool]:
    """``True`` for each point no other point dominates (at least as good everywhere, better somewhere)."""
    signs = [1.0 if m else -1.0 for m in maximize]
    pts = [[s * v for s, v in zip(signs, p, strict=False)] for p in points]
    out = []
    for i, p in enumerate(pts):
        dominated = any(all(q_ >= p_ for q_, p_ in zip(q, p, strict=False))
                        and any(q_ > p_ for q_, p_ in zip(q, p, strict=False))
                        for j, q in enumerate(pts) if j != i)
        out.append(not dominated)
    return out


def pareto_ids(records: Sequence[TrialRecord], settings: TuneSettings,
               metrics: Sequence[str] = ("val_clean", "val_robust")) -> set[str]:
    """Trials on the Pareto front of ``metrics`` (the objectives in multi-objective mode)."""
    metrics = tuple(settings.objectives) if settings.multi else tuple(metrics)
    modes = tuple(settings.modes) if settings.multi else ("max",) * len(metrics)
    good = [r for r in records if _ok(r, metrics)]
    mask = pareto_mask([[r.value(m) for m in metrics] for r in good], [m == "max" for m in modes])
    return {r.trial_id for r, on in zip(good, mask, strict=False) if on}


def rank(records: Sequence[TrialRecord], settings: TuneSettings) -> list[TrialRecord]:
    """Best first. Single objective: by its last reported value. Multi-objective: the Pareto front first,
    each group ordered by ``asha_metric`` (W-Robust by default), the scalar the user reads first.
    Trials that errored or report no value go last, in trial order."""
    if settings.multi:
        front = pareto_ids(records, settings)
        needed, metric = tuple(settings.objectives), settings.asha_metric
        sign = 1.0 if default_mode(metric) == "max" else -1.0
    else:
        front, needed, metric = set(), (settings.objective,), settings.objective
        sign = 1.0 if settings.mode == "max" else -1.0

    def key(r: TrialRecord) -> tuple:
        ok = _ok(r, needed)
        v = r.value(metric)
        off_front = settings.multi and r.trial_id not in front
        return (not ok, off_front, -sign * v if ok and math.isfinite(v) else math.inf, r.number)

    return sorted(records, key=key)


def best_record(records: Sequence[TrialRecord], settings: TuneSettings) -> TrialRecord | None:
    for r in rank(records, settings):
        metrics = settings.objectives if settings.multi else (settings.objective,)
        if _ok(r, metrics) and r.checkpoint_path:
            return r
    return None


# ---------------------------------------------------------------------------------------------------------
# The table of all trials.


def table_rows(records: Sequence[TrialRecord], settings: TuneSettings) -> list[dict[str, Any]]:
    ranked = rank(records, settings)
    position = {r.trial_id: i + 1 for i, r in enumerate(ranked)}
    front = pareto_ids(records, settings)
    keys: list[str] = []
    for r in records:
        keys += [k for k in r.params if k not in keys]
    rows = []
    for r in sorted(records, key=lambda r: r.number):
        row: dict[str, Any] = {"trial_id": r.trial_id, "number": r.number, "rank": position[r.trial_id],
                               "status": r.status,
                               "epochs": r.epochs, "stopped_early": r.stopped_early, "pareto": r.trial_id in front,
                               "time_s": r.time_s}
        for k in keys:
            row[f"param.{k}"] = r.params.get(k)
        for k in keys:
            row[f"run.{k}"] = r.effective.get(k, r.params.get(k))
        for m in EPOCH_METRICS:
            v = r.metrics.get(m)
            row[m] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        row["checkpoint_path"] = r.checkpoint_path
        row["trial_dir"] = r.trial_dir
        row["error"] = r.error
        rows.append(row)
    return rows


def rows_to_arrow(rows: list[dict[str, Any]]) -> Any:
    """An Arrow table; a column whose values mix types (a categorical of null/str/float) becomes strings."""
    import pyarrow as pa

    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in names]
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    return pa.table(columns)


def write_table(records: Sequence[TrialRecord], settings: TuneSettings, path: Path) -> Path:
    return fileio.atomic_parquet(rows_to_arrow(table_rows(records, settings)), path)


# ---------------------------------------------------------------------------------------------------------
# The leaderboard.


def _cell(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}g}"
    return str(v)


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Column headers: a key's last part (``eta_tau``) unless two keys share it (then the full key)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (tail if last.count(tail) == 1 else k) for k, tail in zip(keys, last, strict=False)}


def leaderboard_metrics(settings: TuneSettings) -> list[str]:
    metrics = list(VALIDATION_METRICS)
    return metrics + [m for m in settings.objectives if m not in metrics]


def _se_cell(r: TrialRecord) -> str:
    se = w_robust_se(r.metrics.get("val_clean"), r.metrics.get("val_robust"), r.metrics.get("val_n"))
    return "-" if se is None else f"{se:.2f}"


def pinned(r: TrialRecord) -> list[str]:
    """The teachers whose temperature sat at a bound at every iteration of every epoch the trial reported:
    there the balance never acted (its target out of reach, or bounds too tight)."""
    out = []
    for role in ("adv", "nat"):
        shares = [h.get(f"tau_{role}_at_bound") for h in r.history] or [r.metrics.get(f"tau_{role}_at_bound")]
        if shares and all(isinstance(v, (int, float)) and v >= 100 - 1e-9 for v in shares):
            out.append(f"tau_{role}")
    return out


def notes(records: Sequence[TrialRecord], settings: TuneSettings) -> dict[str, str]:
    """Per trial: "best"; "tied" when within one standard error (the best trial's validation W-Robust SE, see
    training.metrics.w_robust_se) of the best on the W-Robust ranking, where validation cannot tell them apart;
    and which temperatures never left their bounds."""
    ranked = [r for r in rank(records, settings) if _ok(r, (settings.asha_metric if settings.multi
                                                              else settings.objective,))]
    metric = settings.asha_metric if settings.multi else settings.objective
    out: dict[str, list[str]] = {r.trial_id: [] for r in records}
    if ranked:
        best = ranked[0]
        out[best.trial_id].append("best")
        se = w_robust_se(best.metrics.get("val_clean"), best.metrics.get("val_robust"), best.metrics.get("val_n"))
        if metric == "val_w_robust" and se is not None:
            for r in ranked[1:]:
                if abs(best.value(metric) - r.value(metric)) <= se:
                    out[r.trial_id].append(f"tied (within 1 SE = {se:.2f})")
    for r in records:
        if (p := pinned(r)):
            out[r.trial_id].append("pinned at bounds: " + ", ".join(p))
    return {k: "; ".join(v) for k, v in out.items()}


def leaderboard_rows(records: Sequence[TrialRecord], settings: TuneSettings, top: int) -> tuple[list[str],
                                                                                                list[list[str]]]:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r.params if k not in keys]
    metrics = leaderboard_metrics(settings)
    pareto = ["pareto"] if settings.multi else []
    names = short_names(keys)
    cols = ["#", "trial", "status", "epochs", *pareto, *(label_of(m) for m in metrics), "±SE", "note",
            *(names[k] for k in keys)]
    front = pareto_ids(records, settings)
    noted = notes(records, settings)
    rows = []
    for i, r in enumerate(rank(records, settings)[:top], 1):
        status = "stopped" if r.stopped_early else ("done" if r.status == "TERMINATED" else r.status.lower())
        on_front = ["*" if r.trial_id in front else ""] if settings.multi else []
        rows.append([str(i), r.trial_id, status, str(r.epochs), *on_front,
                     *(f"{r.value(m):.2f}" if math.isfinite(r.value(m)) else "-" for m in metrics),
                     _se_cell(r), noted[r.trial_id],
                     *(_cell(r.effective.get(k, r.params.get(k))) for k in keys)])
    return cols, rows


def leaderboard_table(records: Sequence[TrialRecord], settings: TuneSettings, top: int, title: str) -> Table:
    cols, rows = leaderboard_rows(records, settings, top)
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="left" if c in ("trial", "status", "note") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def leaderboard_markdown(records: Sequence[TrialRecord], settings: TuneSettings, title: str) -> str:
    cols, rows = leaderboard_rows(records, settings, len(records))
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
