"""Data-parallel context in plain torch.distributed (Ray Train sets up the process group; the core only
uses it). With no process group every call is the identity, so the same loop runs in-process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class DistContext:
    """Rank, world size and the three collectives the loop needs."""

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        """Mean over ranks of a tensor; asynchronous on GPU (no host sync)."""
        if self.world_size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world_size

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP around the student only (teachers stay unwrapped and frozen)."""
        if self.world_size == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
