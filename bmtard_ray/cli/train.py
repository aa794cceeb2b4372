"""run_train.py: flags -> :func:`bmtard_ray.api.train_run.train`, in this process (``--local``) or through Ray Train.

The command only turns its flags into the API's arguments (the configuration layers, the Ray options); the
checks, the resume rules (:data:`~bmtard_ray.api.train_run.RESUME_KEYS`) and the run are the API's. See
:mod:`bmtard_ray.cli.common` for how errors and Ctrl-C end the command.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bmtard_ray.api.train_run import RESUME_KEYS, train
from bmtard_ray.cli.common import add_config_args, given_shortcuts, guarded, on_interrupt
from bmtard_ray.config import parse_override
from bmtard_ray.errors import ConfigError
from bmtard_ray.storage import checkpoints
from bmtard_ray.storage.paths import is_uri

if TYPE_CHECKING:
    from bmtard_ray.ray_train import RayRunOptions


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_train.py", description="Train a student by B-MTARD (or a baseline).")
    add_config_args(p)
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run (its folder or checkpoint file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (no --workers etc.)")
    r = p.add_argument_group("Ray Train (the default; see README 'Scaling with Ray Train')")
    r.add_argument("--workers", metavar="N|MIN-MAX", help="number of training workers (default 1); the global batch "
                   "is split over them. MIN-MAX (e.g. 1-4): an elastic run with as many as fit, resized as nodes "
                   "leave and join")
    r.add_argument("--resize-interval", type=float, metavar="S", help="elastic runs: seconds between checks whether "
                   "the worker count should change (default 60)")
    r.add_argument("--wait-for-workers", type=float, metavar="S", help="fixed --workers N: seconds to wait for the "
                   "cluster to place all N workers (at the start, after a failure) before the run ends (default 300)")
    r.add_argument("--cpus-per-worker", type=float, help="CPUs (and torch threads) per worker (default: the "
                   "cluster's CPUs shared out over the workers)")
    r.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; 0 = CPU workers (default: 1 when the "
                   "cluster has GPUs and --device is not cpu)")
    r.add_argument("--placement", help="where the workers go: pack (fill a node first, the default) or spread "
                   "(one per node where possible); strict_pack / strict_spread insist")
    r.add_argument("--address", help="Ray cluster to join, host:port (default: RAY_ADDRESS, else start a local Ray)")
    r.add_argument("--storage-path", help="parent of the run folder: a path (shared between nodes) or a URI such "
                   "as s3://bucket/runs (default: --output-dir)")
    r.add_argument("--max-failures", type=int, help="worker failures to recover from (default 2)")
    r.add_argument("--keep-checkpoints", type=int, help="newest checkpoints to keep (default 2)")
    r.add_argument("--ray-config", metavar="FILE", help="YAML with any of: num_workers (N, MIN-MAX or [MIN, MAX]), "
                   "cpus_per_worker, gpus_per_worker, placement, address, storage_path, max_failures, "
                   "keep_checkpoints, resize_interval_s, wait_for_workers_s (flags win)")
    return p


RAY_FLAGS = ("workers", "cpus_per_worker", "gpus_per_worker", "placement", "address", "storage_path", "max_failures",
             "keep_checkpoints", "ray_config", "resize_interval", "wait_for_workers")


def ray_options(args: argparse.Namespace) -> RayRunOptions:
    """The Ray run's options from the flags, over ``--ray-config``."""
    from bmtard_ray.ray_train import ray_run_options

    return ray_run_options({flag: getattr(args, flag, None) for flag in RAY_FLAGS if flag != "ray_config"},
                           args.ray_config)


def _main(argv: Sequence[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    if args.local:
        given = [f"--{f.replace('_', '-')}" for f in RAY_FLAGS if getattr(args, f) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to Ray runs; drop --local or drop them")
    # Shortcut flags and --set, in the order given, as one mapping of dotted keys (later ones win).
    changes = dict(parse_override(o) for o in given_shortcuts(args) + list(args.overrides))
    resume = args.resume if args.resume and not is_uri(args.resume) else None
    if resume is not None:
        checkpoints.find(resume)  # nothing to resume is the first thing to say
        given = [flag for flag, value in (("--preset", args.preset), ("--config", args.config)) if value]
        if given:
            raise ConfigError(f"{' and '.join(given)} cannot be combined with --resume: the run continues with the "
                              f"config it saved (change only {', '.join(RESUME_KEYS)} with --set or their flags)")
    ray = {f: getattr(args, f) for f in RAY_FLAGS if f != "ray_config" and getattr(args, f) is not None}
    train(changes, preset=None if resume else (args.preset or "cpu"), config_files=() if resume else args.config,
          ray=False if args.local else (ray or True), ray_config=args.ray_config, resume=args.resume,
          overwrite=args.overwrite, on_folder=lambda folder: on_interrupt(
              lambda: folder if checkpoints.resumable(folder) else None, "run_train.py"))
    return 0


main = guarded(_main)
