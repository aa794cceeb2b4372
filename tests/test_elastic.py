"""Elastic Ray Train runs (``--workers MIN-MAX``) and runs that lose a node, on a real multi-node Ray cluster
on this machine (tests/multinode.py): a run that loses a node continues on the survivor and grows back when a
node returns; a fixed run that cannot place its workers ends within its deadline with one line; a search
survives the loss of a node. The first tests are fast (no Ray cluster): the options and their checks.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

import faults
from multinode import local_cluster, node_ports, train_worker_nodes
from test_ray_train import column, smoke

from bmtard_ray.errors import ConfigError
from bmtard_ray.runner import run_local
from bmtard_ray.teachers import ensure_teachers

REPO = Path(__file__).resolve().parents[1]
QUIET = Console(quiet=True)


# ---------------------------------------------------------------------------------------------------------
# Fast: the options.


def scaling_of(*argv: str, ray_config: str | None = None, tmp: Path | None = None) -> Any:
    from bmtard_ray.cli import train_parser
    from bmtard_ray.ray_train import scaling_from_args

    if ray_config is not None:
        assert tmp is not None
        (tmp / "ray.yaml").write_text(ray_config)
        argv = (*argv, "--ray-config", str(tmp / "ray.yaml"))
    return scaling_from_args(train_parser().parse_args(list(argv)))


def test_a_worker_range_is_an_elastic_scaling_config_and_a_number_stays_fixed(tmp_path: Path) -> None:
    elastic = scaling_of("--workers", "1-2", "--resize-interval", "5")
    ray_cfg = elastic.to_ray()
    assert (ray_cfg.num_workers, ray_cfg.elastic_resize_monitor_interval_s) == ((1, 2), 5.0)
    assert ray_cfg.elasticity_enabled and (elastic.min_workers, elastic.max_workers) == (1, 2)
    assert elastic.describe() == "1-2 (elastic, resize check every 5 s)"
    fixed = scaling_of("--workers", "3")
    assert fixed.to_ray().num_workers == 3 and not fixed.to_ray().elasticity_enabled and fixed.describe() == "3"
    assert scaling_of().num_workers == 1 and scaling_of().wait_for_workers_s == 300
    for text in ("num_workers: [1, 2]\n", "num_workers: 1-2\n", "num_workers: '1-2'\n"):
        assert scaling_of(ray_config=text + "resize_interval_s: 7\n", tmp=tmp_path).to_ray().num_workers == (1, 2)
    both = scaling_of("--workers", "2", "--wait-for-workers", "20",
                      ray_config="num_workers: 1-4\nwait_for_workers_s: 99\n", tmp=tmp_path)
    assert (both.num_workers, both.wait_for_workers_s) == (2, 20)  # the flags win
    # An elastic range shares the CPUs over its maximum, so that all its workers fit on the whole cluster.
    from bmtard_ray.config import RunConfig

    four = [{"Alive": True, "Resources": {"CPU": 4.0}}]
    assert elastic.resolved(RunConfig(), four).cpus_per_worker == 2.0
    assert elastic.resolved(RunConfig(), four).num_workers == (1, 2)


@pytest.mark.parametrize("argv, ray_config, message", [
    (["--workers", "2-1"], None, "elastic worker range 2-1: the minimum is above the maximum"),
    (["--workers", "0-2"], None, "the minimum of the elastic range 0-2 must be an integer >= 1, got 0"),
    (["--workers", "two"], None, "number of workers must be N or MIN-MAX (e.g. 4 or 1-4), got 'two'"),
    ([], "num_workers: [1, 2, 3]\n", "number of workers must be N or MIN-MAX (e.g. 4 or 1-4), got [1, 2, 3]"),
    ([], "num_workers: [2, 1]\n", "elastic worker range 2-1: the minimum is above the maximum"),
    (["--workers", "1-2", "--resize-interval", "0"], None, "resize interval must be a number of seconds > 0, got 0.0"),
    (["--workers", "1-2"], "resize_interval_s: soon\n", "resize interval must be a number of seconds > 0, got 'soon'"),
    (["--workers", "2", "--resize-interval", "5"], None, "a resize interval applies to an elastic range of workers"),
    (["--wait-for-workers", "-1"], None, "wait for workers must be a number of seconds > 0, got -1.0"),
])
def test_bad_worker_ranges_and_intervals_are_one_line_errors(tmp_path: Path, argv: list[str], ray_config: str | None,
                                                             message: str) -> None:
    with pytest.raises(ConfigError) as err:
        scaling_of(*argv, ray_config=ray_config, tmp=tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_only_a_fixed_run_gets_a_placement_deadline_and_every_run_the_users_failure_budget() -> None:
    from bmtard_ray.ray_train import ScalingOptions
    from bmtard_ray.ray_train.placement import START_TIMEOUT_ENV, failure_config, placement_deadline

    fixed, elastic = ScalingOptions(num_workers=2, wait_for_workers_s=20), ScalingOptions(num_workers=(1, 2))
    before = os.environ.get(START_TIMEOUT_ENV)
    with placement_deadline(fixed):
        assert os.environ[START_TIMEOUT_ENV] == "20"
    assert os.environ.get(START_TIMEOUT_ENV) == before
    with placement_deadline(elastic):
        assert os.environ.get(START_TIMEOUT_ENV) == before
    assert (failure_config(fixed, 3).max_failures, failure_config(fixed, 3).controller_failure_limit) == (3, 0)
    assert (failure_config(elastic, 3).max_failures, failure_config(elastic, 3).controller_failure_limit) == (3, -1)


def test_the_search_has_a_failure_budget() -> None:
    from bmtard_ray.tuning.cli import tune_parser

    assert tune_parser().parse_args([]).max_failures == 2
    assert tune_parser().parse_args(["--max-failures", "0"]).max_failures == 0
