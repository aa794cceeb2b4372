"""The numbers a run reports, in one table: their names, meaning, direction and unit.

Three kinds, each in the order its table or file keeps them:

* the per-iteration statistics a method's step returns (:data:`STAT_NAMES`): the columns of
  ``trace.parquet`` after ``iteration`` and ``epoch`` (:data:`TRACE_COLUMNS`);
* the per-iteration counts the trainer sums over an epoch and over workers (:data:`COUNT_NAMES`);
* the per-epoch metrics (:data:`METRICS`): one row of ``metrics.parquet``, one report of a Ray Train worker
  (hence of a Tune trial), one point per TensorBoard tag, the objectives a search may optimise and the
  leaderboard's columns. The trainer reports them in this order (a test holds it to that).

Adding a per-epoch metric is one row of :data:`METRICS` (and the line of the trainer that computes it).
Pure Python: the Tune layer's checks read it without importing torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Per-iteration statistics a method may return (each method returns the ones it has; the trace shows NaN
# for the others), in the trace's column order.
STAT_NAMES: tuple[str, ...] = ("loss", "L_adv", "L_nat", "H_adv", "H_nat", "tau_adv", "tau_nat", "w_adv", "w_nat")
TRACE_COLUMNS: tuple[str, ...] = ("iteration", "epoch") + STAT_NAMES
# Per-iteration counts, summed over the epoch and across workers by the trainer.
COUNT_NAMES: tuple[str, ...] = ("correct_adv", "correct_nat", "seen_adv", "seen_nat", "n")

MAX, MIN, NEITHER = "max", "min", ""


@dataclass(frozen=True)
class Metric:
    """A per-epoch metric. ``direction``: "max" or "min" where larger or smaller is better (a search may
    optimise it), "" where neither is (bookkeeping, the balance's state). ``group``: its TensorBoard tag is
    ``<group>/<name>``. ``label``: its column header in the leaderboard."""
    name: str
    meaning: str
    direction: str
    unit: str
    group: str
    label: str = ""


METRICS: tuple[Metric, ...] = (
    Metric("epoch", "epochs completed (the step of every curve)", NEITHER, "epochs", ""),
    Metric("lr", "learning rate of the epoch", NEITHER, "", "train"),
    Metric("seconds", "wall-clock time of the epoch's training", MIN, "s", "speed"),
    Metric("images_per_s", "training images per second, all workers", MAX, "images/s", "speed"),
    Metric("train_loss", "mean of the loss back-propagated over the epoch", MIN, "", "loss"),
    Metric("train_L_adv", "mean adversarial loss over the epoch", MIN, "", "loss"),
    Metric("train_L_nat", "mean natural loss over the epoch", MIN, "", "loss"),
    Metric("tau_adv", "robust teacher's temperature at the epoch's last iteration", NEITHER, "", "balance"),
    Metric("tau_nat", "clean teacher's temperature at the epoch's last iteration", NEITHER, "", "balance"),
    Metric("w_adv", "adversarial loss weight at the epoch's last iteration", NEITHER, "", "balance"),
    Metric("w_nat", "natural loss weight at the epoch's last iteration", NEITHER, "", "balance"),
    Metric("H_adv", "robust teacher's mean entropy over the epoch", NEITHER, "nats", "balance"),
    Metric("H_nat", "clean teacher's mean entropy over the epoch", NEITHER, "nats", "balance"),
    Metric("H_target", "entropy EBB drives both teachers to (NaN: it equalises them)", NEITHER, "nats", "balance"),
    Metric("tau_min", "EBB's lower temperature bound", NEITHER, "", "balance"),
    Metric("tau_max", "EBB's upper temperature bound", NEITHER, "", "balance"),
    Metric("tau_adv_at_bound", "share of the epoch's iterations the robust teacher's temperature sat at a bound",
           NEITHER, "%", "balance"),
    Metric("tau_nat_at_bound", "share of the epoch's iterations the clean teacher's temperature sat at a bound",
           NEITHER, "%", "balance"),
    Metric("train_acc_adv", "student's accuracy on the epoch's adversarial batches", MAX, "%", "train"),
    Metric("train_acc_nat", "student's accuracy on the epoch's clean batches", MAX, "%", "train"),
    Metric("val_clean", "clean validation accuracy", MAX, "%", "validation", "clean"),
    Metric("val_robust", "validation accuracy under the headline attack", MAX, "%", "validation", "robust"),
    Metric("val_w_robust", "W-Robust on validation: (clean + robust) / 2", MAX, "%", "validation", "W-robust"),
    Metric("val_n", "validation images the val_* metrics rest on", NEITHER, "images", "validation", "n val"),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
# Every per-epoch metric, in the order the trainer reports them (tuning: every epoch, validation included).
EPOCH_METRICS: tuple[str, ...] = tuple(BY_NAME)
VALIDATION_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.group == "validation" and m.direction)


def w_robust_se(clean: float | None, robust: float | None, n: float | None) -> float | None:
    """Standard error (points) of a W-Robust measured on ``n`` images: each accuracy's binomial error,
    100 sqrt(p (1 - p) / n), averaged. That is the largest the mean's error can be (clean and robust outcomes of
    an image are positively correlated), so trials closer than it are not told apart by the validation split."""
    if clean is None or robust is None or not n:
        return None
    return 0.5 * sum(100 * math.sqrt(p * (1 - p) / n) for p in (clean / 100, robust / 100))


def objective_names() -> tuple[str, ...]:
    """The metrics a search may optimise: those with a direction."""
    return tuple(m.name for m in METRICS if m.direction)


def default_mode(metric: str) -> str:
    """"min" for the metrics where smaller is better, else "max"."""
    known = BY_NAME.get(metric)
    return MIN if known is not None and known.direction == MIN else MAX


def tag_of(metric: str) -> str | None:
    """The TensorBoard tag of a per-epoch metric (None for the epoch counter itself)."""
    known = BY_NAME.get(metric)
    if known is None:
        return f"other/{metric}"
    return f"{known.group}/{metric}" if known.group else None


def label_of(metric: str) -> str:
    """A metric's column header in the leaderboard."""
    known = BY_NAME.get(metric)
    return known.label or metric if known is not None else metric
