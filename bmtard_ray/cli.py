"""Command-line front end of run_train.py: options -> validated RunConfig -> a runner.

Configuration errors are found here, before any worker starts or any file is written; every
:class:`~bmtard_ray.errors.BmtardError` becomes ``error: <one line>`` and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bmtard_ray.config import RunConfig, _apply, build_config, nest, parse_override, preset_names, validate
from bmtard_ray.names import METHOD_NAMES
from bmtard_ray.errors import BmtardError, ConfigError

# Shortcut flags -> dotted config keys.
SHORTCUTS = {"method": "method.name", "student": "student", "dataset": "data.dataset", "data_root": "data.root",
             "epochs": "optim.epochs", "name": "name", "output_dir": "output_dir", "device": "device", "seed": "seed",
             "batch_size": "optim.batch_size"}


def add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (applied in this order)")
    g.add_argument("--preset", default="cpu", help=f"base preset: {', '.join(preset_names())} (default: cpu)")
    g.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file of overrides (repeatable)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="dotted override, e.g. --set ebb.eta_tau=0.002 (repeatable)")
    g.add_argument("--method", help=f"one of: {', '.join(METHOD_NAMES)}")
    g.add_argument("--student", help="student architecture")
    g.add_argument("--dataset", help="cifar10, cifar100 or tiny-imagenet")
    g.add_argument("--data-root", help="folder holding cifar-10-batches-py/ etc. (default: data)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch size")
    g.add_argument("--name", help="run name (the output folder's name)")
    g.add_argument("--output-dir", help="parent folder of run folders (default: runs)")
    g.add_argument("--device", help="auto, cpu or cuda")
    g.add_argument("--seed", type=int)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    shortcuts = [f"{key}={getattr(args, attr)}" for attr, key in SHORTCUTS.items()
                 if getattr(args, attr, None) is not None]
    return build_config(args.preset, args.config, shortcuts + list(args.overrides))


def guarded(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Turn user errors into one line on stderr and exit status 2."""
    def wrapper(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except BmtardError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; resume with --resume <run folder>", file=sys.stderr)
            return 130
    return wrapper


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_train.py", description="Train a student by B-MTARD (or a baseline).")
    add_config_args(p)
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run (its folder or checkpoint file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (no --workers etc.)")
    r = p.add_argument_group("Ray Train (the default; see README 'Scaling with Ray Train')")
    r.add_argument("--workers", type=int, help="number of training workers (default 1); the global batch is split "
                   "over them")
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
    r.add_argument("--ray-config", metavar="FILE", help="YAML with any of: num_workers, cpus_per_worker, "
                   "gpus_per_worker, placement, address, storage_path, max_failures, keep_checkpoints (flags win)")
    return p


RAY_FLAGS = ("workers", "cpus_per_worker", "gpus_per_worker", "placement", "address", "storage_path", "max_failures",
             "keep_checkpoints", "ray_config")


@guarded
def train_main(argv: Sequence[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    if args.local:
        given = [f"--{f.replace('_', '-')}" for f in RAY_FLAGS if getattr(args, f) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to Ray runs; drop --local or drop them")
        from bmtard_ray.runner import run_local

        run_local(resolve_config(args), resume=args.resume, overwrite=args.overwrite)
        return 0
    cfg = resolve_config(args)  # validated before Ray is even imported
    from bmtard_ray.ray_train import run_from_args

    run_from_args(cfg, args)
    return 0


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The run's config: from the options, or, with --resume, the saved one plus any explicit overrides."""
    if not getattr(args, "resume", None) or "://" in str(args.resume):  # a URI run folder: config from the options
        return config_from_args(args)
    from bmtard_ray.storage import load_resume_state  # reads torch files: not needed for --help

    _, cfg = load_resume_state(args.resume)
    shortcuts = [f"{key}={getattr(args, attr)}" for attr, key in SHORTCUTS.items()
                 if getattr(args, attr, None) is not None]
    if shortcuts or args.overrides:
        _apply(cfg, nest(dict(parse_override(o) for o in shortcuts + list(args.overrides))))
    return validate(cfg)


