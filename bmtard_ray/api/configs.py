"""A configuration from what a Python caller gives: a RunConfig, or a mapping of the keys ``--set`` takes.

A mapping may be nested (``{"ebb": {"mode": "solve"}}``), dotted (``{"ebb.mode": "solve"}``) or both; it is
applied over a preset and any YAML files exactly as ``--set`` overrides are on the command line, so the
same dataset-dependent defaults and the same validation apply.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bmtard_ray.config import RunConfig, build_config, from_dict, nest, to_dict, validate
from bmtard_ray.errors import ConfigError

ConfigLike = RunConfig | Mapping[str, Any] | None


def dotted(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf of a (partly) nested mapping as ``section.key -> value``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"config keys must be non-empty strings, got {key!r}")
        if isinstance(value, Mapping):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def layer(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A mapping of overrides as the nested layer ``build_config`` applies."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a RunConfig or a mapping of config keys, got {type(config).__name__}")
    return nest(dotted(config))


def run_config(config: ConfigLike = None, *, preset: str | None = None,
               files: Sequence[str | Path] = ()) -> RunConfig:
    """The validated RunConfig of a call: ``config`` as is when it is a RunConfig (a copy; then no preset or
    files), else preset (default ``cpu``) -> files -> the mapping's keys."""
    if isinstance(config, RunConfig):
        if preset is not None or files:
            raise ConfigError("a RunConfig is a whole configuration: give it alone, or give preset/config files "
                              "with a mapping of keys instead")
        return validate(from_dict(to_dict(config)))
    return build_config(preset or "cpu", list(files), extra=layer(config))
