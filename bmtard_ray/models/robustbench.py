"""Finding RobustBench models named ``robustbench:<Name>`` (the names themselves: :mod:`bmtard_ray.names`).

RobustBench keeps a downloaded model at ``<model_dir>/<dataset>/Linf/<Name>.pt`` (``model_dir`` is ``./models``
by default, as in ``robustbench.utils.load_model``; here ``teachers.model_dir`` or ``run_eval.py --model-dir``).
A file found there is loaded (by :func:`bmtard_ray.models.checkpoint.load_model`) strictly into this toolkit's
architecture for the name, with the normalisation RobustBench applies for it: ``ROBUSTBENCH_KNOWN`` lists the
names of the paper's robust teachers and their families; any other name needs its architecture said
(``teachers.<role>.arch`` / ``--arch``). When the file is missing, the ``robustbench`` package, where installed,
loads (and downloads) the model with its own loader; without it, or when its download fails (offline), one
line says where to put the file and which command fetches it.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bmtard_ray.errors import CheckpointError, ConfigError
from bmtard_ray.names import (
    ROBUSTBENCH_KNOWN,
    ROBUSTBENCH_THREAT_MODEL,
    check_robustbench_dataset,
    known_robustbench_model,
    robustbench_name,
)


def robustbench_path(spec: str, dataset: str, model_dir: str | Path) -> Path:
    """Where RobustBench keeps the model: ``<model_dir>/<dataset>/Linf/<Name>.pt``."""
    check_robustbench_dataset(spec, dataset)
    return Path(model_dir).expanduser() / dataset / ROBUSTBENCH_THREAT_MODEL / f"{robustbench_name(spec)}.pt"


def download_command(spec: str, dataset: str, model_dir: str | Path) -> str:
    """The shell command that fetches the model into ``model_dir`` with RobustBench's own loader."""
    return (f"pip install robustbench && python -c \"from robustbench.utils import load_model; "
            f"load_model('{robustbench_name(spec)}', model_dir='{model_dir}', dataset='{dataset}', "
            f"threat_model='{ROBUSTBENCH_THREAT_MODEL}')\"")


def missing_message(spec: str, dataset: str, model_dir: str | Path) -> str:
    path = robustbench_path(spec, dataset, model_dir)
    return (f"RobustBench model {robustbench_name(spec)} ({dataset}, {ROBUSTBENCH_THREAT_MODEL}) is not at {path}: "
            f"put the file there (the folder above {dataset}/{ROBUSTBENCH_THREAT_MODEL} is teachers.model_dir, "
            f"run_eval.py --model-dir), or fetch it on a machine with network access: "
            f"{download_command(spec, dataset, model_dir)}")


def package_available() -> bool:
    """Whether the optional ``robustbench`` package is installed (found without importing it)."""
    try:
        return importlib.util.find_spec("robustbench") is not None
    except (ImportError, ValueError):
        return False


def load_with_package(spec: str, dataset: str, model_dir: str | Path) -> nn.Module:
    """RobustBench's own model for the name, through ``robustbench.utils.load_model`` (which downloads it into
    ``model_dir`` when the file is missing). Any failure, e.g. no network, becomes one line."""
    try:
        utils = importlib.import_module("robustbench.utils")
        model = utils.load_model(model_name=robustbench_name(spec), model_dir=str(model_dir), dataset=dataset,
                                 threat_model=ROBUSTBENCH_THREAT_MODEL)
    except Exception as exc:  # the package raises whatever its download or unpickling raises
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"{missing_message(spec, dataset, model_dir)} (robustbench could not load it: "
                              f"{reason})") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"robustbench.utils.load_model returned a {type(model).__name__} for {spec}, "
                              f"not a model")
    return model.eval()


@dataclass
class RobustBenchFile:
    """A RobustBench model to load from disk into our architecture ``arch`` with this normalisation."""
    path: Path
    arch: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


@dataclass
class RobustBenchModel:
    """A model built by the robustbench package itself (downloaded if it had to be)."""
    model: nn.Module
    arch: str          # our name for its architecture when known, else "robustbench"
    path: Path


def resolve_robustbench(spec: str, arch: str | None, *, dataset: str, model_dir: str | Path,
                        mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                        arch_flag: str = "--arch") -> RobustBenchFile | RobustBenchModel:
    """What ``robustbench:<Name>`` is here: a file to load into our architecture, or the package's model."""
    path = robustbench_path(spec, dataset, model_dir)
    known = known_robustbench_model(spec, dataset)
    if known is not None:
        if arch is not None and arch != known.arch:
            raise ConfigError(f"{spec} is a '{known.arch}' model; {arch_flag} {arch} contradicts it")
        arch = known.arch
        if mean is None and std is None:  # the checkpoint's own mean/std buffers, if any, still take precedence
            mean, std = known.mean, known.std
    if path.is_file() and arch is not None:
        return RobustBenchFile(path, arch, mean, std)
    if package_available():  # RobustBench's own loader: any name, and it downloads a missing file
        return RobustBenchModel(load_with_package(spec, dataset, model_dir), arch or "robustbench", path)
    if path.is_file():
        names = ", ".join(sorted(ROBUSTBENCH_KNOWN.get(dataset, {})))
        raise ConfigError(f"{spec}: this toolkit knows the architecture of {names} on {dataset}; say which "
                          f"architecture {path} is with {arch_flag} (or install robustbench to use its loader)")
    raise CheckpointError(missing_message(spec, dataset, model_dir))
