"""What the Python API returns: the summary a command prints, where its files are, and the trained model.

The model is read from the run's ``model.pt`` when first asked for (and kept), so a result costs nothing
until it is used, and the model is exactly the file ``run_eval.py`` would evaluate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from bmtard_ray.config import RunConfig
from bmtard_ray.errors import ConfigError
from bmtard_ray.evaluation.core import EvalResult
from bmtard_ray.models.files import inspect_checkpoint, load_model
from bmtard_ray.storage.paths import is_uri, join
from bmtard_ray.storage.run_folder import MODEL_FILE


def load_run_model(path: str | Path) -> nn.Module:
    """The model in one of our model files (``model.pt``: it records its architecture, classes and dataset),
    on the CPU, in eval mode."""
    if is_uri(str(path)):
        raise ConfigError(f"{path} is in remote storage; copy the run folder here to load its model")
    found = inspect_checkpoint(str(path))
    record = found.record
    if record is None:
        raise ConfigError(f"{path} is not a model file of this toolkit (no record of its architecture)")
    loaded = load_model(str(path), None, int(record["num_classes"]), dataset=str(record["dataset"]),
                        inspected=found)
    return loaded.model.eval()


@dataclass
class TrainResult:
    """A finished training run: its summary (as ``summary.json``), its folder and the config it ran."""
    summary: dict[str, Any]
    run_dir: str
    config: RunConfig
    _model: nn.Module | None = field(default=None, repr=False)

    @property
    def model_path(self) -> str:
        return join(self.run_dir, MODEL_FILE)

    @property
    def model(self) -> nn.Module:
        """The trained student (loaded from ``model.pt`` on first use)."""
        if self._model is None:
            self._model = load_run_model(self.model_path)
        return self._model


@dataclass
class EvaluationResult:
    """An evaluation: accuracy per attack and W-Robust per attack (percent), and the reports written."""
    result: EvalResult
    model_info: dict[str, Any]
    reports: dict[str, Path]

    @property
    def accuracy(self) -> dict[str, float]:
        return self.result.accuracy

    @property
    def w_robust(self) -> dict[str, float]:
        return self.result.w_robust

    @property
    def n_examples(self) -> int:
        return self.result.n_examples

    @property
    def summary(self) -> dict[str, Any]:
        return {**self.model_info, **self.result.to_dict()}


@dataclass
class SearchResult:
    """A finished search: the summary of ``summary.json`` (best trial, its test evaluation, counts) and the
    experiment folder. ``best_run_dir`` is the selected trial's folder; ``model`` its student."""
    summary: dict[str, Any]
    experiment_dir: Path
    complete: bool = True           # False: interrupted; the summary holds what is known so far
    _model: nn.Module | None = field(default=None, repr=False)

    @property
    def best(self) -> dict[str, Any] | None:
        best = self.summary.get("best")
        return best if isinstance(best, dict) else None

    @property
    def best_run_dir(self) -> Path | None:
        return Path(self.best["folder"]) if self.best and self.best.get("folder") else None

    @property
    def model(self) -> nn.Module:
        """The selected trial's student (its ``model.pt``); an error when no trial finished."""
        if self._model is None:
            folder = self.best_run_dir
            if folder is None:
                raise ConfigError(f"the search in {self.experiment_dir} selected no trial: no model to load")
            self._model = load_run_model(folder / MODEL_FILE)
        return self._model
