"""A trial that ASHA stops ends its Ray Train run cleanly (a cooperative stop): the workers leave at an
iteration boundary every rank agrees on and return, so Ray's Train state reads the run FINISHED, not ABORTED
("Terminated due to system errors or killed by the user"); the search's results are what they were."""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import faults
import optuna
import pyarrow.parquet as pq
import pytest
from conftest import free_port, head_port_flags
from rich.console import Console
from test_tune import check_experiment, cli_env, smoke_args, stop_head

from bmtard_ray.config import build_config
from bmtard_ray.launch.local import run_local
from bmtard_ray.ray_train import stop as stop_module
from bmtard_ray.ray_train.stop import StopAddress, StopPoll, StopRequested
from bmtard_ray.training.teachers import ensure_teachers


def test_the_workers_poll_every_few_steps_and_stop_where_the_ranks_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    signal_: dict[str, Any] = {"reason": None, "acked": 0}

    def ask(address: StopAddress) -> tuple[str | None, int | None]:
        asked.append(poll.calls)
        return signal_["reason"], signal_["acked"]

    monkeypatch.setattr(stop_module, "_ask", ask)
    inner = iter([False, True] * 20)
    poll = StopPoll(StopAddress("s", None), rank=0, world_size=1, inner=lambda: next(inner), every=3)
    assert [poll() for _ in range(6)] == [False, True, False, True, False, True]  # the inner hook's answers
    assert asked == [3, 6]                       # the signal is asked every `every` steps only
    signal_["reason"] = "tune"
    poll(), poll()
    with pytest.raises(StopRequested):
        poll()                                   # the next poll step
    assert poll.reason == "tune"
    with pytest.raises(StopRequested):
        poll.check()                             # an epoch's end asks at once
    # Without an address (run_train.py): nothing is asked, the inner hook alone answers.
    quiet = StopPoll(None, rank=0, world_size=1)
    assert not any(quiet() for _ in range(30)) and quiet.check(acked_at_least=5) is None
    assert StopAddress.from_dict(StopAddress("n", "ns").to_dict()) == StopAddress("n", "ns")
    assert StopAddress.from_dict(None) is None


