"""The tuning layer: space -> Optuna, objectives and modes, resources, ranking and the Pareto front, the
command line's bad-input errors (exit 2, nothing written), and slow end-to-end runs of run_tune.py on the
CIFAR-10 copy (smoke test, resume after an interruption, `ray job submit`)."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
from conftest import free_port, head_port_flags

from bmtard_ray.cli.tune import main as tune_main
from bmtard_ray.config import RunConfig, build_config, teacher_cache_dir, to_dict
from bmtard_ray.errors import ConfigError
from bmtard_ray.training.metrics import EPOCH_METRICS, objective_names
from bmtard_ray.tuning.optuna_space import DefineByRun, distribution, distributions, make_sampler
from bmtard_ray.tuning.results import TrialRecord, best_record, pareto_ids, pareto_mask, rank, table_rows, write_table
from bmtard_ray.tuning.settings import TuneSettings, check_objectives, max_concurrent_trials
from bmtard_ray.tuning.space import load_space, parse_space

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def settings(**kw: object) -> TuneSettings:
    return TuneSettings(space_file="s.yaml", experiment_dir="/tmp/x", **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Space -> Optuna.


def test_each_param_type_becomes_the_matching_optuna_distribution() -> None:
    space = parse_space({"params": {
        "ebb.eta_tau": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "ebb.tau_max": {"type": "float", "low": 2, "high": 4, "step": 0.5},
        "nlb.ref_window": {"type": "int", "low": 1, "high": 50, "log": True},
        "optim.batch_size": {"type": "int", "low": 32, "high": 128, "step": 32},
        "method.name": {"type": "categorical", "choices": ["trades", "ard"]}}})
    d = distributions(space)
    assert d["ebb.eta_tau"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert d["ebb.tau_max"] == optuna.distributions.FloatDistribution(2.0, 4.0, step=0.5)
    assert d["nlb.ref_window"] == optuna.distributions.IntDistribution(1, 50, log=True)
    assert d["optim.batch_size"] == optuna.distributions.IntDistribution(32, 128, step=32)
    assert d["method.name"] == optuna.distributions.CategoricalDistribution(["trades", "ard"])


def run_study(space_name: str, n: int, seed: int, base: RunConfig | None = None, sampler: str = "tpe") -> optuna.Study:
    space = load_space(space_name)
    base = base or RunConfig()
    from bmtard_ray.tuning.trials import base_values

    study = optuna.create_study(direction="maximize",
                                sampler=make_sampler(settings(seed=seed, num_samples=n, sampler=sampler)))
    fn = DefineByRun(space, base_values(base, space))

    def objective(trial: optuna.Trial) -> float:
        fn(trial)
        return -sum((v - 0.5) ** 2 for v in trial.params.values() if isinstance(v, float))

    study.optimize(objective, n_trials=n)
    return study


def test_define_by_run_samples_inside_the_ranges_and_is_seeded() -> None:
    space = load_space("ebb")
    a, b, c = run_study("ebb", 12, seed=3), run_study("ebb", 12, seed=3), run_study("ebb", 12, seed=4)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert [t.params for t in a.trials] != [t.params for t in c.trials]
    for t in a.trials:
        assert set(t.params) == {p.key for p in space.params if p.active(t.params)}
        for key, v in t.params.items():
            p = space.param(key)
            assert v in p.choices if p.kind == "categorical" else p.low <= v <= p.high
            assert t.distributions[key] == distribution(p)


@pytest.mark.parametrize("name", ["ebb", "joint"])
def test_optuna_chooses_the_ebb_mode_and_samples_each_modes_own_knobs_only_there(name: str) -> None:
    step_only = {"ebb.eta_tau", "ebb.tau_adv_init", "ebb.tau_nat_init"}
    study = run_study(name, 16, seed=1, sampler="random")  # TPE would settle on one mode for this toy objective
    modes = set()
    for t in study.trials:
        mode = t.params["ebb.mode"]
        modes.add(mode)
        assert step_only & set(t.params) == (step_only if mode == "step" else set())
        assert ("ebb.smoothing" in t.params) == (mode == "solve")
        assert {"ebb.target_entropy"} <= set(t.params)
    assert modes == {"step", "solve"}


def test_define_by_run_suggests_a_conditional_param_only_when_its_condition_holds() -> None:
    study = run_study("baselines", 15, seed=0)
    seen = set()
    for t in study.trials:
        method = t.params["method.name"]
        seen.add(method)
        assert ("method.trades_beta" in t.params) == (method == "trades")
        assert ("method.ard_alpha" in t.params) == (method == "ard")
        assert ("method.rslad_nat_weight" in t.params) == (method == "rslad")
        assert "optim.lr" in t.params
    assert seen == {"trades", "ard", "rslad"}


def test_a_condition_on_a_base_value_is_read_from_the_base_config() -> None:
    space = parse_space({"params": {"method.trades_beta": {"type": "float", "low": 1, "high": 9,
                                                           "when": {"method.name": "trades"}},
                                    "optim.lr": {"type": "float", "low": 0.01, "high": 0.1}}})
    for method, expected in (("trades", {"method.trades_beta", "optim.lr"}), ("bmtard", {"optim.lr"})):
        study = optuna.create_study()
        fn = DefineByRun(space, {"method.name": method})
        study.optimize(lambda t, fn=fn: (fn(t), 0.0)[1], n_trials=2)
        assert all(set(t.params) == expected for t in study.trials)


def test_tpe_sampler_is_seeded_and_nsga2_and_random_are_available() -> None:
    assert isinstance(make_sampler(settings()), optuna.samplers.TPESampler)
    assert isinstance(make_sampler(settings(sampler="random")), optuna.samplers.RandomSampler)
    nsga = make_sampler(settings(sampler="nsga2", objectives=("val_clean", "val_robust"), modes=("max", "max")))
    assert isinstance(nsga, optuna.samplers.NSGAIISampler)
    assert settings(num_samples=40).startup_trials == 10 and settings(num_samples=4).startup_trials == 2
    assert settings(num_samples=20, n_startup_trials=0).startup_trials == 0


# ---------------------------------------------------------------------------------------------------------
# Objectives, modes, settings.


def test_the_objective_must_be_a_metric_trials_report() -> None:
    check_objectives(("val_w_robust",), ("max",))
    with pytest.raises(ConfigError,
                       match="unknown objective 'val_accuracy': trials do not report it; choose from: .*val_w_robust"):
        check_objectives(("val_accuracy",), ("max",))
    with pytest.raises(ConfigError, match="unknown mode 'maximize'"):
        check_objectives(("val_clean",), ("maximize",))
    with pytest.raises(ConfigError, match="distinct"):
        check_objectives(("val_clean", "val_clean"), ("max", "max"))
    assert "epoch" in EPOCH_METRICS and "epoch" not in objective_names()  # reported, but not an objective


def test_settings_validation_catches_each_bad_value() -> None:
    settings().validate()
    cases = [({"num_samples": 0}, "--num-samples must be >= 1, got 0"),
             ({"sampler": "cmaes"}, "unknown sampler 'cmaes'"),
             ({"scheduler": "pbt"}, "unknown scheduler 'pbt'"),
             ({"sampler": "nsga2"}, "multi-objective sampler"),
             ({"grace_period": 0}, "--grace-period must be >= 1"),
             ({"reduction_factor": 1.0}, "--reduction-factor must be > 1"),
             ({"workers_per_trial": 0}, "--workers-per-trial must be >= 1"),
             ({"storage": "not a url"}, "is not a database URL"),
             ({"objectives": ("val_clean", "val_robust"), "modes": ("max",)}, "one mode per objective")]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            settings(**kw).validate()


def test_settings_round_trip_through_json() -> None:
    s = settings(objectives=("val_clean", "val_robust"), modes=("max", "max"), final_attacks=("clean", "fgsm"),
                 base_config={"optim": {"epochs": 3}})
    back = TuneSettings.from_json(s.to_json())
    assert back == s and back.multi and back.storage_url == "sqlite:////tmp/x/optuna.db"


def test_max_concurrent_trials_fits_the_cluster_and_refuses_what_cannot_run() -> None:
    assert max_concurrent_trials({"CPU": 2.0}, settings()) == 2
    assert max_concurrent_trials({"CPU": 16.0, "GPU": 2.0}, settings(gpus_per_worker=1.0)) == 2
    assert max_concurrent_trials({"CPU": 16.0}, settings(workers_per_trial=2, cpus_per_worker=3)) == 2
    assert max_concurrent_trials({"CPU": 64.0}, settings(num_samples=5)) == 5
    assert max_concurrent_trials({"CPU": 64.0}, settings(max_concurrent=3)) == 3
    with pytest.raises(ConfigError, match="one trial needs 4 CPU and 0 GPU .* but the Ray cluster has 2 CPU"):
        max_concurrent_trials({"CPU": 2.0}, settings(workers_per_trial=2, cpus_per_worker=2))
    with pytest.raises(ConfigError, match="has 8 CPU and 0 GPU"):
        max_concurrent_trials({"CPU": 8.0}, settings(gpus_per_worker=1))


def test_the_epoch_budget_counts_each_trials_highest_epoch() -> None:
    from bmtard_ray.tuning.experiment import EpochBudget

    stop = EpochBudget(5)
    for trial, epoch in (("a", 1), ("a", 2), ("b", 1), ("a", 2)):  # a repeated report does not count twice
        assert stop(trial, {"epoch": epoch}) is False
    assert stop.used() == 3 and not stop.stop_all()
    stop("b", {"epoch": 2})
    stop("c", {"training_iteration": 7})  # no epoch: not counted
    assert stop.used() == 4 and not stop.stop_all()
    stop("c", {"epoch": 1})
    assert stop.stop_all()
    with pytest.raises(ConfigError, match="--epoch-budget must be >= 1"):
        settings(epoch_budget=0).validate()


# ---------------------------------------------------------------------------------------------------------
# Ranking, Pareto front, the table.


def record(tid: str, clean: float, robust: float, status: str = "TERMINATED", epoch: int = 4, number: int = 0,
           **params: float) -> TrialRecord:
    m = {"epoch": epoch, "val_clean": clean, "val_robust": robust, "val_w_robust": (clean + robust) / 2}
    return TrialRecord(trial_id=tid, status=status, params=params or {"nlb.rho": 0.1}, metrics=m,
                       checkpoint_path=f"/ck/{tid}", max_epochs=4, number=number)


def test_pareto_mask_against_a_hand_computed_front() -> None:
    pts = [(80, 30), (70, 40), (75, 35), (60, 35), (80, 25), (70, 40)]
    # (60,35) is dominated by (75,35); (80,25) by (80,30); the two (70,40) tie and dominate neither each other.
    assert pareto_mask(pts, [True, True]) == [True, True, True, False, False, True]
    assert pareto_mask([(1, 5), (2, 3)], [False, False]) == [True, True]
    assert pareto_mask([(1, 5), (2, 6)], [False, False]) == [True, False]


def test_single_objective_ranking_puts_errors_and_nan_last() -> None:
    recs = [record("a", 70, 30), record("b", 80, 40), record("c", math.nan, 10), record("d", 90, 50, status="ERROR")]
    s = settings()
    assert [r.trial_id for r in rank(recs, s)] == ["b", "a", "c", "d"]
    assert best_record(recs, s).trial_id == "b"
    low = settings(objectives=("val_robust",), modes=("min",))
    assert [r.trial_id for r in rank(recs, low)] == ["c", "a", "b", "d"]  # only val_robust must be finite


def test_errored_trials_are_named_in_one_line_and_make_the_search_exit_1(tmp_path: Path) -> None:
    from bmtard_ray.api.results import SearchResult
    from bmtard_ray.cli.tune import exit_status
    from bmtard_ray.tuning.report import errored_line

    late = record("x", math.nan, math.nan, status="ERROR", number=7)
    early = record("y", math.nan, math.nan, status="ERROR", number=2)
    early.error, early.trial_dir = "ModuleNotFoundError: No module named 'gone'", "/exp/trial_y"
    line = errored_line([late, early], 24)
    assert "\n" not in line and line.startswith("2 of 24 trials errored")
    assert "Trial 2: ModuleNotFoundError: No module named 'gone' (traceback: /exp/trial_y/error.txt)" in line
    best = {"trial_id": "a", "folder": str(tmp_path)}
    assert exit_status(SearchResult({"best": best, "errored": 0}, tmp_path)) == 0
    assert exit_status(SearchResult({"best": best, "errored": 2}, tmp_path)) == 1
    assert exit_status(SearchResult({"best": None, "errored": 0}, tmp_path)) == 1


def test_multi_objective_ranking_is_pareto_front_first_then_w_robust() -> None:
    recs = [record("a", 90, 20), record("b", 60, 45), record("c", 70, 30), record("d", 65, 25), record("e", 80, 40)]
    s = settings(objectives=("val_clean", "val_robust"), modes=("max", "max"))
    assert pareto_ids(recs, s) == {"a", "b", "e"}
    assert [r.trial_id for r in rank(recs, s)] == ["e", "a", "b", "c", "d"]  # W: e 60, a 55, b 52.5 | c 50, d 45
    assert best_record(recs, s).trial_id == "e"


def test_the_leaderboard_marks_the_best_the_ties_within_one_standard_error_and_pinned_balances() -> None:
    from bmtard_ray.training.metrics import w_robust_se
    from bmtard_ray.tuning.results import leaderboard_markdown, notes

    recs = [record("a", 60.0, 30.0), record("b", 59.0, 30.0), record("c", 50.0, 20.0), record("d", 40, 10)]
    for r in recs:
        r.metrics["val_n"] = 256
    # d's robust teacher's temperature sat at a bound at every iteration of both epochs; c's only in one.
    recs[3].history = [{"tau_adv_at_bound": 100.0, "tau_nat_at_bound": 40.0}, {"tau_adv_at_bound": 100.0}]
    recs[2].history = [{"tau_adv_at_bound": 100.0}, {"tau_adv_at_bound": 99.0}]
    se = w_robust_se(60.0, 30.0, 256)
    # Binomial errors of 60 % and 30 % on 256 images: 3.06 and 2.86 points, their mean 2.96.
    assert se == pytest.approx(0.5 * (100 * math.sqrt(0.6 * 0.4 / 256) + 100 * math.sqrt(0.3 * 0.7 / 256)))
    assert 2.9 < se < 3.0
    got = notes(recs, settings())
    assert got["a"] == "best" and got["b"] == f"tied (within 1 SE = {se:.2f})"  # 0.5 points apart
    assert got["c"] == "" and got["d"] == "pinned at bounds: tau_adv"
    table = leaderboard_markdown(recs, settings(), "t")
    assert "| ±SE | note |" in table and f"| {se:.2f} | best |" in table
    assert w_robust_se(None, 30.0, 256) is None and w_robust_se(60.0, 30.0, None) is None


def test_optuna_trials_carry_their_outcome_and_balance() -> None:
    from bmtard_ray.tuning.searcher import outcome_attrs

    last = {"epoch": 3, "val_clean": 60.0, "val_robust": 30.0, "val_w_robust": 45.0, "val_n": 256,
            "tau_adv": 1.0, "tau_nat": 4.5, "w_adv": 0.4, "w_nat": 0.6, "H_adv": 1.9, "H_nat": 0.6,
            "H_target": math.nan, "tau_min": 1.0, "tau_max": 10.0, "tau_adv_at_bound": 100.0,
            "tau_nat_at_bound": 0.0}
    attrs = outcome_attrs(last, {1: (100.0, 50.0), 2: (100.0, 10.0), 3: (100.0, 0.0)})
    assert attrs["H_target"] is None  # NaN (the teachers are equalised, no target): stored as null, not NaN
    assert attrs["tau_adv_at_bound"] == 100.0 and attrs["tau_nat_at_bound"] == pytest.approx(20.0)
    assert attrs["val_w_robust"] == 45.0 and attrs["val_n"] == 256 and attrs["tau_nat"] == 4.5
    assert 2.9 < attrs["val_w_robust_se"] < 3.0
    assert json.loads(json.dumps(attrs, allow_nan=False)) == attrs  # what optuna-dashboard's JSON can carry


def _summary_tags(folder: Path) -> list[str]:
    """Every summary tag in the TensorBoard event files of ``folder`` (scalars, HPARAMS, custom scalars)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    tags = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            tags += [v.tag for v in event.summary.value]
    return tags


