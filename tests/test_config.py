"""Configuration resolution: dataset-dependent defaults are resolved once, and explicit values win."""
from __future__ import annotations

from pathlib import Path

import pytest

from bmtard_ray.config import build_config, dataset_settings, to_dict


@pytest.mark.parametrize("preset", ["gpu-small", "paper", "smoke"])
def test_cifar100_gets_the_released_loss_scale_from_any_preset(preset: str) -> None:
    assert build_config(preset).loss.scale == 1.0
    cfg = build_config(preset, overrides=["data.dataset=cifar100"])
    assert cfg.loss.scale == 10.0
    assert to_dict(cfg)["loss"]["scale"] == 10.0  # the resolved config (config.yaml) holds the value
    assert dataset_settings(cfg) == "loss.scale=10"  # and the run's first line shows it


def test_explicit_values_win_over_the_dataset_default(tmp_path: Path) -> None:
    # An override, even one equal to the other datasets' default ...
    assert build_config("gpu-small", overrides=["data.dataset=cifar100", "loss.scale=1"]).loss.scale == 1.0
    assert build_config("gpu-small", overrides=["data.dataset=cifar100", "loss.scale=2.5"]).loss.scale == 2.5
    # ... a config file, a nested extra layer, or a preset that sets the key (cpu: 10 on CIFAR-10)
    (tmp_path / "mine.yaml").write_text("data: {dataset: cifar100}\nloss: {scale: 3}\n")
    assert build_config("gpu-small", files=[tmp_path / "mine.yaml"]).loss.scale == 3.0
    assert build_config("gpu-small", extra={"data": {"dataset": "cifar100"}, "loss": {"scale": 4}}).loss.scale == 4.0
    assert build_config("cpu").loss.scale == 10.0


def test_the_cifar100_preset_takes_its_scale_from_the_dataset() -> None:
    assert build_config("paper-cifar100").loss.scale == 10.0
    assert build_config("paper-cifar100", overrides=["data.dataset=cifar10"]).loss.scale == 1.0
