"""Several Ray nodes on one machine (tests/multinode.py): a run with one worker per node, a node that lacks
the data folder, and a search whose trials and teachers run on the cluster's nodes.

Every node is a separate raylet with 1 CPU and a resource of its own; all share one IP address, so where a
worker ran is read from Ray's State API as a node id. Tiny models (the smoke preset), a few minutes together.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import test_ray_train
from multinode import local_cluster, node_without, train_worker_nodes
from rich.console import Console

from bmtard_ray.errors import DataError
from bmtard_ray.launch.local import run_local

# Shared with test_ray_train.py: helpers, and the teachers fixture.
TRAJ_TAU_TOL = test_ray_train.TRAJ_TAU_TOL
TRAJ_W_TOL = test_ray_train.TRAJ_W_TOL
column = test_ray_train.column
smoke = test_ray_train.smoke
teachers = test_ray_train.teachers

REPO = Path(__file__).resolve().parents[1]
QUIET = Console(quiet=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes() -> Any:
    with local_cluster({"resources": {"node_a": 1}}, {"resources": {"node_b": 1}}) as cluster:
        yield cluster


def alive_node_ids() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_a_spread_run_puts_one_worker_on_each_node_and_matches_the_single_node_run(
        two_nodes: Any, tmp_path: Path, cifar_root: Path, teachers: Path) -> None:
    from bmtard_ray.ray_train import ScalingOptions, run_ray

    assert len(alive_node_ids()) == 2
    before = set(train_worker_nodes())
    cfg = smoke(tmp_path, cifar_root, teachers, "name=spread")
    out = io.StringIO()
    summary = run_ray(cfg, ScalingOptions(num_workers=2, cpus_per_worker=1, gpus_per_worker=0,
                                          placement_strategy="SPREAD"), console=Console(file=out, width=300))
    workers = train_worker_nodes(since=before)
    assert len(workers) == 2, workers
    assert len(set(workers.values())) == 2 and set(workers.values()) == alive_node_ids(), workers  # distinct nodes
    local = run_local(smoke(tmp_path, cifar_root, teachers, "name=local"), console=QUIET)
    run, local_run = tmp_path / "runs" / "spread", tmp_path / "runs" / "local"
    # The same outputs as the run on one node (Ray adds its checkpoint folders and snapshot).
    ray_own = {"checkpoint_manager_snapshot.json", ".validate_storage_marker"}

    def names(folder: Path) -> set[str]:
        # TensorBoard event files are named by time, host and pid: compare them as one kind of file.
        return {"events.out.tfevents" if p.name.startswith("events.out.tfevents") else p.name for p in folder.iterdir()}

    files = {n for n in names(run) if not n.startswith("checkpoint_epoch")} - ray_own
    assert files == names(local_run) - {"checkpoint.pt"}, files
    assert {p.name for p in (run / "eval").iterdir()} == {p.name for p in (local_run / "eval").iterdir()}
    assert summary["epochs"] == local["epochs"] == cfg.optim.epochs
    assert set(summary["results"]) == set(local["results"])
    assert column(run, "iteration", "trace") == column(local_run, "iteration", "trace")
    for name, tol in (("tau_adv", TRAJ_TAU_TOL), ("tau_nat", TRAJ_TAU_TOL), ("w_adv", TRAJ_W_TOL),
                      ("w_nat", TRAJ_W_TOL)):
        assert column(run, name, "trace") == pytest.approx(column(local_run, name, "trace"), abs=tol), name
    assert [ln.split(" | ")[0] for ln in out.getvalue().splitlines() if ln.startswith("epoch ")] == \
        ["epoch 1/2", "epoch 2/2"]


def test_a_node_without_the_data_folder_fails_with_one_line_naming_the_node_and_path(
        two_nodes: Any, tmp_path: Path, cifar_root: Path, teachers: Path) -> None:
    from bmtard_ray.ray_train import ScalingOptions, run_ray

    data = cifar_root.resolve()
    before = alive_node_ids()
    with node_without(data, two_nodes.address, tmp_path / "node.log", {"node_c": 1}):
        (bare,) = alive_node_ids() - before
        # Three 1-CPU workers on three 1-CPU nodes: one of them lands on the node without the data.
        cfg = smoke(tmp_path, cifar_root, teachers, "name=nodata", "optim.batch_size=30")
        start = time.monotonic()
        with pytest.raises(DataError) as err:
            run_ray(cfg, ScalingOptions(num_workers=3, cpus_per_worker=1, gpus_per_worker=0,
                                        placement_strategy="SPREAD"), failure_max=0, console=QUIET)
        elapsed = time.monotonic() - start
    from ray.util import get_node_ip_address

    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"node {bare} ({get_node_ip_address()}) cannot read the data folder ") and \
        message.endswith("cifar-10-batches-py: every node needs the same path: put it on a shared filesystem or "
                         "copy it to each node"), message
    assert elapsed < 120, elapsed  # before the first step: no hang
    assert not (tmp_path / "runs" / "nodata" / "metrics.parquet").exists()


def test_a_search_spreads_its_trials_and_trains_its_teachers_as_ray_tasks(
        two_nodes: Any, tmp_path: Path, cifar_root: Path) -> None:
    from ray.util.state import list_tasks

    before = set(train_worker_nodes())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["RAY_ADDRESS"] = two_nodes.address
    proc = subprocess.run([sys.executable, str(REPO / "run_tune.py"), "--smoke-test", "--data-root", str(cifar_root),
                           "--output-dir", str(tmp_path / "runs"), "--quiet", "--num-samples", "2",
                           "--max-concurrent", "2", "--scheduler", "fifo", "--final-attacks", "clean",
                           "--final-examples", "64", "--address", two_nodes.address],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = pq.read_table(tmp_path / "runs" / "smoke" / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
    # Two 1-CPU trials side by side on two 1-CPU nodes: one trial's worker on each node.
    workers = train_worker_nodes(since=before)
    assert len(workers) == 2 and set(workers.values()) == alive_node_ids(), workers
    # The teachers were trained as Ray tasks (on a node with a trial worker's CPU), not in the driver.
    tasks = [t for t in list_tasks(filters=[("type", "=", "NORMAL_TASK")], limit=1000, raise_on_missing_output=False)
             if t.name.startswith("train_teacher:")]
    assert sorted(t.state for t in tasks) == ["FINISHED", "FINISHED"], tasks
    assert {t.node_id for t in tasks} <= alive_node_ids()
    assert len(list((tmp_path / "runs" / "teachers").glob("*/model.pt"))) == 2