def test_trial_events_name_runs_by_optuna_number_and_log_the_balance_beside_its_target(tmp_path: Path) -> None:
    from conftest import read_scalars

    from bmtard_ray.tuning.tb import TrialEvents

    class Trial:  # what the logger reads of a Tune trial
        trial_id = "ab12c_00007"
        config = {"optuna_number": 7, "ebb.mode": "solve", "ebb.target_entropy": 0.4}

    space = load_space("ebb")
    events, trial = TrialEvents(tmp_path, space), Trial()
    events.log_trial_start(trial)
    for epoch, w in ((1, 30.0), (2, 35.5)):
        events.log_trial_result(epoch, trial, {"epoch": epoch, "val_w_robust": w, "H_adv": 1.5, "H_nat": 0.3,
                                               "H_target": 0.92, "tau_min": 0.5, "tau_max": 10.0,
                                               "tau_adv": math.nan, "training_iteration": epoch, "pid": 1})
    events.log_trial_end(trial)
    run = tmp_path / "tensorboard" / "007_ab12c_00007"
    scalars = read_scalars(run)
    assert scalars["validation/val_w_robust"] == {1: 30.0, 2: 35.5}  # step = epoch, run_train.py's tags
    assert scalars["balance/H_target"] == {1: pytest.approx(0.92), 2: pytest.approx(0.92)}
    assert {"balance/tau_min", "balance/tau_max", "balance/H_adv"} <= set(scalars)
    assert "balance/tau_adv" not in scalars and not any(t.startswith(("ray/", "other/")) for t in scalars)
    tags = _summary_tags(run)
    # HPARAMS: the experiment (every searched key as a column) and the trial's start, at its start; its end.
    assert tags.count("_hparams_/experiment") == 1 and tags.count("_hparams_/session_start_info") == 1
    assert tags.count("_hparams_/session_end_info") == 1 and "custom_scalars__config__" in tags


