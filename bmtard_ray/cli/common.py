"""The toolkit the three command-line tools share: the configuration flags, their shortcut keys, and the
wrapper that turns user errors into one line and an exit status.

Every :class:`~bmtard_ray.errors.BmtardError` (and any ``OSError`` that reaches a tool) becomes
``error: <one line>`` and exit status 2; a Ctrl-C exits with 130 and names ``--resume`` only when a
checkpoint exists to resume. A run that loses its Ray cluster (:class:`~bmtard_ray.errors.ClusterLostError`)
prints its one line, with the ``--resume`` command, and ends at once with status 3.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from bmtard_ray.config import RunConfig, build_config, preset_names
from bmtard_ray.errors import BmtardError, ClusterLostError
from bmtard_ray.names import DATASET_NAMES, METHOD_NAMES

# Shortcut flags -> dotted config keys.
SHORTCUTS = {"method": "method.name", "student": "student", "dataset": "data.dataset", "data_root": "data.root",
             "epochs": "optim.epochs", "name": "name", "output_dir": "output_dir", "device": "device", "seed": "seed",
             "batch_size": "optim.batch_size"}
NOTHING_TO_RESUME = "interrupted before a checkpoint was written: nothing to resume"


def add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (applied in this order)")
    g.add_argument("--preset", help=f"base preset: {', '.join(preset_names())} (default: cpu)")
    g.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file of overrides (repeatable)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="dotted override, e.g. --set ebb.eta_tau=0.002 (repeatable)")
    g.add_argument("--method", help=f"one of: {', '.join(METHOD_NAMES)}")
    g.add_argument("--student", help="student architecture: a built-in name, timm:<name> or <module>:<callable>")
    g.add_argument("--dataset", help=f"one of: {', '.join(DATASET_NAMES)} (imagefolder, npz: your own data, "
                                     "at --data-root)")
    g.add_argument("--data-root", help="folder holding cifar-10-batches-py/ etc. (default: data); for imagefolder "
                                       "the folder holding train/<class>/ and test/<class>/, for npz the .npz file")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch size")
    g.add_argument("--name", help="run name (the output folder's name)")
    g.add_argument("--output-dir", help="parent folder of run folders (default: runs)")
    g.add_argument("--device", help="auto, cpu or cuda")
    g.add_argument("--seed", type=int)


def given_shortcuts(args: argparse.Namespace, skip: Sequence[str] = ()) -> list[str]:
    """The shortcut flags given, as ``key=value`` overrides (those named in ``skip`` left out)."""
    return [f"{key}={getattr(args, attr)}" for attr, key in SHORTCUTS.items()
            if attr not in skip and getattr(args, attr, None) is not None]


def shortcut_flags(args: argparse.Namespace) -> list[str]:
    """The shortcut flags given, as they are typed (``--data-root``)."""
    return [f"--{attr.replace('_', '-')}" for attr in SHORTCUTS if getattr(args, attr, None) is not None]


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return build_config(args.preset or "cpu", args.config, given_shortcuts(args) + list(args.overrides))


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


Main = Callable[[Sequence[str] | None], int]


def guarded(main: Main, interrupted: str = NOTHING_TO_RESUME) -> Main:
    """Turn user errors and OSErrors into one line on stderr and exit status 2; a Ctrl-C into status 130,
    with the command that resumes it (see :func:`on_interrupt`) or else ``interrupted``."""
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
            print(f"interrupted; continue with: {hint}" if hint else interrupted, file=sys.stderr)
            return 130
    return wrapper
