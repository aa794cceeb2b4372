"""Elastic Ray Train runs (``--workers MIN-MAX``) and runs that lose a node, on a real multi-node Ray cluster
on this machine (tests/multinode.py): a run that loses a node continues on the survivor and grows back when a
node returns; a fixed run that cannot place its workers ends within its deadline with one line; a search
survives the loss of a node. The first tests are fast (no Ray cluster): the options and their checks.
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import faults
import pyarrow.parquet as pq
import pytest
import test_ray_train
import torch
from multinode import add_node, alive_train_worker_nodes, local_cluster, train_worker_nodes
from rich.console import Console

from bmtard_ray.errors import ConfigError
from bmtard_ray.training.metrics import TRACE_COLUMNS

# Shared with test_ray_train.py: helpers, and the teachers fixture.
column = test_ray_train.column
smoke = test_ray_train.smoke
teachers = test_ray_train.teachers

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# Fast: the options.


def scaling_of(*argv: str, ray_config: str | None = None, tmp: Path | None = None) -> Any:
    from bmtard_ray.cli.train import ray_options, train_parser

    if ray_config is not None:
        assert tmp is not None
        (tmp / "ray.yaml").write_text(ray_config)
        argv = (*argv, "--ray-config", str(tmp / "ray.yaml"))
    return ray_options(train_parser().parse_args(list(argv))).scaling


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
    from bmtard_ray.cli.tune import tune_parser

    assert tune_parser().parse_args([]).max_failures == 2
    assert tune_parser().parse_args(["--max-failures", "0"]).max_failures == 0


# ---------------------------------------------------------------------------------------------------------
# Slow: a head node (1 CPU: the driver, the Train controller and one worker) and a second 1-CPU node that
# the tests remove and add back. The driver always connects to the head (Ray prefers it on one host), and
# the controller is pinned to the driver's node, so removing the other node takes only a worker with it.


@pytest.fixture(scope="module")
def cluster() -> Any:
    with local_cluster({"resources": {"head": 1}}, {}) as c:
        yield c


def head_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def other_node(cluster: Any) -> Any:
    """The one node besides the head (the tests keep exactly one)."""
    (node,) = cluster.worker_nodes
    return node


def wait_for(what: str, check: Any, timeout_s: float, every_s: float = 0.5, detail: Any = lambda: "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}: {detail()}"
        time.sleep(every_s)


@pytest.mark.slow
def test_a_fixed_run_that_cannot_place_its_workers_ends_within_its_deadline_with_one_line(
        cluster: Any, tmp_path: Path, cifar_root: Path, teachers: Path) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class Holder:  # defined here: pickled by value (the nodes cannot import this test module)
        def ping(self) -> bool:
            return True

    # The cluster has 2 CPUs in all (so the run passes its up-front resource check), but another job holds
    # the second node's CPU: only 1 of the 2 workers can be placed.
    holder = ray.remote(num_cpus=1)(Holder).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(other_node(cluster).node_id, soft=False)).remote()
    ray.get(holder.ping.remote(), timeout=60)
    # COLUMNS: the driver's start line unwrapped (rich wraps at 80 columns in a pipe).
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=cluster.address, COLUMNS="400")
    cmd = [sys.executable, str(REPO / "run_train.py"), "--preset", "smoke", "--data-root", str(cifar_root),
           "--output-dir", str(tmp_path / "runs"), "--set", f"teachers.cache_dir={teachers}",
           "--set", "data.augment=false", "--workers", "2", "--cpus-per-worker", "1", "--gpus-per-worker", "0",
           "--wait-for-workers", "20"]
    errors = tmp_path / "stderr.txt"
    try:
        # stderr to a file: only the reader thread reads the stdout pipe (communicate() would race it for lines).
        with open(errors, "w") as err_file:
            proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=err_file, text=True)
        started: list[float] = []
        out: list[str] = []

        def read_stdout() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.append(line)
                if "Ray worker(s) x" in line and not started:
                    started.append(time.monotonic())

        reader = threading.Thread(target=read_stdout, daemon=True)
        reader.start()
        proc.wait(timeout=300)
        ended = time.monotonic()
        reader.join(timeout=10)
    finally:
        ray.kill(holder)
    err = errors.read_text()
    assert proc.returncode == 2, (err[-3000:], "".join(out)[-2000:])
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-1] == ("error: the Ray cluster could place only 1 of the 2 workers (1 CPU each) this run needs "
                         "within 20 s (--wait-for-workers): free resources or add nodes and resume the run, or give "
                         "an elastic range such as --workers 1-2"), err[-3000:]
    # The driver says it once, without a traceback. (A joined cluster also forwards the Train controller's
    # own log of the timeout, its lines prefixed by "(TrainController pid=...)".)
    driver = [ln for ln in lines if not re.match(r"^(\x1b\[\d+m)?\(\w+ pid=\d+", ln)]
    assert sum(ln.startswith("error: ") for ln in lines) == 1, err[-3000:]
    assert not any("Traceback" in ln for ln in driver), err[-3000:]
    assert started and ended - started[0] < 20 + 30, (ended - started[0], "".join(out))  # the deadline, not forever
    assert not (tmp_path / "runs" / "bmtard-smoke" / "metrics.parquet").exists()  # never ran with fewer


@pytest.mark.slow
def test_an_elastic_run_that_loses_a_node_continues_on_the_survivor_and_grows_back_when_a_node_returns(
        cluster: Any, tmp_path: Path, cifar_root: Path, teachers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.util.state import list_actors

    from bmtard_ray.ray_train import ScalingOptions, run_ray

    # Seconds, not minutes: the controller polls every 0.5 s, and a worker group the (up to 20 s stale)
    # node view sized with the lost node gives up on its placement after 10 s and is sized again.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    epochs, iters = 6, 1024 // 32
    cfg = smoke(tmp_path, cifar_root, teachers, "name=elastic", f"optim.epochs={epochs}",
                "data.train_subset=1024")
    marker, hold = tmp_path / "paused", tmp_path / "hold"
    hold.write_text("slow while on one worker\n")
    out = io.StringIO()
    result: dict[str, Any] = {}

    def fit() -> None:
        try:
            result["summary"] = run_ray(
                cfg, ScalingOptions(num_workers=(1, 2), cpus_per_worker=1, gpus_per_worker=0, resize_interval_s=5),
                failure_max=2, keep_checkpoints=10, console=Console(file=out, width=300),
                worker_hook=faults.hook("lose_node_mid_epoch", epoch=3, after_steps=4, marker=str(marker),
                                        hold=str(hold), slow_s=0.3))
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    runner = threading.Thread(target=fit, daemon=True)
    runner.start()
    run = tmp_path / "runs" / "elastic"
    try:
        wait_for("the pause in epoch 3", lambda: marker.exists() or "error" in result, 240)
        assert "error" not in result, result
        # Mid-epoch 3, with epoch 2's checkpoint registered by the controller (what the restart continues from).
        snapshot = run / "checkpoint_manager_snapshot.json"
        wait_for("epoch 2's checkpoint", lambda: snapshot.exists() and "checkpoint_epoch0002" in snapshot.read_text(),
                 30)
        before = alive_train_worker_nodes()
        assert len(before) == 2 and len(set(before)) == 2, before  # one worker on each node
        controllers = list_actors(filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])
        assert [a.node_id for a in controllers] == [head_id()]  # the node we remove holds no controller
        lost = other_node(cluster)
        cluster.remove_node(lost)

        def detail() -> str:
            return (f"workers on {alive_train_worker_nodes()} (head {head_id()}), {result}, "
                    f"driver output:\n{out.getvalue()}")

        wait_for("the run to continue on the head's worker alone",
                 lambda: alive_train_worker_nodes() == [head_id()] and "now 1 worker(s)" in out.getvalue(), 120,
                 detail=detail)
        back = add_node(cluster)
        grown = wait_for("two workers again", lambda: sorted(alive_train_worker_nodes()) == sorted([head_id(),
                                                                                                    back.node_id]),
                         150, detail=detail)
        assert grown
    finally:
        hold.unlink(missing_ok=True)
        runner.join(timeout=300)
    assert not runner.is_alive() and "error" not in result, result.get("error")
    text = out.getvalue()
    assert "1-2 (elastic, resize check every 5 s) Ray worker(s) x (1 CPU, pack)" in text, text
    assert "now 1 worker(s) (was 2)" in text and "now 2 worker(s) (was 1)" in text, text
    assert result["summary"]["epochs"] == epochs
    assert column(run, "epoch") == list(range(1, epochs + 1))  # every epoch exactly once
    assert column(run, "iteration", "trace") == list(range(epochs * iters))  # no gap, no repeat
    # Epochs 1-2 are the ones trained before the loss, carried by epoch 2's checkpoint; from there tau and w
    # go on where they were (no reset to their initial values): no step across the restart moves them more
    # than the largest step before it.
    saved = torch.cat(torch.load(run / "checkpoint_epoch0002" / "checkpoint.pt", weights_only=False)["trace"])
    moved = []
    for name in ("tau_adv", "tau_nat", "w_adv", "w_nat"):
        values = column(run, name, "trace")
        assert values[:2 * iters] == pytest.approx(saved[:, TRACE_COLUMNS.index(name)].tolist(), rel=1e-6), name
        if values[2 * iters - 1] != values[0]:
            moved.append(name)
        largest = max(abs(b - a) for a, b in zip(values[:2 * iters - 1], values[1:2 * iters], strict=False))
        assert abs(values[2 * iters] - values[2 * iters - 1]) <= largest + 1e-9, name
    # The weights had moved before the loss, so "no reset" means something (a temperature moves only when
    # the teachers' entropies differ enough within 64 steps of a tiny model: not checked).
    assert {"w_adv", "w_nat"} <= set(moved), moved



@pytest.mark.slow
def test_a_search_survives_the_loss_of_a_node_and_completes_every_trial(
        cluster: Any, tmp_path: Path, cifar_root: Path) -> None:
    import json

    import ray

    lost = other_node(cluster)
    before = set(train_worker_nodes())
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=cluster.address)
    proc = subprocess.Popen([sys.executable, str(REPO / "run_tune.py"), "--smoke-test", "--data-root", str(cifar_root),
                             "--output-dir", str(tmp_path / "runs"), "--quiet", "--num-samples", "2",
                             "--max-concurrent", "2", "--scheduler", "fifo", "--final-attacks", "clean",
                             "--final-examples", "64", "--address", cluster.address, "--max-failures", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    exp = tmp_path / "runs" / "smoke"
    try:
        # Both trials running, one worker on each node, each with a checkpoint (its first epoch done).
        def both_running_with_a_checkpoint() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            runs = list((exp / "train").glob("*")) if (exp / "train").is_dir() else []
            workers = [n for a, n in train_worker_nodes(since=before).items()]
            alive = alive_train_worker_nodes()
            return (len(runs) == 2 and all(any(r.glob("checkpoint_epoch*")) for r in runs)
                    and len(workers) == 2 and sorted(alive) == sorted([head_id(), lost.node_id]))

        wait_for("both trials to checkpoint an epoch", both_running_with_a_checkpoint, 420, every_s=1)
        cluster.remove_node(lost)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, output[-4000:]
    rows = pq.read_table(exp / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows), rows
    # A worker died with the node and a replacement ran on the head; no trial started over from epoch 1.
    workers = train_worker_nodes(since=before)
    assert lost.node_id in workers.values() and len(workers) > 2, workers
    assert set(workers.values()) <= {head_id(), lost.node_id}
    for trial in exp.glob("trial_*"):
        lines = (trial / "result.json").read_text().splitlines()
        epochs = [json.loads(line)["epoch"] for line in lines if line.strip()]
        assert sorted(set(epochs)) == [1, 2, 3] and epochs.count(1) == 1, (trial.name, epochs)
    assert ray.is_initialized()


@pytest.mark.slow
def test_a_preemption_notice_checkpoints_at_once_and_its_restart_is_not_a_failure(
        cluster: Any, tmp_path: Path, cifar_root: Path, teachers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node drained for preemption (a spot reclaim's notice, 15 s ahead): the run checkpoints in the middle of
    the epoch as soon as the workers hear of it and trains on; at the deadline Ray Train stops it, the node
    goes, and the run continues from that checkpoint on the head. With --max-failures 0 the run would end on any
    failure: the restart is charged to Ray's preemption budget instead."""
    import json

    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    from bmtard_ray.ray_train import ScalingOptions, run_ray

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
    if not cluster.worker_nodes:  # a test before this one removed the second node
        add_node(cluster)
        # Ray Train sizes an elastic group from its autoscaling coordinator's view of the nodes, refreshed
        # every 20 s (TICK_INTERVAL_S): started sooner, this run would see one node and start 1 worker.
        time.sleep(25)
    epochs, iters = 6, 1024 // 32  # 0.25 s a step: about 50 s of training, so the deadline falls inside it
    cfg = smoke(tmp_path, cifar_root, teachers, "name=preempted", f"optim.epochs={epochs}",
                "data.train_subset=1024")
    starts = tmp_path / "starts.jsonl"
    out = io.StringIO()
    result: dict[str, Any] = {}

    def fit() -> None:
        try:
            result["summary"] = run_ray(
                cfg, ScalingOptions(num_workers=(1, 2), cpus_per_worker=1, gpus_per_worker=0, resize_interval_s=3600),
                failure_max=0, keep_checkpoints=10, console=Console(file=out, width=300),
                worker_hook=faults.hook("record_start", path=str(starts), slow_s=0.25))
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    runner = threading.Thread(target=fit, daemon=True)
    runner.start()
    run = tmp_path / "runs" / "preempted"
    try:
        wait_for("two workers past epoch 1", lambda: "error" in result or (
            len(alive_train_worker_nodes()) == 2 and (run / "checkpoint_epoch0001").is_dir()), 240)
        assert "error" not in result, result
        node = other_node(cluster)
        deadline = time.time() + 15
        accepted, why = GcsClient(address=cluster.address).drain_node(
            node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "test: spot reclaim",
            int(deadline * 1000))
        assert accepted, why
        noticed = wait_for("the checkpoint taken on the notice", lambda: sorted(run.glob("checkpoint_epoch*_batch*")),
                           60)
        # At the drain's deadline Ray Train stops the group; the cloud then reclaims the node (here: removed once
        # nothing of the run is left on it), and the run restarts without it.
        wait_for("the group stopped at the deadline", lambda: time.time() > deadline
                 and node.node_id not in alive_train_worker_nodes(), 90)
        cluster.remove_node(node)
        wait_for("the restart on the head", lambda: "error" in result or (
            starts.exists() and len(starts.read_text().splitlines()) >= 2), 120)
        add_node(cluster)  # the module's other tests expect a second node
    finally:
        runner.join(timeout=400)
    assert not runner.is_alive() and "error" not in result, (result.get("error"), out.getvalue()[-3000:])
    # The notice's checkpoint: mid-epoch, after the epochs and batches its name says.
    done, batches = map(int, re.fullmatch(r"checkpoint_epoch(\d+)_batch(\d+)", noticed[0].name).groups())
    assert 0 < batches < iters
    attempts = [json.loads(line) for line in starts.read_text().splitlines()]
    assert attempts[0] == {"world_size": 2, "epoch": 0, "batches": 0}
    assert len(attempts) == 2, attempts  # one restart
    restart = attempts[1]
    assert restart["world_size"] == 1  # on the head alone
    # It continued from the notice's checkpoint, or a later one reported before the node went: never earlier.
    assert (restart["epoch"], restart["batches"]) >= (done, batches), (restart, noticed[0].name)
    assert result["summary"]["epochs"] == epochs
    assert column(run, "epoch") == list(range(1, epochs + 1))  # every epoch exactly once
    assert column(run, "iteration", "trace") == list(range(epochs * iters))  # no gap, no repeat
