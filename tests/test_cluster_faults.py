"""Cluster faults end in one line, a non-zero exit, no traceback and no half-made folder (issue 28).

On a real multi-node Ray cluster on this machine (tests/multinode.py), the driver always a subprocess: a node
that cannot write the storage path or lacks the data folder stops the run before anything is written; a head
that dies under a run or a search ends it with the exact ``--resume`` command, which works (with ``--local``).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faults
import pytest
import test_ray_train
from multinode import kill_head, local_cluster, node_without

# Shared with test_ray_train.py: a helper, and the teachers fixture.
column = test_ray_train.column
teachers = test_ray_train.teachers

REPO = Path(__file__).resolve().parents[1]


def driver_env(address: str) -> dict[str, str]:
    # COLUMNS: rich wraps at 80 columns in a pipe; the one line must stay one line.
    return dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=address, COLUMNS="400")


def train_args(tmp: Path, cifar_root: Path, teachers: Path, *extra: str) -> list[str]:
    return ["--preset", "smoke", "--data-root", str(cifar_root), "--output-dir", str(tmp / "runs"),
            "--set", f"teachers.cache_dir={teachers}", "--set", "data.augment=false", *extra]


def one_line_end(proc: subprocess.CompletedProcess[str] | Any, out: str, err: str, rc: int) -> str:
    """The checks every fault shares: exit status, no traceback anywhere, one error line, last."""
    assert proc.returncode == rc, (proc.returncode, err[-3000:], out[-2000:])
    assert "Traceback" not in out + err, (err[-4000:], out[-2000:])
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert [ln for ln in lines if ln.startswith("error: ")] == [lines[-1]], err[-3000:]
    return lines[-1]


def others(err: str) -> list[str]:
    """stderr without Ray's own two lines when the driver joins a cluster ('Connecting to', 'Connected to')."""
    joining = re.compile(r"\sINFO worker\.py:\d+ -- Connect")
    return [ln for ln in err.strip().splitlines() if ln.strip() and not joining.search(ln)]


# ---------------------------------------------------------------------------------------------------------
# A node that cannot read or write what the run needs: stopped before anything is written.


