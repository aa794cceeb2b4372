"""PNG plots of an experiment: objective per trial, clean-vs-robust with the Pareto front, and the best
trial's temperature / weight trajectories."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from bmtard_ray.runtime.fileio import atomic_figure  # noqa: E402
from bmtard_ray.tuning.results import TrialRecord, pareto_ids  # noqa: E402
from bmtard_ray.tuning.settings import TuneSettings  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    atomic_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_objective(records: Sequence[TrialRecord], settings: TuneSettings, path: Path) -> Path:
    """Each trial's last reported objective in trial order, with the running best; early-stopped trials hollow."""
    metric = settings.objective if not settings.multi else settings.asha_metric
    sign = 1 if (settings.mode if not settings.multi else "max") == "max" else -1
    ordered = sorted(records, key=lambda r: r.number)
    fig, ax = plt.subplots(figsize=(7, 4))
    best, xs, ys = -math.inf, [], []
    for r in ordered:
        i = r.number
        v = r.value(metric)
        if not math.isfinite(v):
            ax.scatter([i], [0], marker="x", color="red")
            continue
        full = not r.stopped_early
        ax.scatter([i], [v], facecolors="C0" if full else "none", edgecolors="C0")
        best = max(best, sign * v)
        xs.append(i)
        ys.append(sign * best)
    if xs:
        ax.step(xs, ys, where="post", color="C1", label="best so far")
        ax.legend(loc="lower right")
    ax.set_xlabel("trial (in order of creation)")
    locator = ax.xaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator)  # matplotlib's default AutoLocator is one
    locator.set_params(integer=True)
    ax.set_ylabel(f"{metric} (last reported epoch)")
    ax.set_title(f"{metric} per trial (hollow: stopped early by ASHA, x: failed)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_pareto(records: Sequence[TrialRecord], settings: TuneSettings, path: Path, best_id: str | None = None) -> Path:
    """Validation clean vs robust accuracy of every trial, the Pareto front joined by a line."""
    front = pareto_ids(records, settings)
    pts = [(r.value("val_clean"), r.value("val_robust"), r) for r in records]
    pts = [(x, y, r) for x, y, r in pts if math.isfinite(x) and math.isfinite(y)]
    fig, ax = plt.subplots(figsize=(6, 5))
    if pts:
        ax.scatter([x for x, _, r in pts if r.trial_id not in front], [y for _, y, r in pts if r.trial_id not in front],
                   color="C0", alpha=0.6, label="trial")
        on = sorted((x, y) for x, y, r in pts if r.trial_id in front)
        ax.plot([x for x, _ in on], [y for _, y in on], "o-", color="C3", label="Pareto front")
        for x, y, r in pts:
            if r.trial_id == best_id:
                ax.scatter([x], [y], s=200, facecolors="none", edgecolors="black", label="selected (test-evaluated)")
    ax.set_xlabel("validation clean accuracy (%)")
    ax.set_ylabel("validation robust accuracy (%)")
    ax.set_title("accuracy-robustness trade-off over trials")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def plot_trajectories(series: Mapping[str, Sequence[float]], x: Sequence[float], xlabel: str, path: Path,
                      title: str) -> Path:
    """tau_adv / tau_nat on top, w_adv / w_nat below, against iterations (trace) or epochs (metrics)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name in ("tau_adv", "tau_nat"):
        if name in series:
            top.plot(x, series[name], label=name)
    for name in ("w_adv", "w_nat"):
        if name in series:
            bottom.plot(x, series[name], label=name)
    top.set_ylabel("temperature")
    bottom.set_ylabel("loss weight")
    bottom.set_xlabel(xlabel)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    top.set_title(title)
    return _save(fig, path)
