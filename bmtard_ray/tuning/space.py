"""Search spaces for ``run_tune.py``: YAML files of dotted RunConfig keys, parsed and checked in pure Python.

A space file names the config keys to search and how to sample each one::

    description: EBB's knobs
    base: {preset: cpu, set: {ebb.target_mode: fraction}}   # optional: defaults for every trial
    params:
      ebb.target_entropy: {type: float, low: 0.2, high: 0.9}
      ebb.eta_tau: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      nlb.ref_window: {type: int, low: 1, high: 50, log: true}
      method.trades_beta: {type: float, low: 1, high: 10, when: {method.name: trades}}

Everything a user can get wrong is found here, before Ray starts, and reported as one line naming the
file, the key and the problem. This module never imports ray or optuna (the Tune layer converts a
:class:`SearchSpace` into Optuna distributions), so the checks are cheap and testable on their own.

Interactions between keys are handled two ways:

* **presence** by conditional sampling: ``when: {key: value-or-list}`` samples a parameter only in trials
  where the (earlier-sampled or base) key takes one of those values, e.g. TRADES' beta only when the
  method is TRADES. Optuna sees a define-by-run space, so an inactive parameter is absent from the trial
  rather than sampled and ignored (which would feed TPE pure noise).
* **numeric constraints** by clipping (:func:`repair`): an initial temperature sampled outside the sampled
  ``[tau_min, tau_max]`` is clipped into it. Clipping is deterministic, so TPE still learns a function
  of what it sampled; the effective value is what the trial runs and reports. Every other constraint of
  :func:`bmtard_ray.config.validate` is checked on every corner of the box before the search starts
  (:func:`~bmtard_ray.tuning.trials.check_space`), so a range that can produce an invalid trial is refused up
  front. From sampled values to a trial's configuration is :mod:`bmtard_ray.tuning.trials`.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from bmtard_ray.config import RunConfig, flat_keys, preset_names
from bmtard_ray.errors import ConfigError


def _default_spaces_dir() -> Path:
    """``search_spaces/`` of the checkout the package runs from (editable install), else ``./search_spaces``."""
    beside = Path(__file__).resolve().parents[2] / "search_spaces"
    return beside if beside.is_dir() else Path.cwd() / "search_spaces"


# Space names (--space ebb) resolve here.
SPACES_DIR = _default_spaces_dir()
PARAM_TYPES = ("float", "int", "categorical")
TOP_LEVEL = ("description", "base", "params")
BASE_FIELDS = ("preset", "set")
NUMERIC_FIELDS = ("type", "low", "high", "log", "step", "when")
CATEGORICAL_FIELDS = ("type", "choices", "when")
# Optuna's CategoricalDistribution accepts only these choice types (and they survive SQLite storage).
CHOICE_TYPES = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Param:
    """One searched key: a float/int range (optionally log or stepped) or a list of choices."""
    key: str
    kind: str                                   # "float" | "int" | "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # every (key, allowed values) must hold

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether this parameter is sampled, given the values decided so far (base config + earlier params)."""
        return all(values.get(key) in allowed for key, allowed in self.when)

    def extremes(self) -> tuple[Any, ...]:
        """The values a corner check tries: both bounds, or every choice."""
        if self.kind == "categorical":
            return self.choices
        return (self.low,) if self.low == self.high else (self.low, self.high)

    def describe(self) -> str:
        if self.kind == "categorical":
            text = "{" + ", ".join(fmt_value(c) for c in self.choices) + "}"
        else:
            text = f"{self.kind} [{fmt_value(self.low)}, {fmt_value(self.high)}]"
            text += " log" if self.log else ""
            text += f" step {fmt_value(self.step)}" if self.step is not None else ""
        if self.when:
            text += " when " + ", ".join(f"{k} in {{{', '.join(fmt_value(v) for v in vs)}}}" for k, vs in self.when)
        return text


