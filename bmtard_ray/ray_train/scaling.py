"""How many Ray Train workers a run gets and what each one reserves (``--workers``, ``--ray-config``)."""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from ray.train import ScalingConfig

from bmtard_ray.config import RunConfig, read_yaml
from bmtard_ray.errors import ConfigError

# --placement / ``placement:`` values and the Ray placement strategies they stand for.
PLACEMENTS = {"pack": "PACK", "spread": "SPREAD", "strict_pack": "STRICT_PACK", "strict_spread": "STRICT_SPREAD"}


def placement_strategy(value: str) -> str:
    """Ray's strategy for a ``--placement`` value (case and dashes do not matter: spread, SPREAD, strict-spread)."""
    key = str(value).strip().lower().replace("-", "_")
    if key not in PLACEMENTS:
        raise ConfigError(f"unknown placement '{value}'; choose one of: {', '.join(PLACEMENTS)}")
    return PLACEMENTS[key]


# How long a run waits for its workers to be placed before it ends (--wait-for-workers, seconds).
DEFAULT_WAIT_FOR_WORKERS_S = 300.0


def parse_workers(value: Any) -> int | tuple[int, int]:
    """``--workers`` / ``num_workers``: N (fixed) or an elastic range MIN-MAX ("1-2", [1, 2]), checked."""
    if isinstance(value, bool):
        raise ConfigError(f"number of workers must be N or MIN-MAX, got {value!r}")
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                     for v in value):
        low, high = value
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)):
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) is not None else low
        if m.group(2) is None:
            value = low
    else:
        raise ConfigError(f"number of workers must be N or MIN-MAX (e.g. 4 or 1-4), got {value!r}")
    if low < 1:
        what = "number of workers" if low == high else f"the minimum of the elastic range {low}-{high}"
        raise ConfigError(f"{what} must be an integer >= 1, got {low}")
    if low > high:
        raise ConfigError(f"elastic worker range {low}-{high}: the minimum is above the maximum")
    return value if isinstance(value, int) else (low, high)


