"""``run_eval.py``: evaluate any checkpoint (ours or a public one) on a split and write the reports.

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
from pathlib import Path
from typing import Any

from bmtard_ray.cli.common import guarded
from bmtard_ray.config import DataConfig, EvalConfig
from bmtard_ray.data import load_dataset, num_classes, train_val_split
from bmtard_ray.errors import ConfigError
from bmtard_ray.evaluation.core import check_attacks, evaluate
from bmtard_ray.evaluation.probe import chance_warning
from bmtard_ray.evaluation.report import print_table, write_reports
from bmtard_ray.launch.preflight import probe_writable
from bmtard_ray.models.files import PYAUTOATTACK, inspect_checkpoint, load_model
from bmtard_ray.names import (
    ATTACK_NAMES,
    BLACK_BOX,
    DATASET_NAMES,
    DEVICES,
    MODEL_NAMES,
    ROBUSTBENCH_MODEL_DIR,
    is_robustbench,
)
from bmtard_ray.runtime.device import select_device


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
    p.add_argument("--arch", choices=MODEL_NAMES, help="architecture (needed for public checkpoints)")
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
    p.add_argument("--source-arch", choices=MODEL_NAMES, help="architecture of a public source checkpoint")
    p.add_argument("--mean", default=None, help="input normalisation of a public checkpoint: 3 comma-separated numbers")
    p.add_argument("--std", default=None, help="see --mean")
    p.add_argument("--name", default=None, help="model name in the reports (default: the checkpoint's file name)")
    p.add_argument("--out", default=None, help="report folder (default: eval/ next to the checkpoint)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="rich progress bar (default: when stderr is a terminal)")
    return p


def _config_value(record: dict[str, Any] | None, section: str, key: str) -> Any:
    cfg = (record or {}).get("config") or {}
    return (cfg.get(section) or {}).get(key) if isinstance(cfg, dict) else None


def _first(*values: Any) -> Any:
    """The first value that is not None (0 is a value: a val_size of 0 must not become the default)."""
    return next(v for v in values if v is not None)


def run(args: argparse.Namespace) -> int:
    attacks = parse_attacks(args.attacks)
    cfg = EvalConfig(attacks=attacks, eps=args.eps, n_examples=args.n_examples, batch_size=args.batch_size,
                     seed=args.seed, square_queries=args.square_queries, autoattack_version=args.autoattack_version)
    wants_source = any(a in BLACK_BOX for a in attacks)
    check_attacks(cfg, has_source=args.source_checkpoint is not None or not wants_source)  # before any loading
    cfg.headline = args.headline or ("pgd_sat" if "pgd_sat" in attacks
                                     else next((a for a in attacks if a != "clean"), "pgd_sat"))
    if cfg.headline not in ATTACK_NAMES or cfg.headline == "clean":
        raise ConfigError(f"--headline must be a non-clean attack from: {', '.join(ATTACK_NAMES[1:])}")
    device = select_device(args.device)
    mean, std = _stats(args.mean, "--mean"), _stats(args.std, "--std")

    # The checkpoint first (cheap and the likeliest to be wrong), then the data.
    # A RobustBench name is no file until resolved under --model-dir (for the dataset given, else CIFAR-10).
    found = None if is_robustbench(args.checkpoint) else inspect_checkpoint(args.checkpoint)
    record = found.record if found is not None else None
    dataset = args.dataset or (record or {}).get("dataset") or "cifar10"
    image_size = _config_value(record, "data", "image_size")  # imagefolder / npz: as the model was trained
    n_classes = num_classes(dataset, args.data_root, image_size)
    loaded = load_model(args.checkpoint, args.arch, n_classes, dataset=dataset, mean=mean, std=std,
                        inspected=found, model_dir=args.model_dir)
    path = loaded.path
    # Default: eval/ beside the checkpoint (the pyautoattack one lives in site-packages: use ./eval).
    out = Path(args.out) if args.out else Path("eval") if args.checkpoint == PYAUTOATTACK else path.parent / "eval"
    probe_writable(out, "report folder")  # before the evaluation, not after it
    source = None
    if wants_source:
        source = load_model(args.source_checkpoint, args.source_arch, n_classes, dataset=dataset,
                            role="source checkpoint", model_dir=args.model_dir)

    budget = _first(_config_value(record, "data", "memory_budget_mb"), DataConfig.memory_budget_mb)
    cache_dir = _config_value(record, "data", "cache_dir") or out / "data_cache"  # used only when streamed
    train, test, _ = load_dataset(dataset, args.data_root, image_size=image_size, memory_budget_mb=budget,
                                  cache_dir=cache_dir)
    split_meta: dict[str, Any] = {"split": args.split}
    if args.split == "val":
        val_size = _first(args.val_size, _config_value(record, "data", "val_size"), 5000)
        split_seed = _first(args.split_seed, _config_value(record, "data", "split_seed"), 0)
        _, split = train_val_split(train, int(val_size), int(split_seed))
        split_meta.update(val_size=int(val_size), split_seed=int(split_seed))
    else:
        split = test

    model = loaded.model.to(device)
    source_model = source.model.to(device) if source is not None else None
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    result = evaluate(model, split, cfg, device=device, source_model=source_model, progress=progress)
    if "clean" in result.accuracy and record is None:  # our own files record their normalisation
        hint = "pass --mean/--std if it was trained on normalised inputs, or leave them out if it was not"
        warning = chance_warning(str(path), result.accuracy["clean"], result.n_examples, n_classes, hint,
                                 split="test" if args.split == "test" else "validation")
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)

    stem = "pyautoattack_resnet18" if args.checkpoint == PYAUTOATTACK else path.stem
    # A run's file is <run>/model.pt: the run folder names the model better than "model".
    name = args.name or (path.parent.name if path.stem == "model" else stem)
    model_info: dict[str, Any] = {
        "name": name, "architecture": loaded.arch, "dataset": dataset, "checkpoint": str(path), **split_meta,
        "method": _config_value(record, "method", "name"),
        "teachers": (record or {}).get("teachers"),
        "source_checkpoint": str(source.path) if source is not None else None,
        "source_architecture": source.arch if source is not None else None,
    }
    paths = write_reports(result, out, model_info=model_info, stem=f"{stem}_{args.split}")
    print_table(result, f"{name} on {dataset} {args.split}")
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return 0


def _main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


main = guarded(_main, interrupted="interrupted; no report was written")
