"""Search-space files: parsing, every validation error (one line naming file, key and problem), clipping,
conditional parameters and the corner check. Pure Python: no Ray, no Optuna."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bmtard_ray.config import RunConfig, build_config, flat_keys, nest
from bmtard_ray.errors import ConfigError
from bmtard_ray.tuning.space import SPACES_DIR, load_space, parse_space, resolve_space_path, space_names
from bmtard_ray.tuning.trials import active_values, check_space, corners, repair, trial_config


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert str(path) in message, "errors name the file"
    return message


# ---------------------------------------------------------------------------------------------------------
# The shipped spaces.


def test_the_shipped_spaces_are_the_ones_the_issue_asks_for_and_all_parse() -> None:
    assert {"ebb", "nlb", "joint", "baselines", "smoke"} <= set(space_names())
    for name in space_names():
        space = load_space(name)
        assert space.params, name
        assert all(p.key in flat_keys() for p in space.params)


@pytest.mark.parametrize("name", ["ebb", "nlb", "joint", "baselines", "smoke"])
def test_every_corner_of_every_shipped_space_is_a_valid_config(name: str) -> None:
    space = load_space(name)
    base = build_config(space.base_preset, extra=nest(space.base_set))
    n = check_space(space, base)
    assert n == math.prod(len(p.extremes()) for p in space.params)


def test_ebb_space_searches_what_the_issue_names() -> None:
    keys = set(load_space("ebb").keys)
    assert {"ebb.mode", "ebb.smoothing", "ebb.target_entropy", "ebb.tau_adv_init", "ebb.tau_nat_init", "ebb.tau_min",
            "ebb.tau_max",
            "ebb.eta_tau"} <= keys
    assert {"nlb.beta", "nlb.rho", "nlb.w_adv_init", "nlb.ref_window"} <= set(load_space("nlb").keys)
    joint = set(load_space("joint").keys)
    assert {"optim.lr", "optim.weight_decay", "ebb.target_entropy", "nlb.rho"} <= joint
    assert {"method.trades_beta", "method.ard_alpha"} <= set(load_space("baselines").keys)


@pytest.mark.parametrize("name", ["ebb", "joint"])
def test_the_ebb_spaces_let_optuna_choose_the_mode_with_each_modes_knobs_conditional(name: str) -> None:
    space = load_space(name)
    assert space.param("ebb.mode").choices == ("step", "solve")
    for key in ("ebb.eta_tau", "ebb.tau_adv_init", "ebb.tau_nat_init"):
        assert space.param(key).when == (("ebb.mode", ("step",)),), key
    assert space.param("ebb.smoothing").when == (("ebb.mode", ("solve",)),)
    assert space.param("ebb.target_entropy").when == ()  # shared by both rules
    # A solve trial carries its smoothing and none of the step's knobs; a step trial the reverse.
    base = build_config(space.base_preset, extra=nest(space.base_set))
    sampled = {p.key: p.extremes()[-1] for p in space.params}
    cfg, effective = trial_config(base, space, sampled | {"ebb.mode": "solve"})
    assert cfg.ebb.mode == "solve" and cfg.ebb.smoothing == 0.9
    assert not {"ebb.eta_tau", "ebb.tau_adv_init", "ebb.tau_nat_init"} & set(effective)
    assert cfg.ebb.eta_tau == RunConfig().ebb.eta_tau
    cfg, effective = trial_config(base, space, sampled | {"ebb.mode": "step"})
    assert cfg.ebb.mode == "step" and cfg.ebb.smoothing == 0.0 and "ebb.smoothing" not in effective
    assert cfg.ebb.eta_tau == 3.0e-2


def test_a_parsed_param_keeps_its_distribution() -> None:
    space = load_space("ebb")
    eta = space.param("ebb.eta_tau")
    assert (eta.kind, eta.low, eta.high, eta.log, eta.step) == ("float", 1e-4, 3e-2, True, None)
    assert space.base_preset == "cpu" and space.base_set == {"ebb.target_mode": "fraction"}
    window = load_space("nlb").param("nlb.ref_window")
    assert (window.kind, window.low, window.high, type(window.low)) == ("int", 1, 50, int)


# ---------------------------------------------------------------------------------------------------------
# Finding a space.


def test_unknown_space_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown search space 'ebbb'; choose one of: .*ebb.*nlb"):
        resolve_space_path("ebbb")


def test_missing_space_file() -> None:
    with pytest.raises(ConfigError, match="search space file /nope/x.yaml does not exist"):
        resolve_space_path("/nope/x.yaml")


def test_a_name_resolves_into_search_spaces_and_a_path_is_taken_as_is(tmp_path: Path) -> None:
    assert resolve_space_path("ebb") == SPACES_DIR / "ebb.yaml"
    path = write(tmp_path, "params: {ebb.eta_tau: {type: float, low: 0.001, high: 0.01}}", "mine.yaml")
    space = load_space(str(path))
    assert space.name == "mine" and space.keys == ("ebb.eta_tau",)


# ---------------------------------------------------------------------------------------------------------
# Each error case.


def test_malformed_yaml(tmp_path: Path) -> None:
    assert "malformed YAML" in error_of(tmp_path, "params: {ebb.eta_tau: {type: float, low: [1, }\n")


def test_top_level_must_be_a_mapping_with_params(tmp_path: Path) -> None:
    assert "expected a mapping with 'params'" in error_of(tmp_path, "- a\n- b\n")
    assert "'params' must be a non-empty mapping" in error_of(tmp_path, "description: nothing\n")
    assert "unknown top-level field 'parms'" in error_of(tmp_path, "parms: {}\n")


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "params:\n  ebb.target_entopy: {type: float, low: 0.1, high: 0.9}\n")
    assert "unknown config key 'ebb.target_entopy'" in msg and "did you mean ebb.target_entropy?" in msg


def test_unknown_type(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "params:\n  ebb.eta_tau: {type: loguniform, low: 0.001, high: 0.01}\n")
    assert "params.ebb.eta_tau: unknown type 'loguniform'; choose one of: float, int, categorical" in msg


def test_missing_type_and_unknown_field(tmp_path: Path) -> None:
    assert "params.ebb.eta_tau: missing 'type'" in error_of(tmp_path, "params:\n  ebb.eta_tau: {low: 0.1, high: 1}\n")
    msg = error_of(tmp_path, "params:\n  ebb.eta_tau: {type: float, lo: 0.1, high: 1}\n")
    assert "unknown field 'lo' for type float; accepted: type, low, high, log, step, when" in msg


def test_low_greater_than_high(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "params:\n  ebb.eta_tau: {type: float, low: 0.1, high: 0.01}\n")
    assert "params.ebb.eta_tau: low (0.1) > high (0.01)" in msg


@pytest.mark.parametrize("low", ["0", "-0.5"])
def test_log_scale_with_a_non_positive_bound(tmp_path: Path, low: str) -> None:
    msg = error_of(tmp_path, f"params:\n  ebb.eta_tau: {{type: float, low: {low}, high: 0.01, log: true}}\n")
    assert "params.ebb.eta_tau: log scale needs a positive low bound" in msg


def test_bounds_must_be_numbers_but_numeric_strings_are_read(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "params:\n  ebb.eta_tau: {type: float, low: small, high: 0.01}\n")
    assert "low must be a number, got 'small'" in msg
    # YAML 1.1 reads 1e-4 (no dot) as a string: accepted as the number the user meant.
    space = load_space(write(tmp_path, "params:\n  ebb.eta_tau: {type: float, low: 1e-4, high: 1e-2, log: true}\n"))
    assert space.param("ebb.eta_tau").low == 1e-4


def test_type_must_fit_the_key(tmp_path: Path) -> None:
    assert "nlb.ref_window is an integer key" in error_of(
        tmp_path, "params:\n  nlb.ref_window: {type: float, low: 1, high: 5}\n")
    assert "search it with type categorical" in error_of(
        tmp_path, "params:\n  method.name: {type: float, low: 1, high: 5}\n")
    assert "list-valued key" in error_of(tmp_path, "params:\n  optim.milestones: {type: int, low: 1, high: 5}\n")
    assert "type int needs an integer low" in error_of(
        tmp_path, "params:\n  nlb.ref_window: {type: int, low: 1.5, high: 5}\n")


def test_step_rules(tmp_path: Path) -> None:
    assert "cannot be both log-scaled and stepped" in error_of(
        tmp_path, "params:\n  ebb.eta_tau: {type: float, low: 0.1, high: 1, log: true, step: 0.1}\n")
    assert "step 0.3 does not divide high - low = 1" in error_of(
        tmp_path, "params:\n  ebb.tau_max: {type: float, low: 2, high: 3, step: 0.3}\n")
    assert "step must be > 0" in error_of(tmp_path, "params:\n  ebb.tau_max: {type: float, low: 2, high: 3, step: 0}\n")
    space = load_space(write(tmp_path, "params:\n  ebb.tau_max: {type: float, low: 2, high: 3, step: 0.25}\n"))
    assert space.param("ebb.tau_max").step == 0.25


def test_categorical_rules(tmp_path: Path) -> None:
    assert "non-empty list 'choices'" in error_of(tmp_path, "params:\n  method.name: {type: categorical}\n")
    assert "lists a value twice" in error_of(
        tmp_path, "params:\n  method.name: {type: categorical, choices: [trades, trades]}\n")
    assert "is not a scalar" in error_of(
        tmp_path, "params:\n  ebb.target_entropy: {type: categorical, choices: [[1, 2]]}\n")


def test_base_section_is_checked(tmp_path: Path) -> None:
    ok = "params:\n  ebb.eta_tau: {type: float, low: 0.001, high: 0.01}\n"
    assert "base.preset: unknown preset 'gpu'" in error_of(tmp_path, "base: {preset: gpu}\n" + ok)
    assert "base.set: unknown config key 'ebb.speed'" in error_of(tmp_path, "base: {set: {ebb.speed: x}}\n" + ok)
    assert "unknown field 'base.sets'" in error_of(tmp_path, "base: {sets: {}}\n" + ok)
    assert "both searched and fixed" in error_of(tmp_path, "base: {set: {ebb.eta_tau: 0.002}}\n" + ok)


def test_when_conditions_are_checked(tmp_path: Path) -> None:
    later = ("params:\n  method.trades_beta: {type: float, low: 1, high: 9, when: {method.name: trades}}\n"
             "  method.name: {type: categorical, choices: [trades, ard]}\n")
    assert "searched later in the file" in error_of(tmp_path, later)
    assert "when: unknown config key 'method.nam'" in error_of(
        tmp_path, "params:\n  method.trades_beta: {type: float, low: 1, high: 9, when: {method.nam: trades}}\n")


# ---------------------------------------------------------------------------------------------------------
# From sampled values to a trial config.


def test_initial_temperatures_are_clipped_into_the_sampled_bounds() -> None:
    space = load_space("ebb")
    base = build_config("cpu", overrides=["ebb.target_mode=fraction"])
    sampled = {"ebb.target_entropy": 0.5, "ebb.tau_min": 0.8, "ebb.tau_max": 2.5, "ebb.tau_adv_init": 4.0,
               "ebb.tau_nat_init": 0.6, "ebb.eta_tau": 0.001}
    cfg, effective = trial_config(base, space, sampled)
    assert (cfg.ebb.tau_adv_init, cfg.ebb.tau_nat_init) == (2.5, 0.8)
    assert effective["ebb.tau_adv_init"] == 2.5 and effective["ebb.tau_nat_init"] == 0.8
    assert effective["ebb.eta_tau"] == 0.001 and cfg.ebb.tau_max == 2.5
    # Values inside the bounds are left alone.
    cfg, effective = trial_config(base, space, sampled | {"ebb.tau_adv_init": 1.7})
    assert cfg.ebb.tau_adv_init == 1.7


def test_repair_only_touches_rules_with_a_sampled_key() -> None:
    cfg = RunConfig()
    cfg.ebb.tau_adv_init = 20.0  # invalid, but the user's own doing: validate reports it, repair does not hide it
    same, clipped = repair(cfg, {"nlb.rho": 0.1})
    assert same.ebb.tau_adv_init == 20.0 and clipped == {}
    fixed, clipped = repair(cfg, {"ebb.tau_max": 10.0})
    assert fixed.ebb.tau_adv_init == 10.0 and clipped == {"ebb.tau_adv_init": (20.0, 10.0)}


def test_conditional_parameters_apply_only_to_their_method() -> None:
    space = load_space("baselines")
    base = build_config("cpu")
    sampled = {"method.name": "ard", "method.trades_beta": 9.0, "method.ard_alpha": 0.7, "optim.lr": 0.02}
    assert active_values(space, base, sampled) == {"method.name": "ard", "method.ard_alpha": 0.7, "optim.lr": 0.02}
    cfg, effective = trial_config(base, space, sampled)
    assert cfg.method.name == "ard" and cfg.method.ard_alpha == 0.7
    assert cfg.method.trades_beta == RunConfig().method.trades_beta  # inactive: not applied
    assert "method.trades_beta" not in effective


def test_a_trial_value_that_breaks_validation_is_reported_with_the_values() -> None:
    space = parse_space({"params": {"nlb.rho": {"type": "float", "low": 0.5, "high": 2.0}}}, source="rho.yaml")
    base = build_config("cpu")
    with pytest.raises(ConfigError,
                       match=r"rho.yaml: trial values \{nlb.rho=2\} give an invalid config: "
                             r"nlb.rho must be in \(0, 1\]"):
        trial_config(base, space, {"nlb.rho": 2.0})


def test_the_corner_check_refuses_a_range_that_can_produce_an_invalid_trial() -> None:
    # target_entropy as a fraction of log K must be <= 1: a high bound of 1.5 is caught before any trial.
    space = parse_space({"base": {"set": {"ebb.target_mode": "fraction"}},
                         "params": {"ebb.target_entropy": {"type": "float", "low": 0.2, "high": 1.5}}}, source="h.yaml")
    base = build_config("cpu", overrides=["ebb.target_mode=fraction"])
    with pytest.raises(ConfigError, match="ebb.target_entropy as a fraction of log K must be in"):
        check_space(space, base)
    # Crossing bounds cannot be clipped: tau_min's range reaching above tau_max's is refused.
    crossing = parse_space({"params": {"ebb.tau_min": {"type": "float", "low": 1, "high": 3},
                                       "ebb.tau_max": {"type": "float", "low": 2, "high": 10}}}, source="c.yaml")
    with pytest.raises(ConfigError, match=r"ebb.tau_min \(3(\.0)?\) must be <= ebb.tau_max \(2(\.0)?\)"):
        check_space(crossing, RunConfig())


def test_corners_enumerate_every_combination_of_extremes() -> None:
    space = parse_space({"params": {"nlb.rho": {"type": "float", "low": 0.1, "high": 0.2},
                                    "method.name": {"type": "categorical", "choices": ["trades", "ard", "sat"]},
                                    "nlb.beta": {"type": "float", "low": 1.0, "high": 1.0}}})
    got = list(corners(space))
    assert len(got) == 2 * 3 * 1
    assert {(c["nlb.rho"], c["method.name"]) for c in got} == {(a, b) for a in (0.1, 0.2) for b in ("trades", "ard",
                                                                                                    "sat")}
    # Too many corners: each parameter's extremes one at a time, plus a seeded random sample.
    many = list(corners(space, limit=3))
    assert len(many) == (2 + 3 + 1) + 3


def test_space_files_are_plain_yaml_that_round_trips(tmp_path: Path) -> None:
    for name in space_names():
        data = yaml.safe_load((SPACES_DIR / f"{name}.yaml").read_text())
        assert set(data) <= {"description", "base", "params"}


def test_parsing_and_checking_a_space_needs_neither_ray_nor_optuna() -> None:
    """The pure-Python side of tuning imports with ray and optuna blocked (they are only for the Tune layer),
    and torch too (the metrics a search may optimise come from the training core's pure-Python table)."""
    code = ("import sys; sys.modules['ray'] = None; sys.modules['optuna'] = None; sys.modules['torch'] = None\n"
            "from bmtard_ray.tuning.space import load_space\n"
            "from bmtard_ray.tuning.trials import check_space\n"
            "from bmtard_ray.tuning.settings import TuneSettings, check_objectives\n"
            "from bmtard_ray.config import build_config\n"
            "s = load_space('nlb'); print(check_space(s, build_config('cpu')))\n")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "16"  # 2**4 corners of the nlb space
