"""A configuration to and from plain dicts: typed updates from nested dicts (YAML, overrides), the plain dict
written to files, deep copies with dotted changes, and the flat ``section.key`` view the search spaces use."""
from __future__ import annotations

import types
import typing
from dataclasses import asdict, fields, is_dataclass
from typing import Any, get_type_hints

from bmtard_ray.config.schema import RunConfig
from bmtard_ray.errors import ConfigError


def _shape(hint: Any) -> tuple[bool, Any, Any]:
    """A field's type hint as (None allowed, its type, the element type when it is a tuple)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    kind = kinds[0] if len(kinds) == 1 else Any
    if typing.get_origin(kind) is tuple:
        return type(None) in args, tuple, typing.get_args(kind)[0]
    return type(None) in args, kind, None


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError naming the key."""
    optional, kind, element = _shape(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path} must not be null")
    try:
        if kind is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(_scalar(v, element, path) for v in value)
        if kind in (bool, int, float):
            return _scalar(value, kind, path)
        if kind is str:
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read {value!r} as {hint}") from exc
    return value


def _scalar(value: Any, kind: type, path: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(float(value)) if isinstance(value, str) else int(value)
    if kind is float:
        if isinstance(value, str) and "/" in value:  # "8/255" is how eps is usually written
            num, den = value.split("/", 1)
            return float(num) / float(den)
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    return kind(value)


def update(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Set the keys of the nested dict ``updates`` on the dataclass ``obj`` (in place), each value read as its
    field's type; an unknown key or a value of the wrong type is a ConfigError naming the dotted key."""
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} is a section; give it a mapping, not {value!r}")
            update(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}' conflicts with another override")
        node[parts[-1]] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON/YAML-able dict (tuples become lists)."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(asdict(cfg))


def from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    update(cfg, data)
    return cfg


def replace(cfg: RunConfig, **changes: Any) -> RunConfig:
    """A deep copy with dotted-key changes applied (``replace(cfg, **{"optim.lr": 0.05})``)."""
    new = from_dict(to_dict(cfg))
    update(new, nest(changes))
    return new


def flat_keys(cfg: Any = None, prefix: str = "") -> dict[str, Any]:
    """Every leaf as ``section.key -> value``; the search spaces use these names."""
    cfg = RunConfig() if cfg is None else cfg
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update(flat_keys(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out
