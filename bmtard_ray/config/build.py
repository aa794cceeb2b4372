"""Building a configuration: preset -> ``--config`` files -> extra layers -> ``--set`` overrides, then the
dataset-dependent defaults of keys that none of them set, then validation."""
from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bmtard_ray.config.convert import flat_keys, nest, update
from bmtard_ray.config.schema import CONFIG_FORMAT, RunConfig
from bmtard_ray.config.validate import validate
from bmtard_ray.errors import ConfigError
from bmtard_ray.names import DATASET_DEFAULTS, apply_checkpoint_archs


def preset_names() -> list[str]:
    folder = resources.files("bmtard_ray") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    # A run's config.yaml carries its format; any version-1 file reads as overrides (others refuse).
    found = data.pop("format", CONFIG_FORMAT)
    if found != CONFIG_FORMAT:
        raise ConfigError(f"{path}: config format {found!r} is not one this version reads ({CONFIG_FORMAT})")
    return data


def preset_dict(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(names)}")
    text = (resources.files("bmtard_ray") / "presets" / f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", parsed YAML scalar)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _leaf_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys a (nested) layer sets."""
    out: set[str] = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _leaf_keys(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def apply_dataset_defaults(cfg: RunConfig, explicit: set[str]) -> RunConfig:
    """Give every dataset-dependent key not in ``explicit`` its value for ``cfg``'s dataset (in place)."""
    for key, by_dataset in DATASET_DEFAULTS.items():
        if key not in explicit and cfg.data.dataset in by_dataset:
            update(cfg, nest({key: by_dataset[cfg.data.dataset]}))
    return cfg


def dataset_settings(cfg: RunConfig) -> str:
    """The resolved dataset-dependent keys, for the line a run prints when it starts."""
    flat = flat_keys(cfg)
    return ", ".join(f"{key}={flat[key]:g}" if isinstance(flat[key], float) else f"{key}={flat[key]}"
                     for key in DATASET_DEFAULTS)


def build_config(preset: str | None = None, files: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                 extra: dict[str, Any] | Sequence[dict[str, Any]] | None = None) -> RunConfig:
    """Resolve preset -> files -> ``extra`` (a nested dict, or several in order) -> dotted overrides, then the
    dataset-dependent defaults of keys none of them set, then validate."""
    cfg = RunConfig()
    layers: list[dict[str, Any]] = []
    if preset:
        layers.append(preset_dict(preset))
    layers += [read_yaml(f) for f in files]
    if isinstance(extra, dict):
        extra = [extra]
    layers += [layer for layer in extra or () if layer]
    if overrides:
        layers.append(nest(dict(parse_override(o) for o in overrides)))
    explicit: set[str] = set()
    for layer in layers:
        update(cfg, layer)
        explicit |= _leaf_keys(layer)
    apply_dataset_defaults(cfg, explicit)
    # A preset's teacher arch is a default that a RobustBench name may replace; the user's own is not.
    user = set().union(*(_leaf_keys(layer) for layer in layers[1 if preset else 0:]))
    apply_checkpoint_archs(cfg, user)
    validate(cfg)
    return cfg