def test_an_epochs_report_waits_for_the_owners_verdict_on_the_previous_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Epoch 2 is reported only once the owner acknowledged epoch 1 (it goes on) or asked to stop; an owner
    that cannot be reached any more does not hold the workers."""
    answers = iter([(None, 0), (None, 0), (None, 1)])
    monkeypatch.setattr(stop_module, "_ask", lambda address: next(answers))
    poll = StopPoll(StopAddress("s", None), rank=0, world_size=1, wait_s=0.0)
    poll.check(acked_at_least=1)                 # returned on the third answer: acknowledged
    answers = iter([(None, 0), ("tune", 0)])
    with pytest.raises(StopRequested):
        poll.check(acked_at_least=1)             # stopped while waiting: nothing is reported
    answers = iter([(None, 0), (None, None)])
    poll.check(acked_at_least=1)                 # the signal is gone


@pytest.mark.slow
def test_two_workers_stop_together_after_the_step_where_rank_0_saw_the_request(tmp_path: Path,
                                                                              cifar_root: Path) -> None:
    """A 2-worker Ray Train run (the smoke preset, 2 epochs) whose rank 0 asks
    for the stop right after reporting epoch 1: both ranks leave at the same boundary (rank 1 learns it from
    rank 0's broadcast), epoch 2 is never reported nor checkpointed, and fit() returns normally."""
    import ray
    import ray.train

    from bmtard_ray.ray_train import ScalingOptions, absolute_paths, make_torch_trainer, start_local_ray, stop_local_ray
    from bmtard_ray.ray_train.stop import StopSignal

    cfg = build_config("smoke", overrides=[f"data.root={cifar_root}", f"output_dir={tmp_path / 'runs'}",
                                           f"teachers.cache_dir={tmp_path / 'teachers'}", "name=stopped"])
    quiet = Console(quiet=True)
    cfg = absolute_paths(ensure_teachers(cfg, lambda t: run_local(t, overwrite=True, console=quiet)))
    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(num_cpus=2, log_to_driver=False)
    try:
        signal_ = StopSignal("test")
        address = signal_.address
        run_config = ray.train.RunConfig(name="stopped", storage_path=str(tmp_path / "runs"),
                                         checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
        trainer = make_torch_trainer(cfg, ScalingOptions(num_workers=2, gpus_per_worker=0), run_config=run_config,
                                     stop_signal=address,
                                     worker_hook=faults.hook("request_stop", epoch=1, name=address.name,
                                                             namespace=address.namespace))
        result = trainer.fit()
        signal_.close()
    finally:
        stop_local_ray()
    assert result.return_value == {"stopped": "test", "epoch": 1}
    assert result.error is None and result.metrics["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "runs" / "stopped").glob("checkpoint_epoch*")) == ["checkpoint_epoch0001"]


def get(dashboard: str, path: str, token: str) -> Any:
    request = urllib.request.Request(f"{dashboard}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read().decode())


def train_runs(dashboard: str, token: str) -> list[dict[str, Any]]:
    """Ray Train's state as the dashboard serves it (its ABORTED verdict for a dead controller included)."""
    return list(get(dashboard, "/api/train/v2/runs/v1", token)["train_runs"])


@pytest.mark.slow
def test_a_trial_asha_stops_ends_its_train_run_finished_not_aborted(tmp_path: Path, cifar_root: Path) -> None:
    """A private head (free ports, its own token, Train state tracking on), the smoke search run one trial at a
    time with a reduction factor that stops every trial not the best so far at epoch 1, then the Train runs'
    states read from the head's dashboard before it is stopped (only ours: never `ray stop`)."""
    start = time.monotonic()
    ray_bin = Path(sys.executable).with_name("ray")
    gcs, dash = free_port(), free_port()
    token = secrets.token_hex(32)
    # A temp dir of our own, so this head is not "the latest cluster" that other processes' ray.init finds.
    temp_dir = tempfile.mkdtemp(prefix="rays", dir="/tmp")
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 - the head writes to it until it stops
    env = cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ADDRESS=f"127.0.0.1:{gcs}",
                  RAY_TRAIN_ENABLE_STATE_TRACKING="1")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "true",
                             "--disable-usage-stats", "--temp-dir", temp_dir, *head_port_flags(gcs, dash)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                get(dashboard, "/api/version", token)
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "the head node did not come up"
                time.sleep(2)
        proc = subprocess.run([*smoke_args(tmp_path, cifar_root, "--address", f"127.0.0.1:{gcs}", "--num-samples",
                                           "4", "--max-concurrent", "1", "--reduction-factor", "100")],
                              env=cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        exp = tmp_path / "runs" / "smoke"
        # The search's results as before: every check of the smoke test (PRUNED in Optuna for a stopped trial,
        # its checkpoint still there, leaderboard, plots, the best's test evaluation).
        check_experiment(exp, 4)
        rows = {r["trial_id"]: r for r in pq.read_table(exp / "trials.parquet").to_pylist()}
        stopped = [tid for tid, r in rows.items() if r["stopped_early"]]
        assert stopped, "ASHA stopped no trial"
        study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{exp / 'optuna.db'}")
        folders = {t.user_attrs["ray_trial_id"]: Path(t.user_attrs["run_folder"]) for t in study.trials}
        # Ray's Train state: every trial's run (and the teachers') ended FINISHED, none ABORTED.
        runs = {r["name"]: r for r in train_runs(dashboard, token)}
        for tid, folder in folders.items():
            run = runs[folder.name]
            assert run["status"] == "FINISHED", (tid, tid in stopped, run["status"], run.get("status_detail"))
        assert not [r for r in runs.values() if r["status"] == "ABORTED"], runs
        for tid in stopped:  # the run folder says where Tune stopped it: after the last epoch it reported
            note = json.loads((folders[tid] / "stopped.json").read_text())
            assert note["after_epoch"] == rows[tid]["epochs"] and note["max_epochs"] == 3, note
        for tid in set(rows) - set(stopped):
            assert not (folders[tid] / "stopped.json").exists()
        print(f"cooperative stop: {len(stopped)} of 4 trials stopped by ASHA, {time.monotonic() - start:.0f} s")
    finally:
        stop_head(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

