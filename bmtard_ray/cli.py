"""Command-line front end of run_train.py: options -> validated RunConfig -> a runner.

Configuration errors are found here, before any worker starts or any file is written; every
:class:`~bmtard_ray.errors.BmtardError` (and any ``OSError`` that reaches here) becomes ``error: <one line>``
and exit status 2. A Ctrl-C exits with 130 and names ``--resume`` only when a checkpoint exists to resume. A
run that loses its Ray cluster (:class:`~bmtard_ray.errors.ClusterLostError`) prints its one line, with the
``--resume`` command, and ends at once with status 3.

``--resume`` continues the run that is there: the saved config defines what is trained, and only the keys of
:data:`RESUME_KEYS` (more epochs, where and how fast it runs, validation and checkpoint cadence) may change.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

from bmtard_ray.config import (RunConfig, _apply, build_config, flat_keys, from_dict, nest, parse_override,
                               preset_names, to_dict, validate)
from bmtard_ray.names import METHOD_NAMES
from bmtard_ray.errors import BmtardError, ClusterLostError, ConfigError
from bmtard_ray.storage import exists, is_uri, join, load_resume_state, resumable, run_dir_of_checkpoint

# Shortcut flags -> dotted config keys.
SHORTCUTS = {"method": "method.name", "student": "student", "dataset": "data.dataset", "data_root": "data.root",
             "epochs": "optim.epochs", "name": "name", "output_dir": "output_dir", "device": "device", "seed": "seed",
             "batch_size": "optim.batch_size"}


def add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (applied in this order)")
    g.add_argument("--preset", help=f"base preset: {', '.join(preset_names())} (default: cpu)")
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
    return build_config(args.preset or "cpu", args.config, shortcuts + list(args.overrides))


# What an interrupted command could be resumed from: set by the command once it knows its folder; returns the
# folder when something there can be resumed, else None (then a Ctrl-C does not mention --resume).
_resume_hint: list[Callable[[], str | None]] = []


def on_interrupt(resumable_folder: Callable[[], str | None], command: str) -> None:
    _resume_hint[:] = [lambda: (f"python {command} --resume {folder}"
                                if (folder := resumable_folder()) is not None else None)]


def os_error_line(exc: OSError) -> str:
    path = exc.filename if exc.filename is not None else ""
    other = f" -> {exc.filename2}" if exc.filename2 else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{path}{other}: {reason}" if path else reason


def guarded(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Turn user errors and OSErrors into one line on stderr and exit status 2; a Ctrl-C into status 130."""
    def wrapper(argv: Sequence[str] | None = None) -> int:
        _resume_hint.clear()
        try:
            return main(argv)
        except ClusterLostError as exc:
            # Nothing of the lost cluster answers: end now, before Ray's shutdown waits on it (and Ray's own
            # fatal exit prints its log line after ours).
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(ClusterLostError.EXIT_LOST)
        except BmtardError as exc:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: {os_error_line(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            hint = _resume_hint[0]() if _resume_hint else None
            print(f"interrupted; continue with: {hint}" if hint else
                  "interrupted before a checkpoint was written: nothing to resume", file=sys.stderr)
            return 130
    return wrapper


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


@guarded
def train_main(argv: Sequence[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    if args.local:
        given = [f"--{f.replace('_', '-')}" for f in RAY_FLAGS if getattr(args, f) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to Ray runs; drop --local or drop them")
    cfg, done = resolve_config(args)  # validated before Ray is even imported
    folder = run_folder(args, cfg)
    on_interrupt(lambda: folder if resumable(folder) else None, "run_train.py")
    if done is not None and done >= cfg.optim.epochs and exists(join(folder, "model.pt")):
        print(f"{folder} already finished its {done} epochs; nothing to do (add epochs with --epochs N)")
        return 0
    if args.local:
        from bmtard_ray.runner import run_local

        run_local(cfg, resume=args.resume, overwrite=args.overwrite)
        return 0
    from bmtard_ray.ray_train import run_from_args

    run_from_args(cfg, args)
    return 0


def run_folder(args: argparse.Namespace, cfg: RunConfig) -> str:
    """Where this command's run lives: the folder given to --resume, else <storage or output dir>/<name>."""
    if args.resume:
        if is_uri(args.resume):
            return str(args.resume).rstrip("/")
        target = Path(args.resume).expanduser().resolve()
        return str(run_dir_of_checkpoint(target) if target.is_file() else target)
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
    state, saved = load_resume_state(args.resume)
    given = [flag for flag, value in (("--preset", args.preset), ("--config", args.config)) if value]
    if given:
        raise ConfigError(f"{' and '.join(given)} cannot be combined with --resume: the run continues with the "
                          f"config it saved (change only {', '.join(RESUME_KEYS)} with --set or their flags)")
    shortcuts = [f"{key}={getattr(args, attr)}" for attr, key in SHORTCUTS.items()
                 if getattr(args, attr, None) is not None]
    cfg = from_dict(to_dict(saved))
    if shortcuts or args.overrides:
        _apply(cfg, nest(dict(parse_override(o) for o in shortcuts + list(args.overrides))))
    before, after = flat_keys(saved), flat_keys(cfg)
    for key, value in after.items():
        if value != before[key] and key not in RESUME_KEYS:
            raise ConfigError(f"--resume continues the run as it was defined: {key} cannot change "
                              f"({before[key]!r} -> {value!r}); on resume only {', '.join(RESUME_KEYS)} can")
    done = int(state.get("epoch", 0))
    if cfg.optim.epochs < done:
        raise ConfigError(f"optim.epochs={cfg.optim.epochs} is fewer than the {done} epochs the run has trained")
    return validate(cfg), done
