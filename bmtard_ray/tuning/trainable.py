"""The Tune trial: a function trainable that builds and fits one Ray Train ``TorchTrainer`` (Train V2).

Ray Train V2 no longer accepts ``Tuner(trainer)``. Each trial instead runs this small driver function: it
turns the values Optuna sampled into a validated RunConfig, and fits a TorchTrainer (the same one
``run_train.py`` uses, from :mod:`bmtard_ray.ray_train`) whose ``TuneReportCallback`` forwards every epoch's
metrics, plus the path of that epoch's checkpoint, from the training workers to Tune. ASHA and Optuna see
those metrics; the checkpoint stays in Ray Train's storage (``<experiment>/train/trial<NNN>_<trial id>/``).

The Train run is named after the Optuna trial number and the trial id (so Ray's Train state ties it to the
trial optuna-dashboard shows), both fixed for the trial's life: when ``--resume`` restarts an interrupted
trial, Ray Train finds the run's checkpoint snapshot under the same name and continues from its last epoch.

A trial Tune stops (ASHA's decision, the epoch budget, the experiment's end) stops its Train run cooperatively
(:class:`StopsCooperatively`, :mod:`bmtard_ray.ray_train.stop`): Tune calls the trial actor's ``stop()``,
whose ``cleanup()`` here asks the run's :class:`~bmtard_ray.ray_train.stop.StopSignal`, waits (at most
``STOP_WAIT_S``) until the workers have left at an iteration boundary and ``fit()`` has returned, and only
then lets Tune end the actor. Ray's Train state then reads the run FINISHED instead of ABORTED, and the run
folder gets ``stopped.json`` (the last epoch reported). Tune waits up to ``TUNE_FORCE_TRIAL_CLEANUP_S``
(600 s) for a stop during the search, but only about 10 s at the experiment's end; a stop that takes longer
is cut off as before (ABORTED).
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.trainable.function_trainable import FunctionTrainable

from bmtard_ray.config import RunConfig, from_dict
from bmtard_ray.ray_train.stop import STOPPED_KEY, StopSignal
from bmtard_ray.runtime import fileio
from bmtard_ray.storage.paths import is_uri
from bmtard_ray.tuning.optuna_space import OPTUNA_NUMBER
from bmtard_ray.tuning.searcher import trial_run_folder
from bmtard_ray.tuning.space import SearchSpace
from bmtard_ray.tuning.trials import trial_config

# The driver itself only waits on its Train controller. It reserves no CPU, so that a 2-core machine runs
# two 1-worker trials side by side; Tune refuses an all-zero request, hence a token amount of memory.
DRIVER_RESOURCES = {"cpu": 0, "memory": 1}
# How long a stopped trial waits for its Train run to end by itself (Tune's own limit mid-search is 600 s).
STOP_WAIT_S = float(os.environ.get("BMTARD_TRIAL_STOP_WAIT_S", "120"))
STOPPED_FILE = "stopped.json"   # in the trial's Train run folder, written when Tune stopped the trial


@dataclass
class _Running:
    signal: StopSignal
    done: threading.Event       # set once the trial's fit() has returned (or raised)


_RUNNING: dict[str, _Running] = {}  # trial id -> its Train run, in this trial actor's process


class StopsCooperatively(FunctionTrainable):
    """Mixed into the trial's function trainable (``wrap_function`` honours ``__mixins__``): Tune's ``stop()``
    calls ``cleanup()`` on the actor's main thread while ``bmtard_trial`` runs in its training thread.

    Tune asks for the next result (``step()``) only once it has let the trial go on past the last one, so
    ``step()`` acknowledges that epoch to the workers, who report the next epoch (and its checkpoint, which
    replaces the last) only then: a trial stopped on epoch N keeps epoch N's checkpoint."""

    _seen_epoch = 0

    def step(self) -> dict[str, Any]:
        running = _RUNNING.get(self.trial_id)
        if running is not None and self._seen_epoch:
            running.signal.acknowledge(self._seen_epoch)
        result: dict[str, Any] = super().step()
        if isinstance(result.get("epoch"), (int, float)):
            self._seen_epoch = int(result["epoch"])
        return result

    def cleanup(self) -> None:
        running = _RUNNING.get(self.trial_id)
        if running is not None and not running.done.is_set():
            stop_and_wait(running, STOP_WAIT_S)
        super().cleanup()


