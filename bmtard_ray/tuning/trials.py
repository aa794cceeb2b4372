"""From a trial's sampled values to its RunConfig: conditional parameters, clipping, validation; and the check
of every corner of a space before the search starts. Pure Python (no ray, no optuna)."""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping
from typing import Any

from bmtard_ray.config import RunConfig, flat_keys, replace, validate
from bmtard_ray.errors import ConfigError
from bmtard_ray.tuning.space import SearchSpace, fmt_value

# Above this many corners, check each parameter's extremes plus a seeded random sample of corners.
MAX_CORNERS = 4096


# (value key, lower-bound key, upper-bound key): the numeric interactions that are repaired by clipping.
CLIP_RULES = (("ebb.tau_adv_init", "ebb.tau_min", "ebb.tau_max"),
              ("ebb.tau_nat_init", "ebb.tau_min", "ebb.tau_max"))


def repair(cfg: RunConfig, sampled: Mapping[str, Any]) -> tuple[RunConfig, dict[str, tuple[Any, Any]]]:
    """Clip values that depend on other sampled values (see bmtard_ray.tuning.space's docstring).

    Only rules touching a sampled key apply, so a base config the user wrote is never silently changed.
    Returns the repaired config and ``{key: (sampled, effective)}`` for every clipped value.
    """
    values = flat_keys(cfg)
    changes: dict[str, Any] = {}
    clipped: dict[str, tuple[Any, Any]] = {}
    for key, lo_key, hi_key in CLIP_RULES:
        if not {key, lo_key, hi_key} & set(sampled):
            continue
        v, lo, hi = values[key], values[lo_key], values[hi_key]
        if lo <= hi and not lo <= v <= hi:  # lo > hi cannot be repaired: validate() reports it
            changes[key] = min(max(v, lo), hi)
            clipped[key] = (v, changes[key])
    return (replace(cfg, **changes) if changes else cfg), clipped


def active_values(space: SearchSpace, base: RunConfig, sampled: Mapping[str, Any]) -> dict[str, Any]:
    """The sampled values whose ``when`` holds, evaluated in file order (as the sampler does)."""
    values = flat_keys(base)
    out: dict[str, Any] = {}
    for p in space.params:
        if p.key in sampled and p.active(values):
            out[p.key] = sampled[p.key]
            values[p.key] = sampled[p.key]
    return out


def trial_config(base: RunConfig, space: SearchSpace, sampled: Mapping[str, Any]) -> tuple[RunConfig, dict[str, Any]]:
    """Apply a trial's sampled values to ``base``, repair, validate; returns (config, effective values)."""
    unknown = set(sampled) - set(space.keys)
    if unknown:
        raise ConfigError(f"{space.source}: trial values for keys the space does not search: "
                          f"{', '.join(sorted(unknown))}")
    values = active_values(space, base, sampled)
    try:
        cfg = replace(base, **values)
        cfg, _ = repair(cfg, values)
        validate(cfg)
    except ConfigError as exc:
        shown = ", ".join(f"{k}={fmt_value(v)}" for k, v in values.items())
        raise ConfigError(f"{space.source}: trial values {{{shown}}} give an invalid config: {exc}") from None
    effective = flat_keys(cfg)
    return cfg, {k: effective[k] for k in values}


def corners(space: SearchSpace, limit: int = MAX_CORNERS, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Every combination of each parameter's extremes, or (if there are more than ``limit``) each
    parameter's extremes one at a time plus a seeded random sample of combinations."""
    axes = [p.extremes() for p in space.params]
    total = math.prod(len(a) for a in axes)
    keys = space.keys
    if total <= limit:
        for combo in itertools.product(*axes):
            yield dict(zip(keys, combo, strict=False))
        return
    middle = {p.key: p.extremes()[0] for p in space.params}
    for p in space.params:
        for v in p.extremes():
            yield middle | {p.key: v}
    rng = random.Random(seed)
    for _ in range(limit):
        yield {k: rng.choice(a) for k, a in zip(keys, axes, strict=False)}


def check_space(space: SearchSpace, base: RunConfig) -> int:
    """Validate every corner of the space on top of ``base``; returns how many were checked.

    The constraints of ``validate`` are box- or monotone-shaped in each key, so a space whose corners are
    all valid (after clipping) produces only valid trials; the trainable validates its config again anyway.
    """
    n = 0
    for corner in corners(space):
        trial_config(base, space, corner)
        n += 1
    return n


def base_values(cfg: RunConfig, space: SearchSpace) -> dict[str, Any]:
    """The base config's values for the keys that ``when`` conditions read (for the define-by-run sampler)."""
    flat = flat_keys(cfg)
    needed = {k for p in space.params for k, _ in p.when}
    return {k: flat[k] for k in needed if k in flat}


def trial_methods(space: SearchSpace, cfg: RunConfig) -> list[str]:
    """Every method a trial can run: the base one, or the choices when the space searches method.name."""
    if "method.name" in space.keys:
        return list(space.param("method.name").choices)
    return [cfg.method.name]