@dataclass(frozen=True)
class SearchSpace:
    name: str
    source: str                                 # the file it came from (for messages)
    description: str
    params: tuple[Param, ...]
    base_preset: str | None = None
    base_set: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.params)

    def param(self, key: str) -> Param:
        for p in self.params:
            if p.key == key:
                return p
        raise KeyError(key)


def fmt_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# ---------------------------------------------------------------------------------------------------------
# Finding a space by name or path.


def space_names(folder: Path = SPACES_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_space_path(name_or_path: str | Path, folder: Path = SPACES_DIR) -> Path:
    """A bare name looks in ``search_spaces/``; anything with a suffix or a slash is a path."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"search space file {path} does not exist")
        return path
    path = folder / f"{text}.yaml"
    if not path.is_file():
        names = space_names(folder)
        raise ConfigError(f"unknown search space '{text}'; choose one of: {', '.join(names) or '(none found)'} "
                          f"(in {folder}) or give a path to a YAML file")
    return path


def load_space(name_or_path: str | Path, folder: Path = SPACES_DIR) -> SearchSpace:
    path = resolve_space_path(name_or_path, folder)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConfigError(f"{path}: malformed YAML ({first[:160]})") from exc
    return parse_space(data, source=str(path), name=path.stem)


# ---------------------------------------------------------------------------------------------------------
# Parsing and per-key checks.


def _field_hint(key: str) -> str:
    """The declared type of a dotted RunConfig key, as text (``"float"``, ``"int | None"``, ...)."""
    obj: Any = RunConfig()
    parts = key.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    return str(get_type_hints(type(obj))[parts[-1]]).replace("typing.", "")


def _check_key(key: Any, known: Mapping[str, Any], where: str) -> str:
    if not isinstance(key, str) or key not in known:
        close = difflib.get_close_matches(str(key), list(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else " (keys are dotted RunConfig keys such as ebb.eta_tau)"
        raise ConfigError(f"{where}: unknown config key '{key}'{hint}")
    return key


def _number(value: Any, what: str, where: str) -> float:
    # YAML 1.1 reads "1e-4" (no dot) as a string; accept numeric strings rather than surprise the user.
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{where}: {what} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{where}: {what} must be finite, got {value!r}")
    return out


def _parse_when(raw: Any, known: Mapping[str, Any], where: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: 'when' must be a mapping of config key -> value or list of values")
    out = []
    for key, allowed in raw.items():
        _check_key(key, known, f"{where}: when")
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if not values:
            raise ConfigError(f"{where}: when.{key} lists no values")
        out.append((key, values))
    return tuple(out)


def _parse_param(key: str, spec: Any, earlier: list[str], all_params: tuple[str, ...], known: Mapping[str, Any],
                 where: str) -> Param:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{type: float, low: 0.1, high: 1.0}}, got {spec!r}")
    kind = spec.get("type")
    if kind is None:
        raise ConfigError(f"{where}: missing 'type' ({', '.join(PARAM_TYPES)})")
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{where}: unknown type '{kind}'; choose one of: {', '.join(PARAM_TYPES)}")
    allowed = CATEGORICAL_FIELDS if kind == "categorical" else NUMERIC_FIELDS
    for name in spec:
        if name not in allowed:
            raise ConfigError(f"{where}: unknown field '{name}' for type {kind}; accepted: {', '.join(allowed)}")
    when = _parse_when(spec.get("when"), known, where)
    for wkey, _ in when:
        if wkey == key:
            raise ConfigError(f"{where}: a parameter cannot depend on itself in 'when'")
        if wkey in all_params and wkey not in earlier:
            raise ConfigError(f"{where}: 'when' refers to {wkey}, which is searched later in the file; "
                              "list it before this parameter")
    hint = _field_hint(key)
    if hint.startswith("tuple"):
        raise ConfigError(f"{where}: {key} is a list-valued key ({hint}) and cannot be searched")

    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list 'choices'")
        for c in choices:
            if not isinstance(c, CHOICE_TYPES):
                raise ConfigError(f"{where}: choice {c!r} is not a scalar (null, bool, int, float or string)")
        if len({repr(c) for c in choices}) != len(choices):
            raise ConfigError(f"{where}: 'choices' lists a value twice")
        return Param(key, kind, choices=tuple(choices), when=when)

    if "str" in hint or "bool" in hint:
        raise ConfigError(f"{where}: {key} is a {hint} key; search it with type categorical")
    if kind == "float" and "float" not in hint:
        raise ConfigError(f"{where}: {key} is an integer key ({hint}); use type int")
    for name in ("low", "high"):
        if name not in spec:
            raise ConfigError(f"{where}: type {kind} needs both 'low' and 'high'")
    low, high = _number(spec["low"], "low", where), _number(spec["high"], "high", where)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: 'log' must be true or false, got {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, "step", where)
        if step <= 0:
            raise ConfigError(f"{where}: step must be > 0, got {fmt_value(step)}")
    if kind == "int":
        for name, v in (("low", low), ("high", high), ("step", step)):
            if v is not None and not float(v).is_integer():
                raise ConfigError(f"{where}: type int needs an integer {name}, got {fmt_value(v)}")
        low, high = int(low), int(high)
        step = int(step) if step is not None else None
    if low > high:
        raise ConfigError(f"{where}: low ({fmt_value(low)}) > high ({fmt_value(high)})")
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs a positive low bound, got low={fmt_value(low)}")
    if log and step is not None and kind == "float":
        raise ConfigError(f"{where}: a float parameter cannot be both log-scaled and stepped (Optuna allows one)")
    if log and kind == "int" and step not in (None, 1):
        raise ConfigError(f"{where}: a log-scaled int parameter must have step 1")
    if step is not None:
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            raise ConfigError(f"{where}: step {fmt_value(step)} does not divide high - low = {fmt_value(high - low)}")
    return Param(key, kind, low=low, high=high, log=log, step=step, when=when)


def parse_space(data: Any, source: str = "<space>", name: str = "space") -> SearchSpace:
    """Check a parsed YAML document and turn it into a :class:`SearchSpace` (one-line ConfigError otherwise)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'params' at the top level")
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{source}: unknown top-level field '{key}'; accepted: {', '.join(TOP_LEVEL)}")
    known = flat_keys()
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{source}: description must be a string")

    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{source}: base must be a mapping with 'preset' and/or 'set'")
    for key in base:
        if key not in BASE_FIELDS:
            raise ConfigError(f"{source}: unknown field 'base.{key}'; accepted: {', '.join(BASE_FIELDS)}")
    preset = base.get("preset")
    if preset is not None and preset not in preset_names():
        raise ConfigError(f"{source}: base.preset: unknown preset '{preset}'; choose one of: "
                          f"{', '.join(preset_names())}")
    base_set = base.get("set") or {}
    if not isinstance(base_set, dict):
        raise ConfigError(f"{source}: base.set must be a mapping of dotted config keys to values")
    for key in base_set:
        _check_key(key, known, f"{source}: base.set")

    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{source}: 'params' must be a non-empty mapping of dotted config keys to distributions")
    all_keys = tuple(str(k) for k in params)
    out: list[Param] = []
    for key, spec in params.items():
        where = f"{source}: params.{key}"
        _check_key(key, known, f"{source}: params")
        if key in base_set:
            raise ConfigError(f"{where}: the key is both searched and fixed in base.set; keep one")
        out.append(_parse_param(key, spec, [p.key for p in out], all_keys, known, where))
    return SearchSpace(name=name, source=source, description=description.strip(), params=tuple(out),
                       base_preset=preset, base_set=dict(base_set))


def describe_space(space: SearchSpace) -> list[tuple[str, str]]:
    return [(p.key, p.describe()) for p in space.params]
