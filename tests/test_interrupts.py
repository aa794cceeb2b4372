"""Interrupts and kills, each phase and each kind (issue 19): a Ctrl-C exits 130 and names --resume only when
there is something to resume; a SIGKILL mid-checkpoint or of the whole driver leaves a run that resumes with
every epoch once, and no Ray process of it behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_reliability

from bmtard_ray.cli.train import main as train_main
from bmtard_ray.cli.tune import main as tune_main
from bmtard_ray.storage.checkpoints import FILE as CHECKPOINT_FILE
from bmtard_ray.storage.checkpoints import load_resume_state

# Shared with test_reliability.py (finished: a module fixture, a finished smoke run).
common = test_reliability.common
finished = test_reliability.finished

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# 6. Checkpoints appear whole or not at all; a killed driver leaves no Ray process and resumes.

KILL_MID_WRITE = '''
import os, signal, sys, torch
import bmtard_ray.runtime.fileio as io
from bmtard_ray.config import build_config
from bmtard_ray.launch.local import run_local
from rich.console import Console

real_save, calls = torch.save, []
def dying_save(obj, path, *a, **k):
    if os.path.basename(str(path)).startswith(".checkpoint.pt."):
        calls.append(path)
        if len(calls) == 2:  # the second epoch's checkpoint: write half of it, then die like a power cut
            import io as _io
            buf = _io.BytesIO(); real_save(obj, buf)
            with open(path, "wb") as f:
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *a, **k)
io.torch.save = dying_save
run_local(build_config("smoke", overrides=sys.argv[1:]), console=Console(quiet=True))
'''


@pytest.mark.slow
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(
        finished: Path, tmp_path: Path, cifar_root: Path, capsys: pytest.CaptureFixture) -> None:
    import pyarrow.parquet as pq

    overrides = [f"data.root={cifar_root}", f"output_dir={tmp_path / 'runs'}", "name=cut",
                 f"teachers.cache_dir={finished.parent.parent / 'teachers'}"]  # the teachers are trained already
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = tmp_path / "runs" / "cut"
    assert list(run.glob(".checkpoint.pt.*.tmp"))  # the half-written file exists, under a name nobody reads
    state, _ = load_resume_state(run)
    assert state["epoch"] == 1  # the previous checkpoint is intact
    assert train_main(["--local", "--resume", str(run)]) == 0
    assert [r["epoch"] for r in pq.read_table(run / "metrics.parquet").to_pylist()] == [1, 2]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (read from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


@pytest.mark.slow
def test_a_sigkilled_driver_leaves_no_ray_process_and_resumes_every_epoch_once(
        finished: Path, tmp_path: Path, cifar_root: Path) -> None:
    import signal
    import time

    import pyarrow.parquet as pq

    argv = [sys.executable, str(REPO / "run_train.py"), "--preset", "smoke", "--data-root", str(cifar_root),
            "--set", f"teachers.cache_dir={finished.parent.parent / 'teachers'}", "--output-dir",
            str(tmp_path / "runs"), "--name", "killed", "--epochs", "3", "--cpus-per-worker", "1"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    driver = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "runs" / "killed"
    deadline, seen = time.monotonic() + 300, set()
    while not (run / "checkpoint_epoch0001" / CHECKPOINT_FILE).is_file():  # mid-run: epoch 2 is training
        assert driver.poll() is None and time.monotonic() < deadline, "the run never checkpointed"
        seen |= descendants(driver.pid)
        time.sleep(0.2)
    seen |= descendants(driver.pid)
    assert seen, "the driver started no Ray processes"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # The GCS and raylet share the driver's fate at once; Ray's agents exit once they give up on the GCS
    # (its reconnect timeout is 60 s), so they get that long and a margin for a loaded machine.
    deadline = time.monotonic() + 150
    while alive(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(seen), [Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:120] for p in alive(seen)]
    resumed = subprocess.run([sys.executable, str(REPO / "run_train.py"), "--resume", str(run), "--cpus-per-worker",
                              "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in pq.read_table(run / "metrics.parquet").to_pylist()] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C in each phase: exit 130; --resume is named exactly when a checkpoint exists.


@pytest.mark.parametrize("phase, resumable", [("teachers", False), ("ray start", False), ("training", True),
                                              ("evaluation", True), ("report", True)])
def test_ctrl_c_in_each_phase_exits_130_and_names_resume_only_with_a_checkpoint(
        finished: Path, tmp_path: Path, cifar_root: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch, phase: str, resumable: bool) -> None:
    import bmtard_ray.launch.local as runner
    import bmtard_ray.training.teachers as teachers
    from bmtard_ray.ray_train import cluster
    from bmtard_ray.training.trainer import Trainer

    def ctrl_c(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    cache = tmp_path / "fresh-cache" if phase == "teachers" else finished.parent.parent / "teachers"
    real_epoch = Trainer.train_epoch
    if phase == "teachers":
        monkeypatch.setattr(teachers, "build_entry", ctrl_c)
    elif phase == "ray start":
        monkeypatch.setattr(cluster, "start_local_ray", ctrl_c)
    elif phase == "training":  # the second epoch, after the first one's checkpoint
        monkeypatch.setattr(Trainer, "train_epoch", lambda self, e: ctrl_c() if e == 2 else real_epoch(self, e))
    elif phase == "evaluation":
        monkeypatch.setattr(Trainer, "finish", ctrl_c)
    else:
        monkeypatch.setattr(runner, "print_summary", ctrl_c)
    local = [] if phase == "ray start" else ["--local"]
    argv = [*local, "--preset", "smoke", "--data-root", str(cifar_root), "--set", f"teachers.cache_dir={cache}",
            "--output-dir", str(tmp_path / "runs")]
    assert train_main(argv) == 130
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "bmtard-smoke"
    assert (f"continue with: python run_train.py --resume {run}" in err) == resumable, err
    assert ("nothing to resume" in err) != resumable, err
    if resumable:  # ... and the run does continue from there
        monkeypatch.undo()
        assert train_main(["--local", "--resume", str(run)]) == 0


def test_ctrl_c_while_tune_trains_teachers_mentions_no_resume(
        tmp_path: Path, cifar_root: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from bmtard_ray.tuning import session

    def ctrl_c(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "prepare_teachers", ctrl_c)
    assert tune_main(["--smoke-test", *common(tmp_path, cifar_root), "--output-dir", str(tmp_path / "tune")]) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "nothing to resume" in err
    assert not ray.is_initialized()
