"""What the Optuna study records about a search (bmtard_ray.tuning.searcher): ASHA-stopped trials PRUNED with
their per-epoch values, finished ones COMPLETE, errors FAIL, each trial linked to its Ray trial and folders,
the objectives named. Driven through the searcher's Tune hooks in the order Tune calls them."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from bmtard_ray.tuning.optuna_space import OPTUNA_NUMBER, DefineByRun, make_storage
from bmtard_ray.tuning.searcher import StudySearch, close_unfinished
from bmtard_ray.tuning.space import load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def searcher(tmp_path: Path, metric: str | list[str] = "val_w_robust", mode: str | list[str] = "max",
             max_epochs: int = 3) -> StudySearch:
    return StudySearch(DefineByRun(load_space("smoke"), {}), metric=metric, mode=mode,
                       sampler=optuna.samplers.RandomSampler(seed=0),
                       storage=make_storage(f"sqlite:///{tmp_path / 'optuna.db'}"), study_name="s",
                       max_epochs=max_epochs, experiment_dir=str(tmp_path / "exp"),
                       study_attrs={"space": "smoke", "preset": "smoke-search"})


def result(epoch: int, w: float, **extra: float) -> dict:
    # Tune's training_iteration restarts after a resume; the searcher must index by our epoch instead.
    return {"epoch": epoch, "training_iteration": 1, "val_w_robust": w, **extra}


def test_an_asha_stopped_trial_is_pruned_with_its_curve_and_a_finished_one_complete(tmp_path: Path) -> None:
    s = searcher(tmp_path)
    for tid in ("a", "b", "c", "d"):
        # The sampled keys, plus the Optuna trial number that trials.parquet reports.
        assert set(s.suggest(tid)) == set(load_space("smoke").keys) | {OPTUNA_NUMBER}
    # a: runs all 3 epochs. b: ASHA stops it at epoch 1 (Tune skips on_trial_result for the stopping result).
    for e, w in ((1, 20.0), (2, 24.0), (3, 25.5)):
        s.on_trial_result("a", result(e, w))
    s.on_trial_complete("a", result=result(3, 25.5))
    s.on_trial_complete("b", result=result(1, 31.0))
    # c: fails in epoch 2. d: stopped at epoch 2 after one reported epoch.
    s.on_trial_result("c", result(1, 12.0))
    s.on_trial_complete("c", error=True)
    s.on_trial_result("d", result(1, 15.0))
    s.on_trial_complete("d", result=result(2, 16.0))
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    a, b, c, d = study.trials
    assert a.state == TrialState.COMPLETE and a.value == 25.5 and a.intermediate_values == {1: 20.0, 2: 24.0, 3: 25.5}
    assert b.state == TrialState.PRUNED and b.intermediate_values == {1: 31.0} and b.value == 31.0
    assert c.state == TrialState.FAIL and c.intermediate_values == {1: 12.0}
    assert d.state == TrialState.PRUNED and d.intermediate_values == {1: 15.0, 2: 16.0}
    # A one-epoch score is not the configuration's outcome: the best trial is the one that finished.
    assert study.best_trial.number == a.number
    for t, tid in zip(study.trials, "abcd", strict=False):
        links = {k: t.user_attrs[k] for k in ("ray_trial_id", "trial_folder", "run_folder")}
        assert links == {"ray_trial_id": tid, "trial_folder": str(tmp_path / "exp" / f"trial_{tid}"),
                         "run_folder": str(tmp_path / "exp" / "train" / f"trial{t.number:03d}_{tid}")}
    # Each carries its last result (for b, the one that made ASHA stop it); c failed, so it has none.
    assert [t.user_attrs.get("val_w_robust") for t in study.trials] == [25.5, 31.0, 12.0, 16.0]
    assert all(t.user_attrs.get("val_w_robust_se") is None for t in study.trials)  # no val_n reported here
    assert study.metric_names == ["val_w_robust"]
    assert study.user_attrs == {"space": "smoke", "preset": "smoke-search"}
    # A second completion (Tune may repeat it) changes nothing.
    s.on_trial_complete("b", result=result(3, 99.0))
    assert study.trials[1].state == TrialState.PRUNED


def test_multi_objective_trials_are_named_complete_or_pruned(tmp_path: Path) -> None:
    s = searcher(tmp_path, metric=["val_clean", "val_robust"], mode=["max", "max"], max_epochs=2)
    s.suggest("a"), s.suggest("b")
    s.on_trial_result("a", result(1, 0.0, val_clean=40.0, val_robust=10.0))
    s.on_trial_complete("a", result=result(2, 0.0, val_clean=45.0, val_robust=12.0))
    s.on_trial_complete("b", result=result(1, 0.0, val_clean=50.0, val_robust=20.0))
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    a, b = study.trials
    assert a.state == TrialState.COMPLETE and a.values == [45.0, 12.0] and a.intermediate_values == {}
    assert b.state == TrialState.PRUNED and b.values is None
    assert study.metric_names == ["val_clean", "val_robust"]
    assert [t.number for t in study.best_trials] == [a.number]


def test_trials_an_epoch_budget_cut_off_are_closed_as_pruned(tmp_path: Path) -> None:
    s = searcher(tmp_path)
    s.suggest("a"), s.suggest("b")
    s.on_trial_result("a", result(1, 20.0))
    s.on_trial_complete("b", result=result(3, 30.0))
    assert close_unfinished(s.study) == 1
    a, b = s.study.trials
    assert a.state == TrialState.PRUNED and a.value == 20.0 and b.state == TrialState.COMPLETE
    assert close_unfinished(s.study) == 0


@pytest.mark.parametrize("bad", [float("nan"), None])
def test_a_missing_or_nan_value_is_not_reported(tmp_path: Path, bad: float | None) -> None:
    s = searcher(tmp_path)
    s.suggest("a")
    s.on_trial_result("a", {"epoch": 1, "val_w_robust": bad})
    s.on_trial_complete("a", result={"epoch": 1, "val_w_robust": bad})
    t = s.study.trials[0]
    assert t.state == TrialState.PRUNED and t.intermediate_values == {} and t.value is None


def test_startup_draws_counts_each_categorical_value_over_seeds() -> None:
    """bench/startup_draws.py, which the README cites for how often TPE's random start misses a value."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "bench" / "startup_draws.py"), "--space", "ebb",
                          "--seeds", "3", "--draws", "4"], capture_output=True, text=True, check=True).stdout
    rows = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| ebb.mode |")}
    assert set(rows) == {"step", "solve"}
    assert sum(int(r.split("|")[3]) for r in rows.values()) == 3 * 4
