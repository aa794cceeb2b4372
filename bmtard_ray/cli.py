"""Command-line front end of run_train.py: options -> validated RunConfig -> a runner.

Configuration errors are found here, before any worker starts or any file is written; every
:class:`~bmtard_ray.errors.BmtardError` becomes ``error: <one line>`` and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bmtard_ray.config import METHOD_NAMES, RunConfig, build_config, preset_names
from bmtard_ray.errors import BmtardError

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
    p.add_argument("--local", action="store_true", help="run in this process without Ray")
    return p


@guarded
def train_main(argv: Sequence[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    from bmtard_ray.runner import run_local

    run_local(resolve_config(args), resume=args.resume, overwrite=args.overwrite)
    return 0


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The run's config: from the options, or, with --resume, the saved one plus any explicit overrides."""
    if not getattr(args, "resume", None):
        return config_from_args(args)
    from bmtard_ray.config import nest, parse_override, to_dict, validate, _apply
    from bmtard_ray.runner import load_resume_state

    _, cfg = load_resume_state(args.resume)
    shortcuts = [f"{key}={getattr(args, attr)}" for attr, key in SHORTCUTS.items()
                 if getattr(args, attr, None) is not None]
    if shortcuts or args.overrides:
        _apply(cfg, nest(dict(parse_override(o) for o in shortcuts + list(args.overrides))))
    return validate(cfg)


