"""The Tune trial: a function trainable that builds and fits one Ray Train ``TorchTrainer`` (Train V2).

Ray Train V2 no longer accepts ``Tuner(trainer)``. Each trial instead runs this small driver function: it
turns the values Optuna sampled into a validated RunConfig, and fits a TorchTrainer (the same one
``run_train.py`` uses, from :mod:`bmtard_ray.ray_train`) whose ``TuneReportCallback`` forwards every epoch's
metrics, plus the path of that epoch's checkpoint, from the training workers to Tune. ASHA and Optuna see
those metrics; the checkpoint stays in Ray Train's storage (``<experiment>/train/trial<NNN>_<trial id>/``).

The Train run is named after the Optuna trial number and the trial id (so Ray's Train state ties it to the
trial optuna-dashboard shows), both fixed for the trial's life: when ``--resume`` restarts an interrupted
trial, Ray Train finds the run's checkpoint snapshot under the same name and continues from its last epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from bmtard_ray.config import RunConfig, from_dict
from bmtard_ray.tuning.optuna_space import OPTUNA_NUMBER
from bmtard_ray.tuning.searcher import trial_run_folder
from bmtard_ray.tuning.space import SearchSpace
from bmtard_ray.tuning.trials import trial_config

# The driver itself only waits on its Train controller. It reserves no CPU, so that a 2-core machine runs
# two 1-worker trials side by side; Tune refuses an all-zero request, hence a token amount of memory.
DRIVER_RESOURCES = {"cpu": 0, "memory": 1}


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
    trainer = ray_train.make_torch_trainer(cfg, scaling, run_config=run_config)
    trainer.fit()


def make_trainable(setup: TrialSetup) -> Any:
    return tune.with_resources(tune.with_parameters(bmtard_trial, setup=setup), DRIVER_RESOURCES)
