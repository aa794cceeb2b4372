"""``bmtard_ray.evaluate``: a model under the paper's attacks, from Python (``run_eval.py`` is a layer over it).

The model is one of our model files (it says its architecture, classes, dataset and normalisation), a public
checkpoint (give ``arch``; ``mean``/``std`` if it was trained on normalised inputs), ``pyautoattack``,
``robustbench:<Name>``, the result of :func:`bmtard_ray.train`, or an ``nn.Module`` taking [0, 1] images.
The checkpoint is loaded first (cheap and the likeliest to be wrong), then the data; reports are written only
after the evaluation has finished, so an error leaves nothing behind.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from bmtard_ray.api.results import EvaluationResult, TrainResult
from bmtard_ray.config import DataConfig, EvalConfig
from bmtard_ray.data import dataset_info, load_dataset, num_classes, train_val_split
from bmtard_ray.errors import ConfigError
from bmtard_ray.evaluation.core import check_attacks
from bmtard_ray.evaluation.core import evaluate as run_attacks
from bmtard_ray.evaluation.probe import chance_warning
from bmtard_ray.evaluation.report import print_table, write_reports
from bmtard_ray.launch.preflight import probe_writable
from bmtard_ray.models.files import PYAUTOATTACK, inspect_checkpoint, load_model
from bmtard_ray.models.refs import check_outputs
from bmtard_ray.names import (
    ATTACK_NAMES,
    BLACK_BOX,
    REFERENCE_DATASETS,
    ROBUSTBENCH_MODEL_DIR,
    check_arch,
    is_model_ref,
    is_robustbench,
)
from bmtard_ray.runtime.device import select_device

ModelLike = str | Path | nn.Module | TrainResult


def eval_config(config: EvalConfig | Mapping[str, Any] | None) -> EvalConfig:
    """An EvalConfig from a mapping of its keys (``attacks``, ``eps``, ``n_examples``, ...; an ``eval.`` prefix
    is allowed); the headline defaults to pgd_sat when it runs, else the first non-clean attack."""
    if isinstance(config, EvalConfig):
        return config
    given = {k.removeprefix("eval."): v for k, v in dict(config or {}).items()}
    names = {f.name for f in fields(EvalConfig)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ConfigError(f"unknown evaluation key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    if isinstance(given.get("attacks"), str):
        given["attacks"] = tuple(a.strip() for a in given["attacks"].split(",") if a.strip())
    cfg = EvalConfig(**given)
    cfg.attacks = tuple(cfg.attacks)
    if "headline" not in given:
        cfg.headline = ("pgd_sat" if "pgd_sat" in cfg.attacks
                        else next((a for a in cfg.attacks if a != "clean"), "pgd_sat"))
    if not cfg.attacks:
        raise ConfigError(f"no attacks given; choose from: {', '.join(ATTACK_NAMES)}")
    return cfg


def _config_value(record: dict[str, Any] | None, section: str, key: str) -> Any:
    cfg = (record or {}).get("config") or {}
    return (cfg.get(section) or {}).get(key) if isinstance(cfg, dict) else None


def _first(*values: Any) -> Any:
    """The first value that is not None (0 is a value: a val_size of 0 must not become the default)."""
    return next(v for v in values if v is not None)


def evaluate(model: ModelLike, config: EvalConfig | Mapping[str, Any] | None = None, *, dataset: str | None = None,
             data_root: str | Path = "data", split: str = "test", val_size: int | None = None,
             split_seed: int | None = None, arch: str | None = None, mean: tuple[float, ...] | None = None,
             std: tuple[float, ...] | None = None, model_dir: str | Path = ROBUSTBENCH_MODEL_DIR,
             source: str | Path | nn.Module | None = None, source_arch: str | None = None, name: str | None = None,
             out: str | Path | None = None, device: str = "auto", progress: bool = False,
             print_results: bool = True) -> EvaluationResult:
    """Evaluate ``model`` on the test split (or the validation split carved as in training) and write JSON,
    Markdown and Parquet reports to ``out`` (default: ``eval/`` beside a checkpoint file; an ``nn.Module``
    writes none unless ``out`` is given). ``config``: an EvalConfig or a mapping of its keys.
    ``source``: the model the black-box attacks bb_pgd / bb_cw are crafted on."""
    cfg = eval_config(config)
    wants_source = any(a in BLACK_BOX for a in cfg.attacks)
    check_attacks(cfg, has_source=source is not None or not wants_source)  # before any loading
    if cfg.headline not in ATTACK_NAMES or cfg.headline == "clean":
        raise ConfigError(f"--headline must be a non-clean attack from: {', '.join(ATTACK_NAMES[1:])}")
    if split not in ("test", "val"):
        raise ConfigError(f"split must be test or val, got {split!r}")
    for flag, arch_name in (("--arch", arch), ("--source-arch", source_arch)):
        if arch_name is not None:
            check_arch(arch_name, f"{flag} model")
    dev = select_device(device)
    if isinstance(model, TrainResult):
        model = model.model_path

    record: dict[str, Any] | None = None
    path: Path | None
    spec = None if isinstance(model, nn.Module) else str(model)
    # The checkpoint first (cheap and the likeliest to be wrong), then the data.
    # A RobustBench name is no file until resolved under model_dir (for the dataset given, else CIFAR-10).
    found = None if spec is None or is_robustbench(spec) else inspect_checkpoint(spec)
    record = found.record if found is not None else None
    ds = dataset or (record or {}).get("dataset") or "cifar10"
    image_size = _config_value(record, "data", "image_size")  # imagefolder / npz: as the model was trained
    # The class count of the user's own data comes from its listing; a table's datasets carry their statistics.
    n_classes = num_classes(ds, data_root, image_size)
    stats = None if ds in REFERENCE_DATASETS else (dataset_info(ds).mean, dataset_info(ds).std)
    if isinstance(model, nn.Module):
        net_model, arch_name, path = model, arch or type(model).__name__, None
    else:
        assert spec is not None
        loaded = load_model(spec, arch, n_classes, dataset=ds, mean=mean, std=std, inspected=found,
                            model_dir=model_dir, default_stats=stats)
        net_model, arch_name, path = loaded.model, loaded.arch, loaded.path
    # Default: eval/ beside the checkpoint (the pyautoattack one lives in site-packages: use ./eval).
    report_dir = (Path(out) if out is not None else None if path is None
                  else Path("eval") if spec == PYAUTOATTACK else path.parent / "eval")
    if report_dir is not None:
        probe_writable(report_dir, "report folder")  # before the evaluation, not after it
    source_model = None
    source_path = source_arch_name = None
    if isinstance(source, nn.Module):
        source_model, source_arch_name = source, source_arch or type(source).__name__
    elif source is not None:
        src = load_model(str(source), source_arch, n_classes, dataset=ds, role="source checkpoint",
                         model_dir=model_dir, default_stats=stats)
        source_model, source_path, source_arch_name = src.model, src.path, src.arch

    budget = _first(_config_value(record, "data", "memory_budget_mb"), DataConfig.memory_budget_mb)
    cache_dir = _config_value(record, "data", "cache_dir") or (report_dir or Path("runs")) / "data_cache"
    train, test, info = load_dataset(ds, data_root, image_size=image_size, memory_budget_mb=budget,
                                     cache_dir=cache_dir)  # the cache is written only when the data streams
    if is_model_ref(arch_name) or isinstance(model, nn.Module):
        # a user's factory (or module) may give another output shape than the dataset's classes
        check_outputs(net_model, info.num_classes, info.image_size,
                      f"model {arch_name}" + (f" of {path}" if path else ""))
    split_meta: dict[str, Any] = {"split": split}
    if split == "val":
        size = _first(val_size, _config_value(record, "data", "val_size"), 5000)
        seed = _first(split_seed, _config_value(record, "data", "split_seed"), 0)
        _, data = train_val_split(train, int(size), int(seed))
        split_meta.update(val_size=int(size), split_seed=int(seed))
    else:
        data = test

    net = net_model.to(dev)
    source_net = source_model.to(dev) if source_model is not None else None
    result = run_attacks(net, data, cfg, device=dev, source_model=source_net, progress=progress)
    if "clean" in result.accuracy and record is None and path is not None:  # our files record their normalisation
        hint = "pass --mean/--std if it was trained on normalised inputs, or leave them out if it was not"
        warning = chance_warning(str(path), result.accuracy["clean"], result.n_examples, n_classes, hint,
                                 split="test" if split == "test" else "validation")
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)

    stem = ("pyautoattack_resnet18" if spec == PYAUTOATTACK else path.stem if path is not None
            else type(net_model).__name__)
    # A run's file is <run>/model.pt: the run folder names the model better than "model".
    label = name or (path.parent.name if path is not None and path.stem == "model" else stem)
    model_info: dict[str, Any] = {
        "name": label, "architecture": arch_name, "dataset": ds, "checkpoint": str(path) if path else None,
        **split_meta, "method": _config_value(record, "method", "name"),
        "teachers": (record or {}).get("teachers"),
        "source_checkpoint": str(source_path) if source_path is not None else None,
        "source_architecture": source_arch_name,
    }
    reports = (write_reports(result, report_dir, model_info=model_info, stem=f"{stem}_{split}")
               if report_dir is not None else {})
    if print_results:
        print_table(result, f"{label} on {ds} {split}")
    return EvaluationResult(result, model_info, dict(reports))
