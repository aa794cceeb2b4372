"""``run_eval.py``: evaluate any checkpoint (ours or a public one) on a split and write the reports; a layer
over :func:`bmtard_ray.api.eval_run.evaluate`.

Our model files (``model.pt`` of a training run, ``format: bmtard_ray.model/1``) carry their architecture,
class count, dataset, normalisation, teachers and config, so they need no flags. Public checkpoints (plain
state dicts, possibly wrapped in ``state_dict`` / ``module.``) need ``--arch``. ``pyautoattack`` names the
standard CIFAR-10 ResNet-18 that the pyautoattack wheel ships.

Every user error (bad flag, missing data, a checkpoint that is an HTML page, truncated, of another
architecture or class count) ends as ``error: <one line>`` on stderr with exit status 2, and no report is
written: the reports are written only after the evaluation has finished.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from bmtard_ray.api.eval_run import evaluate
from bmtard_ray.cli.common import guarded
from bmtard_ray.errors import ConfigError
from bmtard_ray.models.files import PYAUTOATTACK
from bmtard_ray.names import ATTACK_NAMES, DATASET_NAMES, DEVICES, MODEL_NAMES, ROBUSTBENCH_MODEL_DIR


def parse_eps(text: str) -> float:
    """``8/255`` or ``0.0314`` -> float (argparse type; a ConfigError would not be caught there)."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"eps must be a number or a fraction like 8/255, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"eps must be a finite number >= 0, got {text!r}")
    return value


def parse_attacks(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return ATTACK_NAMES
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    if not names:
        raise ConfigError(f"--attacks is empty; give a comma-separated list from: {', '.join(ATTACK_NAMES)} (or all)")
    return names


def _stats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} must be 3 comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_eval.py", description="Evaluate a checkpoint under the attacks of the "
                                "B-MTARD paper and write JSON / Markdown / Parquet reports.")
    p.add_argument("checkpoint", help=f"model file (ours or a public state dict), '{PYAUTOATTACK}' for the "
                   "standard CIFAR-10 ResNet-18 shipped with pyautoattack, or robustbench:<Name> (a RobustBench "
                   "L-inf model under --model-dir)")
    p.add_argument("--model-dir", default=ROBUSTBENCH_MODEL_DIR, help="RobustBench's model folder, holding "
                   f"<dataset>/Linf/<Name>.pt (default: {ROBUSTBENCH_MODEL_DIR})")
    p.add_argument("--arch", help=f"architecture (needed for public checkpoints and .safetensors files): "
                   f"{', '.join(MODEL_NAMES)}, timm:<name> or <module>:<callable>")
    p.add_argument("--dataset", choices=DATASET_NAMES, help="default: the checkpoint's dataset, else cifar10")
    p.add_argument("--data-root", default="data", help="folder holding the dataset (default: data)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="test set, or the validation split carved from the training set as in training")
    p.add_argument("--val-size", type=int, default=None,
                   help="validation size (default: the checkpoint's data.val_size, else 5000)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="validation split seed (default: the checkpoint's data.split_seed, else 0)")
    p.add_argument("--attacks", default="clean,pgd_sat", help=f"comma-separated from {','.join(ATTACK_NAMES)}, "
                   "or all (default: clean,pgd_sat)")
    p.add_argument("--headline", default=None, help="attack whose W-Robust is the headline (default: pgd_sat if "
                   "run, else the first non-clean attack)")
    p.add_argument("--n-examples", type=int, default=None, help="stratified, seeded subset of this size")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eps", type=parse_eps, default=8 / 255, help="L-inf radius, e.g. 8/255 (default) or 0.03")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--square-queries", type=int, default=1000)
    p.add_argument("--autoattack-version", default="standard", choices=("standard", "plus", "rand"))
    p.add_argument("--source-checkpoint", default=None,
                   help="robust teacher for the black-box attacks bb_pgd / bb_cw (ours, public, or pyautoattack)")
    p.add_argument("--source-arch", help="architecture of a public source checkpoint (as --arch)")
    p.add_argument("--mean", default=None, help="input normalisation of a public checkpoint: 3 comma-separated numbers")
    p.add_argument("--std", default=None, help="see --mean")
    p.add_argument("--name", default=None, help="model name in the reports (default: the checkpoint's file name)")
    p.add_argument("--out", default=None, help="report folder (default: eval/ next to the checkpoint)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="rich progress bar (default: when stderr is a terminal)")
    return p


def run(args: argparse.Namespace) -> int:
    attacks = parse_attacks(args.attacks)
    config: dict[str, Any] = {"attacks": attacks, "eps": args.eps, "n_examples": args.n_examples,
                              "batch_size": args.batch_size, "seed": args.seed, "square_queries": args.square_queries,
                              "autoattack_version": args.autoattack_version}
    if args.headline:
        config["headline"] = args.headline
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    done = evaluate(args.checkpoint, config, dataset=args.dataset, data_root=args.data_root, split=args.split,
                    val_size=args.val_size, split_seed=args.split_seed, arch=args.arch,
                    mean=_stats(args.mean, "--mean"), std=_stats(args.std, "--std"), model_dir=args.model_dir,
                    source=args.source_checkpoint, source_arch=args.source_arch, name=args.name, out=args.out,
                    device=args.device, progress=progress)
    for kind, p in done.reports.items():
        print(f"{kind}: {p}")
    return 0


def _main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


main = guarded(_main, interrupted="interrupted; no report was written")