@pytest.fixture(scope="module")
def two_nodes() -> Any:
    with local_cluster({"resources": {"node_a": 1}}, {"resources": {"node_b": 1}}) as cluster:
        yield cluster


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["read-only storage", "no data folder"])
def test_a_node_that_cannot_write_the_storage_or_read_the_data_stops_the_run_before_anything_is_written(
        two_nodes: Any, tmp_path: Path, cifar_root: Path, teachers: Path, fault: str) -> None:
    import ray

    storage = tmp_path / "shared"
    storage.mkdir()
    folder, read_only = (storage, True) if fault == "read-only storage" else (cifar_root.resolve(), False)
    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    with node_without(folder, two_nodes.address, tmp_path / "node.log", {"node_c": 1}, read_only=read_only):
        (bad,) = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
        start = time.monotonic()
        proc = subprocess.run([sys.executable, str(REPO / "run_train.py"),
                               *train_args(tmp_path, cifar_root, teachers, "--set", "optim.batch_size=30"),
                               "--workers", "3", "--cpus-per-worker", "1", "--gpus-per-worker", "0",
                               "--placement", "strict_spread", "--storage-path", str(storage),
                               "--address", two_nodes.address],
                              env=driver_env(two_nodes.address), cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        elapsed = time.monotonic() - start
    line = one_line_end(proc, proc.stdout, proc.stderr, 2)
    assert line.startswith(f"error: node {bad} ("), line
    if fault == "read-only storage":
        assert f"run folder {storage / 'bmtard-smoke'} is not writable: {storage} refuses new files (Read-only " \
               "file system)" in line, line
    else:
        assert f"cannot read the data folder {cifar_root.resolve() / 'cifar-10-batches-py'}" in line, line
    assert line.endswith("every node needs the same path: put it on a shared filesystem or copy it to each node")
    assert list(storage.iterdir()) == [] and not (tmp_path / "runs").exists()  # nothing written, anywhere
    assert elapsed < 120, elapsed  # no retries
    assert others(proc.stderr) == [line], proc.stderr  # the line, and Ray's two lines about joining the cluster


# ---------------------------------------------------------------------------------------------------------
# The head lost under a run: one line with the --resume command, which works.


@pytest.mark.slow
def test_losing_the_head_ends_the_run_with_one_line_and_a_resume_command_that_works(
        tmp_path: Path, cifar_root: Path, teachers: Path) -> None:
    epochs = 8
    run = tmp_path / "runs" / "bmtard-smoke"
    hook = faults.hook("record_start", path=str(tmp_path / "starts.jsonl"), slow_s=0.12)
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with local_cluster({"resources": {"head": 1}}, {}, connect=False) as cluster:
        argv = [sys.executable, str(REPO / "tests" / "hooked_driver.py"), json.dumps(hook),
                *train_args(tmp_path, cifar_root, teachers, "--epochs", str(epochs), "--set", "data.train_subset=512"),
                "--workers", "2", "--cpus-per-worker", "1", "--gpus-per-worker", "0", "--keep-checkpoints", "2",
                "--address", cluster.address]
        with open(out, "w") as o, open(err, "w") as e:
            proc = subprocess.Popen(argv, env=driver_env(cluster.address), cwd=tmp_path, stdout=o, stderr=e, text=True)
        try:
            deadline = time.monotonic() + 300
            while not (run / "checkpoint_epoch0003").is_dir():
                assert proc.poll() is None, (err.read_text()[-3000:], out.read_text()[-2000:])
                assert time.monotonic() < deadline, "no checkpoint of epoch 3"
                time.sleep(0.5)
            killed = kill_head(cluster)
            assert len(killed) == 2, killed
            lost_at = time.monotonic()
            proc.wait(timeout=120)
            ended = time.monotonic() - lost_at
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    line = one_line_end(proc, out.read_text(), err.read_text(), 3)
    assert others(err.read_text()) == [line], err.read_text()
    assert line.startswith("error: lost the Ray cluster: its head (GCS at ") or \
        line.startswith("error: lost the connection to the Ray cluster"), line
    command = f"python run_train.py --resume {run}"
    assert f"continue with `{command}`" in line and "--local" in line, line
    assert ended < 60, ended  # bounded: not Ray's minute for a dead GCS
    folders = sorted(p.name for p in run.glob("checkpoint_epoch*"))
    assert 1 <= len(folders) <= 2, folders  # --keep-checkpoints 2, though the workers outlived the driver
    resumed = subprocess.run([sys.executable, str(REPO / "run_train.py"), "--resume", str(run), "--local"],
                             env=driver_env(""), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert column(run, "epoch") == list(range(1, epochs + 1))  # every epoch exactly once


@pytest.mark.slow
def test_losing_the_head_ends_a_search_with_one_line_and_its_resume_command_that_works(
        tmp_path: Path, cifar_root: Path) -> None:
    import pyarrow.parquet as pq

    exp = tmp_path / "runs" / "smoke"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with local_cluster({"resources": {"head": 1}}, {}, connect=False) as cluster:
        argv = [sys.executable, str(REPO / "run_tune.py"), "--smoke-test", "--data-root", str(cifar_root),
                "--output-dir", str(tmp_path / "runs"), "--quiet", "--num-samples", "2", "--max-concurrent", "2",
                "--scheduler", "fifo", "--final-attacks", "clean", "--final-examples", "64",
                "--address", cluster.address]
        with open(out, "w") as o, open(err, "w") as e:
            proc = subprocess.Popen(argv, env=driver_env(cluster.address), cwd=tmp_path, stdout=o, stderr=e, text=True)
        try:
            deadline = time.monotonic() + 420
            while not (any(exp.glob("train/*/checkpoint_epoch*")) and any(exp.glob("experiment_state-*.json"))):
                assert proc.poll() is None, (err.read_text()[-3000:], out.read_text()[-2000:])
                assert time.monotonic() < deadline, "no trial checkpoint"
                time.sleep(0.5)
            assert len(kill_head(cluster)) == 2
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    line = one_line_end(proc, out.read_text(), err.read_text(), 3)
    assert line.startswith("error: lost the Ray cluster"), line
    assert f"continue with `python run_tune.py --resume {exp}`" in line, line
    resumed = subprocess.run([sys.executable, str(REPO / "run_tune.py"), "--resume", str(exp), "--num-cpus", "2"],
                             env=driver_env(""), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stderr[-3000:], resumed.stdout[-2000:])
    rows = pq.read_table(exp / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows), rows