def test_the_parquet_table_has_a_row_per_trial_with_params_effective_values_and_metrics(tmp_path: Path) -> None:
    recs = [record("t2", 70, 30, epoch=1, number=1, **{"ebb.tau_adv_init": 4.0}),
            record("t1", 80, 40, number=0, **{"ebb.tau_adv_init": 1.5})]
    recs[0].effective = {"ebb.tau_adv_init": 2.5}
    s = settings()
    rows = table_rows(recs, s)
    assert [r["trial_id"] for r in rows] == ["t1", "t2"]
    assert [r["rank"] for r in rows] == [1, 2] and [r["number"] for r in rows] == [0, 1]
    assert rows[1]["param.ebb.tau_adv_init"] == 4.0 and rows[1]["run.ebb.tau_adv_init"] == 2.5
    assert rows[1]["stopped_early"] and not rows[0]["stopped_early"]
    write_table(recs, s, tmp_path / "t.parquet")
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.num_rows == 2 and {"val_w_robust", "param.ebb.tau_adv_init",
                                    "checkpoint_path"} <= set(table.column_names)
    assert set(EPOCH_METRICS) <= set(table.column_names)


def test_results_become_records_with_saved_statuses_and_effective_values(tmp_path: Path) -> None:
    """ResultGrid -> records, with stand-ins for Ray's Result objects and Tune's saved experiment state."""
    import pandas as pd

    from bmtard_ray.tuning.experiment import collect_records, is_complete, saved_statuses

    class FakeResult:
        def __init__(self, tid: str, config: dict, history: list[dict], error: Exception | None = None) -> None:
            self.path = str(tmp_path / f"trial_{tid}")
            self.config = config | {"tune_internal": 1}
            self.metrics = dict(history[-1], trial_id=tid, checkpoint_path=f"/ck/{tid}",
                                time_total_s=9.5) if history else {}
            self.metrics_dataframe = pd.DataFrame(history) if history else None
            self.error = error

    def state(name: str, statuses: dict[str, str]) -> None:
        trials = [[json.dumps({"trial_id": t, "status": st}), "{}"] for t, st in statuses.items()]
        (tmp_path / name).write_text(json.dumps({"trial_data": trials}))

    # Tune picks the newest state file by the timestamp in its name (an old one may be rewritten later).
    state("experiment_state-2026-01-01_10-00-05.json", {"a": "TERMINATED", "b": "RUNNING", "c": "ERROR"})
    state("experiment_state-2026-01-01_09-00-00.json", {"a": "PENDING"})
    statuses = saved_statuses(tmp_path)
    assert statuses == {"a": "TERMINATED", "b": "RUNNING", "c": "ERROR"}
    space = load_space("ebb")
    base = build_config("cpu", overrides=["ebb.target_mode=fraction"])
    s = settings(base_config=to_dict(base), num_samples=3)
    params = {"ebb.target_entropy": 0.5, "ebb.tau_min": 1.0, "ebb.tau_max": 3.0, "ebb.tau_adv_init": 4.5,
              "ebb.tau_nat_init": 2.0, "ebb.eta_tau": 0.01}
    hist = [{"epoch": 1, "val_clean": 50.0, "val_robust": 20.0, "val_w_robust": 35.0, "tau_adv": None},
            {"epoch": 2, "val_clean": 60.0, "val_robust": 30.0, "val_w_robust": 45.0, "tau_adv": None}]
    grid = [FakeResult("a", params, hist), FakeResult("b", params, hist[:1]), FakeResult("c", params, [],
                                                                                         RuntimeError("x\nboom"))]
    recs = collect_records(grid, s, space, max_epochs=6, statuses=statuses)
    a, b, c = recs
    assert [r.number for r in recs] == [0, 1, 2] and [r.status for r in recs] == ["TERMINATED", "RUNNING", "ERROR"]
    assert a.params == params  # Tune's own config keys dropped
    assert a.effective["ebb.tau_adv_init"] == 3.0 and a.effective["ebb.tau_nat_init"] == 2.0  # clipped to tau_max
    assert a.epochs == 2 and a.stopped_early and a.value("val_w_robust") == 45.0 and math.isnan(a.value("tau_adv"))
    assert [h["epoch"] for h in a.history] == [1.0, 2.0] and a.checkpoint_path == "/ck/a" and a.time_s == 9.5
    assert c.error == "boom" and c.metrics == {}
    assert not is_complete(statuses, s)  # b still RUNNING: --resume has work to do
    # After a resume Tune's order is not the study's: the number is Optuna's, recorded in the trial config.
    grid[0].config["optuna_number"], grid[1].config["optuna_number"] = 1, 0
    assert [r.number for r in collect_records(grid, s, space, max_epochs=6, statuses=statuses)][:2] == [1, 0]
    assert is_complete({"a": "TERMINATED", "b": "TERMINATED", "c": "ERROR"}, s)
    assert not is_complete({"a": "TERMINATED", "b": "TERMINATED"}, s)  # a trial was never created


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    from bmtard_ray.tuning import plots

    recs = [record("a", 70, 30, number=0), record("b", 80, 40, number=1, epoch=1), record("c", 60, 45, number=2)]
    s = settings(objectives=("val_clean", "val_robust"), modes=("max", "max"))
    paths = [plots.plot_objective(recs, settings(), tmp_path / "o.png"),
             plots.plot_pareto(recs, s, tmp_path / "p.png", best_id="b"),
             plots.plot_trajectories({"tau_adv": [1, 1.1], "tau_nat": [1, 1], "w_adv": [0.5, 0.6], "w_nat": [0.5, 0.4]},
                                     [0, 1], "iteration", tmp_path / "t.png", "t")]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png", "p.png", "t.png"]  # no temporary files left