def stop_and_wait(running: _Running, timeout_s: float) -> bool:
    """Ask the run to stop and wait until its fit() returns; True if it did within ``timeout_s``.

    While waiting, the metrics the Train controller forwards (``TuneReportCallback`` puts them on the
    session's one-slot queue, and blocks while it is full) are dropped: Tune has done with the trial."""
    from ray.train._internal.session import get_session
    from ray.util.queue import Empty

    try:
        running.signal.request("tune")
    except Exception:  # noqa: BLE001 - the signal is gone: nothing to wait for
        return False
    queue = getattr(get_session(), "_inter_actor_queue", None)
    deadline = time.monotonic() + timeout_s
    while not running.done.wait(0.2):
        if time.monotonic() > deadline:
            return False
        if queue is not None:
            try:
                queue.get(block=False)
            except Empty:
                pass
    return True


def write_stop_note(run_dir: str, stopped: dict[str, Any], max_epochs: int) -> None:
    """``stopped.json`` in the run folder: Tune stopped the trial after this epoch (what Tune saw last)."""
    if is_uri(run_dir):
        return
    note = {"stopped_by": "ray tune", "after_epoch": stopped.get("epoch"), "max_epochs": max_epochs,
            "why": "the scheduler (ASHA) stopped the trial, or the epoch budget or the end of the experiment did"}
    fileio.atomic_text(json.dumps(note, indent=1) + "\n", Path(run_dir) / STOPPED_FILE)


@dataclass
class TrialSetup:
    """What every trial shares (passed with ``tune.with_parameters``; small, picklable)."""
    base_config: dict[str, Any]      # RunConfig as a dict, teachers' checkpoints already resolved
    space: SearchSpace
    train_dir: str                   # Ray Train storage for the trials' runs and checkpoints
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0     # resolved before the experiment starts (never None here)
    max_failures: int = 0            # worker failures (e.g. a lost node) the trial's Train run recovers from


def sampled_values(config: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """The Optuna-sampled values in a Tune trial config (Tune may add its own keys; ignore them)."""
    return {k: v for k, v in config.items() if k in space.keys}


def trial_run_config(setup: TrialSetup, config: dict[str, Any], trial_id: str) -> RunConfig:
    cfg, _ = trial_config(from_dict(setup.base_config), setup.space, sampled_values(config, setup.space))
    cfg.name = trial_run_folder(Path(setup.train_dir).parent, trial_id, config.get(OPTUNA_NUMBER)).name
    cfg.output_dir = setup.train_dir
    # Tune takes every report for a result: no timed mid-epoch checkpoints in a trial. (A preemption notice's
    # checkpoint still reports; its result has no epoch or objective, which ASHA and StudySearch skip.)
    cfg.checkpoint_every_iters = 0
    return cfg


def bmtard_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable (one per trial)."""
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    from bmtard_ray import ray_train

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_run_config(setup, config, trial_id)
    scaling = ray_train.ScalingOptions(num_workers=setup.workers, cpus_per_worker=setup.cpus_per_worker,
                                       gpus_per_worker=setup.gpus_per_worker).validate()
    run_config = ray.train.RunConfig(
        name=cfg.name, storage_path=setup.train_dir, callbacks=[TuneReportCallback()],
        # Keep only the newest checkpoint: the trial's last report (what Optuna and ASHA saw) points at it.
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        # A worker lost with its node restarts from the trial's last checkpoint (Tune's own budget, the same
        # number, covers the loss of the node running this trial function; see experiment.run).
        failure_config=ray.train.FailureConfig(max_failures=setup.max_failures),
        logging_config=ray.train.LoggingConfig(log_level="WARNING"))
    run_dir = str(Path(setup.train_dir) / cfg.name)
    if not is_uri(run_dir):
        (Path(run_dir) / STOPPED_FILE).unlink(missing_ok=True)  # a resumed trial's old note
    signal = StopSignal(cfg.name)
    running = _RUNNING[trial_id] = _Running(signal, threading.Event())
    trainer = ray_train.make_torch_trainer(cfg, scaling, run_config=run_config, stop_signal=signal.address)
    try:
        result = trainer.fit()
        stopped = result.return_value if isinstance(result.return_value, dict) else {}
        if stopped.get(STOPPED_KEY):
            write_stop_note(run_dir, stopped, int(cfg.optim.epochs))
    finally:
        running.done.set()
        _RUNNING.pop(trial_id, None)
        signal.close()


def make_trainable(setup: TrialSetup) -> Any:
    trainable = tune.with_parameters(bmtard_trial, setup=setup)
    trainable.__mixins__ = (StopsCooperatively,)
    return tune.with_resources(trainable, DRIVER_RESOURCES)