@dataclass
class ScalingOptions:
    """How many workers and what each gets. ``None`` means decided against the cluster:
    ``cpus_per_worker`` = the cluster's CPUs shared out over the workers (at least 1; it is also the worker's
    torch thread count), ``gpus_per_worker`` = 1 if the cluster has GPUs and the config's device is not
    ``cpu``, else 0 (CPU workers, gloo). ``placement_strategy`` is Ray's placement-group strategy for the
    workers: PACK fills a node before the next (fast collectives), SPREAD puts them on distinct nodes where
    it can; the STRICT_ forms fail to schedule rather than fall back.

    ``num_workers`` is an int (fixed) or ``(min, max)``: an elastic run (Ray Train V2's elastic scaling)
    that runs with as many workers as fit, between the two, and resizes every ``resize_interval_s``
    (None: Ray's 60 s). ``wait_for_workers_s`` bounds how long a fixed run waits for its workers to be
    placed (at its start and after a failure) before it ends with an error."""
    num_workers: int | tuple[int, int] = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    placement_strategy: str = "PACK"
    resize_interval_s: float | None = None
    wait_for_workers_s: float = DEFAULT_WAIT_FOR_WORKERS_S

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    def describe(self) -> str:
        """The worker count for the start line: "2" or "1-2 (elastic, resize check every 60 s)"."""
        if not self.elastic:
            return str(self.num_workers)
        every = 60.0 if self.resize_interval_s is None else self.resize_interval_s
        return f"{self.min_workers}-{self.max_workers} (elastic, resize check every {every:g} s)"

    def validate(self) -> ScalingOptions:
        self.num_workers = parse_workers(self.num_workers)
        for name, value in (("resize interval", self.resize_interval_s), ("wait for workers", self.wait_for_workers_s)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.resize_interval_s is not None and not self.elastic:
            raise ConfigError(f"a resize interval applies to an elastic range of workers (--workers MIN-MAX), not "
                              f"to a fixed {self.num_workers}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ConfigError(f"cpus per worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"gpus per worker must be >= 0 (0 = CPU workers), got {self.gpus_per_worker}")
        if self.placement_strategy not in PLACEMENTS.values():
            raise ConfigError(f"unknown placement '{self.placement_strategy}'; choose one of: {', '.join(PLACEMENTS)}")
        return self

    def resolved(self, cfg: RunConfig, nodes: Sequence[dict[str, Any]] = ()) -> ScalingOptions:
        """Fix the automatic fields against the config's device and the cluster's alive ``nodes``
        (``ray.nodes()``)."""
        self.validate()
        res = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
        cluster_gpus = sum(r.get("GPU", 0.0) for r in res)
        cpus = self.cpus_per_worker
        if cpus is None:
            # An elastic run shares the CPUs over its *maximum*: then all max workers fit on the whole cluster
            # (shared over the minimum, the workers would be so big that the run could never grow past it).
            share = sum(r.get("CPU", 0.0) for r in res) // self.max_workers
            cpus = float(max(1.0, min(share, max((r.get("CPU", 0.0) for r in res), default=1.0))))
        gpus = self.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if cfg.device != "cpu" and (cluster_gpus or 0) > 0 else 0.0
        if cfg.device == "cuda" and gpus == 0:
            raise ConfigError("device 'cuda' needs GPU workers: pass --gpus-per-worker 1 (or --device cpu)")
        if cfg.device == "cpu" and gpus > 0:
            raise ConfigError("device 'cpu' with GPU workers: drop --gpus-per-worker or use --device auto")
        return replace(self, cpus_per_worker=cpus, gpus_per_worker=gpus)

    def to_ray(self) -> ScalingConfig:
        gpus = self.gpus_per_worker or 0.0
        resources: dict[str, float] = {"CPU": self.cpus_per_worker or 1.0}
        if gpus:
            resources["GPU"] = gpus
        elastic = ({} if self.resize_interval_s is None
                   else {"elastic_resize_monitor_interval_s": self.resize_interval_s})
        return ScalingConfig(num_workers=self.num_workers, use_gpu=gpus > 0, resources_per_worker=resources,
                             placement_strategy=self.placement_strategy, **elastic)


@dataclass
class RayRunOptions:
    """How a Ray Train run is placed and kept alive: its workers, the cluster, the run folder's parent and
    its budgets (``run_train.py``'s Ray flags over an optional ``--ray-config`` YAML file)."""
    scaling: ScalingOptions
    address: str | None = None
    storage_path: str | None = None
    max_failures: int = 2
    keep_checkpoints: int = 2


# Flags (run_train.py's argparse names) -> keys of a --ray-config file.
RAY_FLAG_KEYS = {"workers": "num_workers", "cpus_per_worker": "cpus_per_worker", "gpus_per_worker": "gpus_per_worker",
                 "placement": "placement", "address": "address", "storage_path": "storage_path",
                 "max_failures": "max_failures", "keep_checkpoints": "keep_checkpoints",
                 "resize_interval": "resize_interval_s", "wait_for_workers": "wait_for_workers_s"}


def ray_run_options(flags: dict[str, Any], ray_config: str | None = None) -> RayRunOptions:
    """The options of a Ray run: ``flags`` (flag name -> value; None = not given, see :data:`RAY_FLAG_KEYS`)
    over the file ``ray_config``."""
    values: dict[str, Any] = {}
    if ray_config:
        data = read_yaml(ray_config)
        names = {f.name for f in fields(ScalingOptions)} | {"placement", "address", "storage_path", "max_failures",
                                                            "keep_checkpoints"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {ray_config}; valid keys: "
                              f"{', '.join(sorted(names))}")
        values.update(data)
    for flag, key in RAY_FLAG_KEYS.items():
        if flags.get(flag) is not None:
            values[key] = flags[flag]
    for key in ("placement", "placement_strategy"):
        if key in values:
            values["placement_strategy"] = placement_strategy(values.pop(key))
    address, storage_path = values.pop("address", None), values.pop("storage_path", None)
    max_failures, keep = values.pop("max_failures", 2), values.pop("keep_checkpoints", 2)
    return RayRunOptions(ScalingOptions(**values).validate(), address=address, storage_path=storage_path,
                         max_failures=max_failures, keep_checkpoints=keep)
