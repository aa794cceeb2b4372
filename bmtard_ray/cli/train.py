"""run_train.py: options -> validated RunConfig -> a run in this process (``--local``) or through Ray Train.

Configuration errors are found here, before any worker starts or any file is written (see
:mod:`bmtard_ray.cli.common` for how errors and Ctrl-C end the command).

``--resume`` continues the run that is there: the saved config defines what is trained, and only the keys of
:data:`RESUME_KEYS` (more epochs, where and how fast it runs, validation and checkpoint cadence) may change.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bmtard_ray.cli.common import add_config_args, config_from_args, given_shortcuts, guarded, on_interrupt
from bmtard_ray.config import RunConfig, flat_keys, from_dict, nest, parse_override, to_dict, update, validate
from bmtard_ray.errors import ConfigError
from bmtard_ray.storage import checkpoints
from bmtard_ray.storage.paths import exists, is_uri, join
from bmtard_ray.storage.run_folder import MODEL_FILE

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
    cfg, done = resolve_config(args)  # validated before Ray is even imported
    folder = run_folder(args, cfg)
    on_interrupt(lambda: folder if checkpoints.resumable(folder) else None, "run_train.py")
    if done is not None and done >= cfg.optim.epochs and exists(join(folder, MODEL_FILE)):
        print(f"{folder} already finished its {done} epochs; nothing to do (add epochs with --epochs N)")
        return 0
    if args.local:
        from bmtard_ray.launch.local import run_local

        run_local(cfg, resume=args.resume, overwrite=args.overwrite)
        return 0
    from bmtard_ray.ray_train import run_ray

    ray = ray_options(args)
    run_ray(cfg, ray.scaling, address=ray.address, storage_path=ray.storage_path, resume=args.resume,
            overwrite=args.overwrite, failure_max=ray.max_failures, keep_checkpoints=ray.keep_checkpoints)
    return 0


main = guarded(_main)


def run_folder(args: argparse.Namespace, cfg: RunConfig) -> str:
    """Where this command's run lives: the folder given to --resume, else <storage or output dir>/<name>."""
    if args.resume:
        return checkpoints.run_dir_of(args.resume)
    parent = getattr(args, "storage_path", None) or cfg.output_dir
    return join(parent if is_uri(parent) else str(Path(parent).expanduser().resolve()), cfg.name)


# Keys --resume may change: how long (more epochs), where and how fast it runs, how often it validates and
# checkpoints. Everything else defines what is trained and stays as the run saved it.
RESUME_KEYS = ("optim.epochs", "device", "compile", "sync_every_step", "val_every", "val_examples",
               "checkpoint_every", "checkpoint_every_iters", "data.root", "data.num_workers", "eval.batch_size",
               "teachers.logit_cache")


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, int | None]:
    """The run's config and, with --resume, the epochs its checkpoint holds: the saved config plus only
    the changes :data:`RESUME_KEYS` allow."""
    if not getattr(args, "resume", None) or is_uri(args.resume):  # a URI run folder: config from the options
        return config_from_args(args), None
    state, saved = checkpoints.load_resume_state(args.resume)
    given = [flag for flag, value in (("--preset", args.preset), ("--config", args.config)) if value]
    if given:
        raise ConfigError(f"{' and '.join(given)} cannot be combined with --resume: the run continues with the "
                          f"config it saved (change only {', '.join(RESUME_KEYS)} with --set or their flags)")
    shortcuts = given_shortcuts(args)
    cfg = from_dict(to_dict(saved))
    if shortcuts or args.overrides:
        update(cfg, nest(dict(parse_override(o) for o in shortcuts + list(args.overrides))))
    before, after = flat_keys(saved), flat_keys(cfg)
    for key, value in after.items():
        if value != before[key] and key not in RESUME_KEYS:
            raise ConfigError(f"--resume continues the run as it was defined: {key} cannot change "
                              f"({before[key]!r} -> {value!r}); on resume only {', '.join(RESUME_KEYS)} can")
    done = int(state.get("epoch", 0))
    if cfg.optim.epochs < done:
        raise ConfigError(f"optim.epochs={cfg.optim.epochs} is fewer than the {done} epochs the run has trained")
    return validate(cfg), done
