"""Starting and resuming an experiment: data and teachers first, then Ray, then the Tuner.

Teachers are trained (or found in the cache) once, before any trial exists, each as a Ray task on a node
with one trial worker's resources (not in this driver, which under ``ray job submit`` runs on the head);
their checkpoint paths are written into the trials' base config, so every trial loads the same files and
none trains a teacher.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from bmtard_ray.config import RunConfig, from_dict, replace, teacher_cache_dir, to_dict
from bmtard_ray.data import prepare_data
from bmtard_ray.launch.preflight import check_batches, probe_all
from bmtard_ray.names import teacher_roles
from bmtard_ray.ray_train import cluster
from bmtard_ray.ray_train.node_preflight import preflight_nodes
from bmtard_ray.ray_train.scaling import ScalingOptions
from bmtard_ray.runtime import fileio
from bmtard_ray.training.teachers import check_given_teachers, check_model_refs, ensure_teachers, roles_to_train
from bmtard_ray.tuning import experiment
from bmtard_ray.tuning.review import sqlite_file
from bmtard_ray.tuning.settings import CLUSTER_FILE, TuneSettings, max_concurrent_trials, resolve_gpus
from bmtard_ray.tuning.space import SearchSpace
from bmtard_ray.tuning.study_lock import check_unlocked
from bmtard_ray.tuning.teacher_task import train_teacher_on_cluster
from bmtard_ray.tuning.trials import trial_methods


@dataclass
class Launch:
    """How this command runs the search: the Ray cluster to join (None: RAY_ADDRESS, else a Ray started here
    with ``num_cpus``), whether an experiment folder of the same name is replaced, and how much of Tune's
    progress it prints. ``started_ray`` is set once this process has started Ray (so that it stops it)."""
    address: str | None = None
    num_cpus: int | None = None
    overwrite: bool = False
    quiet: bool = False
    started_ray: bool = False

    def connect(self) -> None:
        self.started_ray = cluster.init_ray(self.address, self.num_cpus)


def prepare_teachers(cfg: RunConfig, space: SearchSpace, settings: TuneSettings, console: Console) -> RunConfig:
    """Resolve every teacher any trial may need, training missing ones once, as Ray tasks (Ray is connected)."""
    def log(s: str) -> None:
        console.print(f"[bold]{s}[/bold]")

    def train(tcfg: RunConfig) -> None:
        train_teacher_on_cluster(tcfg, cpus=settings.cpus_per_worker, gpus=settings.gpus_per_worker or 0.0, log=log)

    for method in trial_methods(space, cfg):
        if not teacher_roles(method):
            continue
        variant = replace(cfg, **{"method.name": method})
        resolved = ensure_teachers(variant, train, log=log)
        for role in teacher_roles(method):
            getattr(cfg.teachers, role).checkpoint = getattr(resolved.teachers, role).checkpoint
    return cfg


def record_dashboard(experiment_dir: Path) -> None:
    """Note the cluster's dashboard and identity (session, GCS) in the experiment folder, where
    ``run_tune.py --review`` looks for them (tuning/ray_dashboard.py)."""
    session, gcs = cluster.identity()
    record = {"dashboard_url": cluster.dashboard_url(), "session_name": session, "gcs_address": gcs,
              "pid": os.getpid(), "time": time.time()}
    fileio.atomic_text(json.dumps(record, indent=2), Path(experiment_dir) / CLUSTER_FILE)


def teachers_to_train(cfg: RunConfig, space: SearchSpace) -> list[str]:
    """The teacher roles some trial needs that are neither given nor cached (trained before the search)."""
    roles: list[str] = []
    for method in trial_methods(space, cfg):
        roles += [r for r in roles_to_train(replace(cfg, **{"method.name": method})) if r not in roles]
    return roles


def writable_paths(settings: TuneSettings, cfg: RunConfig, to_train: list[str]) -> list[tuple[str, str]]:
    paths = [(settings.experiment_dir, "experiment folder")]
    if settings.storage_folder:
        paths.append((settings.storage_folder, "Optuna study folder"))
    if to_train:
        paths.append((teacher_cache_dir(cfg), "teacher cache"))
    return paths


def preflight(settings: TuneSettings, space: SearchSpace, cfg: RunConfig, launch: Launch) -> None:
    """What must hold before anything is printed, removed, trained or written (one line if not)."""
    to_train = teachers_to_train(cfg, space)
    probe_all(writable_paths(settings, cfg, to_train))  # before anything is removed, trained or written
    data = prepare_data(cfg)            # a missing data folder fails here, before Ray starts
    check_batches(cfg, data, to_train)  # the base config's batches and every teacher still to train
    check_given_teachers(cfg, data.info, data.val)
    if "student" in space.keys:  # every student a trial may get is built once, as the base config's is
        for student in space.param("student").choices:
            check_model_refs(from_dict(to_dict(cfg) | {"student": student, "student_pretrained": False}), data.info)
    if cluster.cluster_address(launch.address):
        # Joining a cluster starts nothing here, so it happens first: a dead address or a refused token
        # fails in seconds, before any teacher is trained.
        launch.connect()
    local = cluster.local_resources(launch.address, launch.num_cpus)
    if local is not None:               # a Ray instance started here: check the fit before training teachers
        resolve_gpus(settings, local, cfg.device)
        max_concurrent_trials(local, settings)


def start(settings: TuneSettings, space: SearchSpace, cfg: RunConfig, launch: Launch,
          console: Console) -> tuple[experiment.Outcome, TuneSettings]:
    """After :func:`preflight`: teachers, then Ray (unless joined already), then the Tuner."""
    exp = Path(settings.experiment_dir)
    if not cluster.cluster_address(launch.address):
        launch.connect()
    resources = cluster.cluster_resources()
    resolve_gpus(settings, resources, cfg.device)
    n_concurrent = max_concurrent_trials(resources, settings)
    # Every node that could host a trial's worker reads the data and teachers and writes the experiment folder.
    trial_scaling = ScalingOptions(num_workers=settings.workers_per_trial, cpus_per_worker=settings.cpus_per_worker,
                                   gpus_per_worker=settings.gpus_per_worker or 0.0)
    preflight_nodes(cfg, trial_scaling, writable_paths(settings, cfg, teachers_to_train(cfg, space)))
    if launch.overwrite and exp.exists():
        shutil.rmtree(exp)
    cfg = prepare_teachers(cfg, space, settings, console)  # Ray tasks, one trial worker's resources each
    settings.base_config = to_dict(cfg)
    experiment.write_settings(settings, Path(space.source))
    record_dashboard(exp)
    console.print(f"experiment folder: {exp}")
    outcome = run_watched(exp, launch, lambda: experiment.run(settings, space, resume=False, console=console,
                                                              verbose=0 if launch.quiet else 1,
                                                              n_concurrent=n_concurrent))
    return outcome, settings


def resume(exp: Path, launch: Launch, console: Console, *, final_attacks: str | None = None,
           final_examples: int | None = None, top: int | None = None) -> tuple[experiment.Outcome, TuneSettings]:
    """Continue the search saved in ``exp``: it cannot change, the final report's options can."""
    settings, space = experiment.read_settings(exp)
    if final_attacks:
        settings.final_attacks = tuple(a.strip() for a in final_attacks.split(",") if a.strip())
    if final_examples:
        settings.final_examples = final_examples
    if top is not None:
        settings.top = top
    settings.validate()
    probe_all(writable_paths(settings, from_dict(settings.base_config), []))
    db = sqlite_file(settings.storage_url)
    if db is not None:  # before Ray starts: a search that cannot write its study says so in one line
        check_unlocked(db, write=True, what="--resume")
    launch.connect()
    record_dashboard(Path(settings.experiment_dir))
    outcome = run_watched(Path(settings.experiment_dir), launch, lambda: experiment.run(
        settings, space, resume=True, console=console, verbose=0 if launch.quiet else 1))
    return outcome, settings


def run_watched(exp: Path, launch: Launch, run: Callable[[], experiment.Outcome]) -> experiment.Outcome:
    """``run()`` (the Tuner) on a joined cluster whose head may be lost meanwhile: the search then ends in one
    line with its ``--resume`` command (Tune's state is saved as the search goes), see ray_train/lost.py."""
    import ray

    from bmtard_ray.errors import ClusterLostError
    from bmtard_ray.ray_train.lost import GcsWatch, exit_lost, lost_error, resume_advice, what_was_lost

    gcs = ray.get_runtime_context().gcs_address if cluster.cluster_address(launch.address) else None

    def report_lost() -> None:
        exit_lost(ClusterLostError(f"{what_was_lost(gcs, watched=True)}; "
                                   + resume_advice(str(exp), created=False, keep=0, command="run_tune.py")))

    with GcsWatch(gcs, report_lost) as watch:
        try:
            return run()
        except BaseException as exc:
            err = lost_error(exc, gcs_address=gcs, watch=watch, run_dir=str(exp), created=False, keep=0,
                             command="run_tune.py") if gcs else None
            if err is not None:
                raise err from None
            raise
