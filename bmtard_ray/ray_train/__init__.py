"""Ray Train (V2) layer: the core trainer on every worker of a ``TorchTrainer``.

``run_train.py`` comes here unless ``--local`` is given. The driver validates everything first (config,
data folder, teacher files, batch divisibility, the cluster's resources), prepares the teachers (so
workers only load cached files), then fits one ``TorchTrainer`` whose workers each run
:func:`train_loop_per_worker`: the core :class:`~bmtard_ray.training.trainer.Trainer` with the process group Ray set
up, ``DistContext`` for rank / world size / all-reduce, DDP around the student only, and a ``report``
callable that hands rank 0's checkpoint dict to ``ray.train.report``.

Public API (the Tune layer builds the same trainer inside a Tune function trainable)::

    ScalingOptions(num_workers=1, cpus_per_worker=1.0, gpus_per_worker=None,  # None: GPUs if the cluster has them
                   placement_strategy="PACK",                                # or SPREAD (--placement spread)
                   resize_interval_s=None, wait_for_workers_s=300.0)        # num_workers=(min, max): elastic
    run_ray(cfg, scaling, *, address=None, storage_path=None, resume=None, overwrite=False, failure_max=2,
            keep_checkpoints=2, console=None) -> summary dict          # the whole run, driver side
    make_torch_trainer(cfg, scaling, *, run_config=None, storage_path=None, failure_max=2, keep_checkpoints=2,
                       callbacks=(), resume_from=None, finish=False,
                       stop_signal=None) -> TorchTrainer             # stop_signal: StopSignal(...).address
    train_loop_per_worker(config: dict) -> summary dict | None        # module level, picklable by reference
    absolute_paths(cfg) -> RunConfig                                  # call on the driver (workers chdir)

Inside Tune (Ray 2.60: ``from ray.tune.integration.ray_train import TuneReportCallback``)::

    run_config = ray.train.RunConfig(name=trial_id, storage_path=train_dir, callbacks=[TuneReportCallback()])
    make_torch_trainer(absolute_paths(cfg), ScalingOptions(num_workers=1, gpus_per_worker=0),
                       run_config=run_config).fit()

``make_torch_trainer`` only trains and checkpoints (every ``cfg.checkpoint_every`` epochs, one checkpoint file
per Ray checkpoint folder, named by :mod:`bmtard_ray.storage.checkpoints`); every report is one epoch with the
metrics of :meth:`Trainer.train_epoch` (+ validation), JSON-safe (NaN -> None, as Ray stores them in its
snapshot). ``finish=True`` adds the final evaluation on the validation and test splits, rank 0 writes the
run folder's outputs, and the summary comes back as ``result.return_value``. ``run_ray`` turns it on; a
tuning trial should leave it off (tuning never looks at the test split).

Data parallelism: ``optim.batch_size`` is the *global* batch; each of N workers takes batch/N images per
step from its shard of a permutation every rank draws from the same per-epoch seed, so N workers take the
same optimisation steps as one worker with the whole batch (same number of steps per epoch, same learning
rate). The EBB/NLB statistics (L_adv, L_nat, H_adv, H_nat) are all-reduced before every balance update, so
every rank holds the same temperatures and weights. To train faster with more workers keep the global
batch; to scale the global batch with N, scale the learning rate with it (linear rule) at your own risk:
the paper's schedule is for 128.

Run folder: ``<storage_path>/<cfg.name>`` (``storage_path`` defaults to ``cfg.output_dir``, so a Ray run
lands where a local one would). It may be a shared filesystem path or a cloud URI (``s3://...``,
``gs://...``): required for multi-node runs, because the workers write checkpoints and rank 0 writes the
final outputs there. A run folder with Ray checkpoints resumes from its latest one when the same name and
storage path are used again (``--resume``); a worker that dies is replaced and the run continues from the
last checkpoint (``FailureConfig(max_failures)``). An elastic run (``num_workers=(min, max)``) restarts with
the workers that fit after a node loss and grows back when nodes return; a fixed run waits at most
``wait_for_workers_s`` for its workers (see :mod:`bmtard_ray.ray_train.placement`).
"""
from __future__ import annotations

# Modules, each with one job: scaling (workers and resources), placement (failure budget, how long a run waits
# for its workers), cluster (connect / start Ray, resource checks),
# worker (the trainer on each worker), view (the driver's live table), driver (the run itself), stop (a
# cooperative stop asked for from outside the run: a Tune trial that ASHA stops). Run folders and
# checkpoints are bmtard_ray.storage's, shared with the in-process launch.
from bmtard_ray.ray_train.cluster import check_reachable, check_resources, connect, start_local_ray, stop_local_ray
from bmtard_ray.ray_train.driver import fit_with_view, make_torch_trainer, run_ray, user_error
from bmtard_ray.ray_train.scaling import RayRunOptions, ScalingOptions, ray_run_options
from bmtard_ray.ray_train.view import EpochView
from bmtard_ray.ray_train.worker import train_loop_per_worker
from bmtard_ray.storage.run_folder import absolute_paths

__all__ = ["ScalingOptions", "RayRunOptions", "ray_run_options", "run_ray", "make_torch_trainer", "fit_with_view",
           "train_loop_per_worker", "absolute_paths", "connect", "check_reachable", "check_resources",
           "start_local_ray", "stop_local_ray", "EpochView", "user_error"]