# ---------------------------------------------------------------------------------------------------------
# Bad input on the command line: one line, exit 2, nothing written, Ray never started.


@pytest.mark.parametrize("argv, message", [
    (["--space", "nope"], "error: unknown search space 'nope'; choose one of:"),
    (["--space", "ebb", "--num-samples", "0"], "error: --num-samples must be >= 1, got 0"),
    (["--space", "ebb", "--objective", "val_acc"], "error: unknown objective 'val_acc': trials do not report it"),
    (["--space", "ebb", "--multi-objective", "--objectives", "val_clean"], "needs at least two metrics"),
    (["--space", "ebb", "--final-attacks", "clean,pgd99"], "unknown attack 'pgd99' in --final-attacks"),
    (["--space", "ebb", "--set", "val_every=2"], "tuning validates and checkpoints every epoch"),
    (["--space", "ebb", "--set", "ebb.mode=step"], "ebb.mode: searched by space ebb, so a value given with --set"),
    (["--space", "smoke", "--method", "trades", "--final-attacks", "clean,bb_pgd"], "crafted on the robust teacher"),
    (["--space", "ebb", "--epoch-budget", "0"], "--epoch-budget must be >= 1"),
    (["--space", "ebb", "--multi-objective", "--mode", "min"], "--objective/--mode are for one metric"),
    (["--space", "ebb", "--storage", "nonsense"], "is not a database URL"),
    ([], "error: give --space"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        argv: list[str], message: str) -> None:
    out = tmp_path / "out"
    code = tune_main([*argv, "--output-dir", str(out), "--data-root", str(tmp_path / "no-data")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not out.exists()
    import ray
    assert not ray.is_initialized()


def test_prepare_resolves_the_trials_config_and_the_settings(tmp_path: Path) -> None:
    from bmtard_ray.cli.tune import prepare, tune_parser

    args = tune_parser().parse_args(["--space", "ebb", "--output-dir", str(tmp_path), "--set", "nlb.rho=0.05",
                                     "--epochs", "3", "--num-samples", "5", "--multi-objective"])
    s, space, cfg = prepare(args)
    assert space.name == "ebb" and cfg.student == "small_cnn"          # the space's base preset: cpu
    assert cfg.ebb.target_mode == "fraction" and cfg.nlb.rho == 0.05 and cfg.optim.epochs == 3
    assert Path(cfg.data.root).is_absolute() and teacher_cache_dir(cfg) == str(tmp_path / "teachers")
    assert s.experiment_dir == str(tmp_path / "ebb") and s.num_samples == 5
    # Without --output-dir the teachers are the ones run_train.py caches: <cwd>/runs/teachers.
    default = prepare(tune_parser().parse_args(["--space", "ebb"]))[2]
    assert teacher_cache_dir(default) == str(Path.cwd() / "runs" / "teachers")
    # An experiment cannot take the teacher cache's folder.
    clash = tune_parser().parse_args(["--space", "ebb", "--output-dir", str(tmp_path), "--name", "teachers"])
    with pytest.raises(ConfigError, match="teacher cache"):
        prepare(clash)
    assert s.objectives == ("val_clean", "val_robust") and s.scheduler == "fifo" and s.base_config["nlb"]["rho"] == 0.05
    smoke = tune_parser().parse_args(["--smoke-test", "--space", "ebb", "--output-dir", str(tmp_path)])
    s, _, cfg = prepare(smoke)
    assert cfg.student == "tiny_cnn" and s.num_samples == 4 and s.final_attacks == ("clean", "fgsm", "pgd_sat")
    assert s.scheduler == "asha" and s.objectives == ("val_w_robust",) and s.modes == ("max",)
    assert not list(tmp_path.iterdir())  # nothing written


def test_malformed_space_file_and_missing_data_are_caught_before_ray(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  ebb.eta_tau: {type: float, low: 1, high: [\n")
    assert tune_main(["--space", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    assert f"error: {bad}: malformed YAML" in capsys.readouterr().err
    code = tune_main(["--space", "smoke", "--output-dir", str(tmp_path / "o"), "--data-root", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_an_existing_experiment_is_not_overwritten_by_accident(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "o" / "smoke"
    exp.mkdir(parents=True)
    (exp / "settings.json").write_text("{}")
    assert tune_main(["--space", "smoke", "--output-dir", str(tmp_path / "o")]) == 2
    assert "already holds an experiment; pass --resume" in capsys.readouterr().err
    assert tune_main(["--resume", str(tmp_path / "o" / "other")]) == 2
    assert "is not a run_tune.py experiment" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# End to end (slow): run_tune.py on the CIFAR-10 copy with tiny models, as a user runs it.


def stop_head(head: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` head started by a test: SIGTERM stops what it started; SIGKILL if it hangs."""
    head.terminate()
    try:
        head.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def smoke_args(tmp_path: Path, cifar_root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "run_tune.py"), "--smoke-test", "--data-root", str(cifar_root),
            "--output-dir", str(tmp_path / "runs"), "--quiet", *extra]  # teachers: <output-dir>/teachers


def check_experiment(exp: Path, n_trials: int, multi: bool = False) -> list[dict]:
    """What every finished experiment must hold; returns the trials table's rows."""
    space = load_space("smoke")
    rows = pq.read_table(exp / "trials.parquet").to_pylist()
    assert len(rows) == n_trials
    assert all(r["status"] == "TERMINATED" and r["epochs"] >= 1 for r in rows)
    for r in rows:
        assert 0 <= r["val_clean"] <= 100 and 0 <= r["val_robust"] <= 100
        assert r["val_w_robust"] == pytest.approx((r["val_clean"] + r["val_robust"]) / 2)
        for p in space.params:
            assert p.low <= r[f"param.{p.key}"] <= p.high
        assert Path(r["checkpoint_path"], "checkpoint.pt").is_file()
    # Every metric the objective check accepts is one a real trial reports (EPOCH_METRICS is not a guess).
    with open(next(exp.glob("trial_*/progress.csv"))) as f:
        reported = set(next(csv.reader(f)))
    assert set(EPOCH_METRICS) <= reported, set(EPOCH_METRICS) - reported
    # The trials differ: the smoke search's student learns, and its knobs move the outcome.
    assert len({r["val_w_robust"] for r in rows}) > 1, [r["val_w_robust"] for r in rows]
    # The Optuna study: one trial per Tune trial, linked to it; COMPLETE with the value(s) Tune saw last when
    # it trained every epoch, PRUNED when ASHA stopped it; the per-epoch curve as intermediate values.
    study = optuna.load_study(study_name=exp.name, storage=f"sqlite:///{exp / 'optuna.db'}")
    assert len(study.trials) == n_trials and len(study.directions) == (2 if multi else 1)
    assert study.metric_names == (["val_clean", "val_robust"] if multi else ["val_w_robust"])
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    for r in rows:
        t = by_id[r["trial_id"]]
        assert t.params == {p.key: r[f"param.{p.key}"] for p in space.params}
        # The trial's Ray Train run is named by its Optuna number and id (Ray's Train state ties them).
        assert t.user_attrs["run_folder"] == str(exp / "train" / f"trial{t.number:03d}_{r['trial_id']}")
        assert Path(t.user_attrs["run_folder"]).is_dir()
        # Its outcome and balance, where the user looks first (also for a trial ASHA stopped).
        assert t.user_attrs["val_w_robust"] == pytest.approx(r["val_w_robust"]) and t.user_attrs["val_n"] >= 1
        assert t.user_attrs["val_w_robust_se"] > 0 and t.user_attrs["tau_max"] >= t.user_attrs["tau_min"] > 0
        assert 0 <= t.user_attrs["tau_adv_at_bound"] <= 100 and 0 <= t.user_attrs["tau_nat_at_bound"] <= 100
        assert Path(t.user_attrs["trial_folder"], "progress.csv").is_file()
        if r["stopped_early"]:
            assert t.state == optuna.trial.TrialState.PRUNED, (r["trial_id"], t.state)
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE, (r["trial_id"], t.state)
            expected = [r["val_clean"], r["val_robust"]] if multi else [r["val_w_robust"]]
            assert t.values == pytest.approx(expected)
        if not multi:
            with open(Path(t.user_attrs["trial_folder"]) / "progress.csv") as f:
                hist = {int(float(h["epoch"])): float(h["val_w_robust"]) for h in csv.DictReader(f)}
            assert t.intermediate_values == pytest.approx(hist) and len(hist) == r["epochs"]
    if multi:  # the table's Pareto flags are the study's own Pareto front
        front = {tuple(sorted(t.params.items())) for t in study.best_trials}
        for r in rows:
            key = tuple(sorted((p.key, r[f"param.{p.key}"]) for p in space.params))
            assert r["pareto"] == (key in front)
    # The search recorded its cluster's identity, which --review checks a dashboard against.
    cluster = json.loads((exp / "ray_cluster.json").read_text())
    assert cluster["session_name"].startswith("session_") and ":" in cluster["gcs_address"]
    # TensorBoard: one run per trial, named by its Optuna number then its Ray id, with the balance's target.
    from conftest import read_scalars

    runs = sorted((exp / "tensorboard").iterdir())
    assert [r.name for r in runs] == sorted(f"{t.number:03d}_{t.user_attrs['ray_trial_id']}" for t in study.trials)
    for run in runs:
        scalars = read_scalars(run)
        trial_id = run.name.split("_", 1)[1]
        epochs = next(r["epochs"] for r in rows if r["trial_id"] == trial_id)
        assert sorted(scalars["validation/val_w_robust"]) == list(range(1, epochs + 1))
        assert set(scalars["balance/tau_max"]) == set(range(1, epochs + 1))
    assert not list(exp.glob("trial_*/events.out.tfevents.*"))  # Tune's own logger is replaced
    # Plots.
    for name in ("objective.png", "clean_vs_robust.png", "best_trajectories.png"):
        data = (exp / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    # The selected trial is the leaderboard's first, has the best validation W-Robust, and was evaluated on
    # the test split (and only there) with the requested suite.
    summary = json.loads((exp / "summary.json").read_text())
    best = summary["best"]
    assert best["validation"]["val_w_robust"] == max(r["val_w_robust"] for r in rows)
    assert f"| 1 | {best['trial_id']} |" in (exp / "leaderboard.md").read_text()
    board = (exp / "leaderboard.md").read_text()
    assert f"| 1 | {best['trial_id']} |" in board and "| best" in board and "| ±SE | note |" in board
    report = json.loads((exp / "best" / "test.json").read_text())
    assert set(report["accuracy"]) == {"clean", "fgsm", "pgd_sat"} and report["n_examples"] == 64
    assert report["split"] == "test" and best["test"]["accuracy"] == report["accuracy"]
    # ... and the study records the search and that selection.
    attrs = study.user_attrs
    assert attrs["space"] == "smoke" and attrs["preset"] == "smoke-search"
    assert attrs["objectives"] == ({"val_clean": "max", "val_robust": "max"} if multi else {"val_w_robust": "max"})
    chosen = attrs["selected_trial"]
    assert (chosen["ray_trial_id"], chosen["number"]) == (best["trial_id"], by_id[best["trial_id"]].number)
    # ... with the answers a reader needs: beyond noise or not, the balance, where the run is.
    assert chosen["versus_runner_up"].startswith(("tied", "ahead of the runner-up"))
    assert chosen["runner_up"]["number"] != chosen["number"]
    assert any(w in chosen["balance"] for w in ("target", "equalised", "apart", "did NOT act")), chosen["balance"]
    assert Path(chosen["run_folder"]).is_dir() and Path(chosen["run_folder"]).name.startswith(
        f"trial{chosen['number']:03d}_")
    assert f"**Selected: trial {chosen['number']}**" in board and chosen["versus_runner_up"] in board
    assert attrs["test_w_robust"] == pytest.approx(report["w_robust"] | {"n_examples": 64})
    import torch
    model = torch.load(exp / "best" / "model.pt", weights_only=True)
    assert model["arch"] == "tiny_cnn"
    assert model["config"]["ebb"]["eta_tau"] == pytest.approx(best["effective"]["ebb.eta_tau"])
    return rows


@pytest.mark.slow
def test_smoke_test_runs_a_search_end_to_end(tmp_path: Path, cifar_root: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(smoke_args(tmp_path, cifar_root, "--num-cpus", "2"), env=cli_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = check_experiment(tmp_path / "runs" / "smoke", 4)
    assert "optuna-dashboard sqlite:///" in proc.stdout
    print(f"smoke test: {time.monotonic() - start:.0f} s, {len(rows)} trials")


def _complete_trials(db: Path) -> int:
    import sqlite3

    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_an_interrupted_experiment_resumes_without_losing_a_finished_trial(tmp_path: Path, cifar_root: Path) -> None:
    args = smoke_args(tmp_path, cifar_root, "--num-cpus", "2", "--num-samples", "3", "--max-concurrent", "1")
    exp = tmp_path / "runs" / "smoke"
    proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while _complete_trials(exp / "optuna.db") < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    assert proc.poll() is None, "the experiment ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-4000:]
    assert f"--resume {exp}" in out
    rows = pq.read_table(exp / "trials.parquet").to_pylist()
    before = {r["trial_id"]: r for r in rows if r["status"] == "TERMINATED"}
    assert 1 <= len(before) < 3
    run_of = {tid: next((exp / "train").glob(f"trial*_{tid}")) for tid in before}  # trial<NNN>_<id>
    runs_before = {tid: sorted(p.name for p in run_of[tid].iterdir()) for tid in before}

    proc = subprocess.run([sys.executable, str(REPO / "run_tune.py"), "--resume", str(exp), "--num-cpus", "2",
                           "--quiet"], env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = check_experiment(exp, 3)
    after = {r["trial_id"]: r for r in rows}
    for tid, old in before.items():  # finished trials kept, not run again
        for key in ("val_clean", "val_robust", "val_w_robust", "epochs", "time_s", "checkpoint_path"):
            assert after[tid][key] == old[key], (tid, key)
        assert sorted(p.name for p in run_of[tid].iterdir()) == runs_before[tid]


@pytest.mark.slow
def test_works_under_ray_job_submit_with_token_authentication(tmp_path: Path, cifar_root: Path) -> None:
    """A private head node on 127.0.0.1 (free ports, RAY_AUTH_MODE=token with its own token), the smoke search
    in multi-objective mode submitted with `ray job submit`, outputs checked, head stopped (only ours: never
    `ray stop`, which would stop every Ray on the machine)."""
    import secrets

    ray_bin = Path(sys.executable).with_name("ray")
    gcs, dash = free_port(), free_port()
    token = secrets.token_hex(32)
    # RAY_ADDRESS in the head's own environment: its workers then find this cluster, not another one
    # running on the same machine (Ray Train's placement-group cleaner looks the cluster up that way).
    env = cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ADDRESS=f"127.0.0.1:{gcs}")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "true",
                             "--disable-usage-stats", *head_port_flags(gcs, dash)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        job_env = cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 120
        while subprocess.run([str(ray_bin), "job", "list", "--address", address], env=job_env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "the head node did not come up"
            time.sleep(2)
        # Without the token the job server refuses: token authentication is really on.
        denied = subprocess.run([str(ray_bin), "job", "list", "--address", address],
                                env=cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64), capture_output=True,
                                text=True)
        assert denied.returncode != 0 and "Authentication" in denied.stdout + denied.stderr
        runtime_env = json.dumps({"env_vars": {"PYTHONPATH": str(REPO)}})
        # The multi-objective mode (clean and robust accuracy, Optuna's multi-objective TPE) rides along here.
        job = subprocess.run([str(ray_bin), "job", "submit", "--address", address, "--runtime-env-json", runtime_env,
                              "--", *smoke_args(tmp_path, cifar_root, "--multi-objective")], env=job_env,
                             capture_output=True, text=True, timeout=900)
        assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, job.stdout[-4000:] + job.stderr[-4000:]
        check_experiment(tmp_path / "runs" / "smoke", 4, multi=True)
        # The job ran in a temporary copy of the code; its teachers stayed under the absolute --output-dir.
        assert len(list((tmp_path / "runs" / "teachers").glob("*/model.pt"))) == 2
    finally:
        stop_head(head)
