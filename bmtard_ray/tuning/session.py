"""Starting and resuming an experiment: data and teachers first, then Ray, then the Tuner.

Teachers are trained (or found in the cache) once, before any trial exists, each as a Ray task on a node
with one trial worker's resources (not in this driver, which under ``ray job submit`` runs on the head);
their checkpoint paths are written into the trials' base config, so every trial loads the same files and
none trains a teacher.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from rich.console import Console

from bmtard_ray import io
from bmtard_ray.config import RunConfig, replace, to_dict
from bmtard_ray.names import teacher_roles
from bmtard_ray.data import prepare_data
from bmtard_ray.tuning.search_space import SearchSpace, trial_methods
from bmtard_ray.teachers import check_given_teachers, ensure_teachers
from bmtard_ray.ray_train import cluster
from bmtard_ray.tuning import experiment
from bmtard_ray.tuning.settings import CLUSTER_FILE, TuneSettings, max_concurrent_trials, resolve_gpus
from bmtard_ray.tuning.teacher_task import train_teacher_on_cluster


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
    """Note the cluster's dashboard in the experiment folder, where ``run_tune.py --review`` looks for it."""
    record = {"dashboard_url": cluster.dashboard_url(), "pid": os.getpid(), "time": time.time()}
    io.atomic_text(json.dumps(record, indent=2), Path(experiment_dir) / CLUSTER_FILE)


def start(settings: TuneSettings, space: SearchSpace, cfg: RunConfig, args: argparse.Namespace,
          console: Console) -> tuple[experiment.Outcome, TuneSettings]:
    data = prepare_data(cfg)            # a missing data folder fails here, before Ray starts
    check_given_teachers(cfg, data.info)
    local = cluster.local_resources(args.address, args.num_cpus)
    if local is not None:               # a Ray instance started here: check the fit before training teachers
        resolve_gpus(settings, local, cfg.device)
        max_concurrent_trials(local, settings)
    exp = Path(settings.experiment_dir)
    if args.overwrite and exp.exists():
        shutil.rmtree(exp)
    args.started_ray = cluster.init_ray(args.address, args.num_cpus)
    resources = cluster.cluster_resources()
    resolve_gpus(settings, resources, cfg.device)
    n_concurrent = max_concurrent_trials(resources, settings)
    cfg = prepare_teachers(cfg, space, settings, console)  # Ray tasks, one trial worker's resources each
    settings.base_config = to_dict(cfg)
    experiment.write_settings(settings, Path(space.source))
    record_dashboard(exp)
    console.print(f"experiment folder: {exp}")
    outcome = experiment.run(settings, space, resume=False, console=console, verbose=0 if args.quiet else 1,
                             n_concurrent=n_concurrent)
    return outcome, settings


def resume(exp: Path, args: argparse.Namespace, console: Console) -> tuple[experiment.Outcome, TuneSettings]:
    settings, space = experiment.read_settings(exp)
    # The search itself cannot change on resume; the final report's options can.
    if args.final_attacks:
        settings.final_attacks = tuple(a.strip() for a in args.final_attacks.split(",") if a.strip())
    if args.final_examples:
        settings.final_examples = args.final_examples
    if args.top != 10:
        settings.top = args.top
    settings.validate()
    args.started_ray = cluster.init_ray(args.address, args.num_cpus)
    record_dashboard(Path(settings.experiment_dir))
    outcome = experiment.run(settings, space, resume=True, console=console, verbose=0 if args.quiet else 1)
    return outcome, settings
