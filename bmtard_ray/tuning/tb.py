"""A search's TensorBoard: one run per trial, named by its Optuna trial number, with the balance and its target.

Replaces Tune's own TensorBoard logger (a ``TBXLoggerCallback`` subclass among the run's callbacks turns the
default one off), because that one names runs ``trial_<ray id>``, tags every metric ``ray/tune/<name>``, steps
by Tune's iteration count (which restarts on ``--resume``) and writes the HPARAMS plugin's records only when a
trial ends. Here, under ``<experiment>/tensorboard/``:

* a trial's run is ``<Optuna number, 3 digits>_<ray trial id>`` (``007_ab12c_00007``): sorted by number, tied
  to optuna-dashboard's trial list and to Tune's folders;
* its metrics carry the same tags as a ``run_train.py`` run (``validation/val_w_robust``, ``balance/tau_adv``;
  :func:`~bmtard_ray.training.metrics.tag_of`), step = epoch, so that ``balance/H_target``, ``balance/tau_min``
  and ``balance/tau_max`` (logged every epoch: TensorBoard draws no constant line) sit beside the entropies and
  temperatures they bound;
* the HPARAMS tab gets every trial as it starts (its sampled values and Optuna number), with the search
  space's keys and a few metrics as columns, and its end when it ends;
* the Custom Scalars tab gets one layout: validation W-Robust, the entropies with their target, the
  temperatures with their bounds.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from ray.tune.logger import TBXLoggerCallback

from bmtard_ray.training.metrics import BY_NAME, tag_of
from bmtard_ray.tuning.optuna_space import OPTUNA_NUMBER
from bmtard_ray.tuning.settings import TB_DIR
from bmtard_ray.tuning.space import SearchSpace

# Columns of the HPARAMS table beside the parameters (tags of the runs' scalars).
HPARAMS_METRICS = ("validation/val_w_robust", "validation/val_clean", "validation/val_robust", "balance/H_adv",
                   "balance/H_nat", "balance/H_target", "balance/tau_adv_at_bound", "balance/tau_nat_at_bound")
LAYOUT = {
    "validation": {"W-Robust, clean and robust": ["Multiline", ["validation/val_w_robust", "validation/val_clean",
                                                                "validation/val_robust"]]},
    "balance against its target": {
        "teacher entropies and the target (nats)": ["Multiline", ["balance/H_adv", "balance/H_nat",
                                                                  "balance/H_target"]],
        "temperatures and their bounds": ["Multiline", ["balance/tau_adv", "balance/tau_nat", "balance/tau_min",
                                                        "balance/tau_max"]],
        "iterations pinned at a bound (%)": ["Multiline", ["balance/tau_adv_at_bound",
                                                           "balance/tau_nat_at_bound"]]},
}


def run_name(number: Any, trial_id: str) -> str:
    """A trial's TensorBoard run: its Optuna number first (sorts and matches optuna-dashboard), then its id."""
    return f"{int(number):03d}_{trial_id}" if isinstance(number, (int, float)) else trial_id


def _hparam(value: Any) -> str | float | bool:
    return value if isinstance(value, (bool, float, str)) else float(value) if isinstance(value, int) else str(value)


class TrialEvents(TBXLoggerCallback):
    """See the module docstring. ``space`` gives the HPARAMS table its columns (every searched key)."""

    def __init__(self, experiment_dir: str | Path, space: SearchSpace) -> None:
        super().__init__()
        self._root = Path(experiment_dir) / TB_DIR
        self._columns: dict[str, Any] = {OPTUNA_NUMBER: 0.0}
        for p in space.params:
            self._columns[p.key] = _hparam(p.choices[0]) if p.kind == "categorical" else 0.0

    def _hparams(self, trial: Any) -> dict[str, Any]:
        config = trial.config or {}
        return {k: _hparam(config[k]) for k in self._columns if config.get(k) is not None}

    def log_trial_start(self, trial: Any) -> None:
        from tensorboardX.summary import hparams

        if trial in self._trial_writer:
            self._trial_writer[trial].close()
        folder = self._root / run_name((trial.config or {}).get(OPTUNA_NUMBER), trial.trial_id)
        folder.mkdir(parents=True, exist_ok=True)
        # A unique suffix: a trial restarted within the same second (--resume) must not overwrite its file.
        writer = self._summary_writer_cls(str(folder), flush_secs=2,
                                          filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        metrics = dict.fromkeys(HPARAMS_METRICS, 0.0)
        # The experiment record lists every searched key, so the table's columns are the same whichever
        # trial's record TensorBoard reads; the session's start holds this trial's own values.
        experiment, _, _ = hparams(self._columns, metrics)
        _, start, _ = hparams(self._hparams(trial), metrics)
        writer.file_writer.add_summary(experiment)
        writer.file_writer.add_summary(start)
        writer.add_custom_scalars(LAYOUT)
        self._trial_writer[trial] = writer
        self._trial_result[trial] = {}

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        epoch = result.get("epoch")
        if not isinstance(epoch, (int, float)):
            return
        writer = self._trial_writer[trial]
        for name, value in result.items():
            tag = tag_of(name) if name in BY_NAME else None  # our metrics only, not Tune's bookkeeping
            if tag and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                writer.add_scalar(tag, float(value), global_step=int(epoch))
        writer.flush()

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        from tensorboardX.summary import hparams

        writer = self._trial_writer.pop(trial, None)
        self._trial_result.pop(trial, None)
        if writer is None:
            return
        _, _, end = hparams(self._hparams(trial), dict.fromkeys(HPARAMS_METRICS, 0.0))
        writer.file_writer.add_summary(end)
        writer.close()
