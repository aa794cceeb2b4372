"""How many Ray Train workers a run gets and what each one reserves (``--workers``, ``--ray-config``)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
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


@dataclass
class ScalingOptions:
    """How many workers and what each gets. ``None`` means decided against the cluster:
    ``cpus_per_worker`` = the cluster's CPUs shared out over the workers (at least 1; it is also the worker's
    torch thread count), ``gpus_per_worker`` = 1 if the cluster has GPUs and the config's device is not
    ``cpu``, else 0 (CPU workers, gloo). ``placement_strategy`` is Ray's placement-group strategy for the
    workers: PACK fills a node before the next (fast collectives), SPREAD puts them on distinct nodes where
    it can; the STRICT_ forms fail to schedule rather than fall back."""
    num_workers: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    placement_strategy: str = "PACK"

    def validate(self) -> ScalingOptions:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ConfigError(f"number of workers must be an integer >= 1, got {self.num_workers}")
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
            share = sum(r.get("CPU", 0.0) for r in res) // self.num_workers
            cpus = float(max(1.0, min(share, max((r.get("CPU", 0.0) for r in res), default=1.0))))
        gpus = self.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if cfg.device != "cpu" and (cluster_gpus or 0) > 0 else 0.0
        if cfg.device == "cuda" and gpus == 0:
            raise ConfigError("device 'cuda' needs GPU workers: pass --gpus-per-worker 1 (or --device cpu)")
        if cfg.device == "cpu" and gpus > 0:
            raise ConfigError("device 'cpu' with GPU workers: drop --gpus-per-worker or use --device auto")
        return ScalingOptions(self.num_workers, cpus, gpus, self.placement_strategy)

    def to_ray(self) -> ScalingConfig:
        gpus = self.gpus_per_worker or 0.0
        resources: dict[str, float] = {"CPU": self.cpus_per_worker or 1.0}
        if gpus:
            resources["GPU"] = gpus
        return ScalingConfig(num_workers=self.num_workers, use_gpu=gpus > 0, resources_per_worker=resources,
                             placement_strategy=self.placement_strategy)


def scaling_from_args(args: Any) -> ScalingOptions:
    """ScalingOptions from run_train.py's flags, over an optional ``--ray-config`` YAML file."""
    values: dict[str, Any] = {}
    if getattr(args, "ray_config", None):
        data = read_yaml(args.ray_config)
        names = {f.name for f in fields(ScalingOptions)} | {"placement", "address", "storage_path", "max_failures",
                                                            "keep_checkpoints"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {args.ray_config}; valid keys: "
                              f"{', '.join(sorted(names))}")
        values.update(data)
    for flag, key in (("workers", "num_workers"), ("cpus_per_worker", "cpus_per_worker"),
                      ("gpus_per_worker", "gpus_per_worker"), ("placement", "placement"), ("address", "address"),
                      ("storage_path", "storage_path"), ("max_failures", "max_failures"),
                      ("keep_checkpoints", "keep_checkpoints")):
        if getattr(args, flag, None) is not None:
            values[key] = getattr(args, flag)
    for key in ("placement", "placement_strategy"):
        if key in values:
            values["placement_strategy"] = placement_strategy(values.pop(key))
    args.address = values.pop("address", None)
    args.storage_path = values.pop("storage_path", None)
    args.max_failures = values.pop("max_failures", 2)
    args.keep_checkpoints = values.pop("keep_checkpoints", 2)
    return ScalingOptions(**values).validate()
