"""Data-parallel context in plain torch.distributed (Ray Train sets up the process group; the core only
uses it). With no process group every call is the identity, so the same loop runs in-process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def shard_range(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s rows ``[start, stop)`` of a global batch of ``total`` rows: contiguous slices in rank
    order, ``total // world_size`` rows each, and one more for each of the lowest ``total % world_size`` ranks
    (32 rows on 3 ranks: 11, 11, 10). The rule every rank and every world size agrees on."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def local_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """The single-process form of :meth:`DistContext.all_gather_rows`: the rows themselves, all real."""
    return t, torch.ones(t.shape[0], dtype=torch.bool, device=t.device)


class DistContext:
    """Rank, world size and the collectives the trainer needs."""

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, t: Tensor, weight: Tensor | float | None = None) -> Tensor:
        """Mean over ranks of a tensor; asynchronous on GPU (no host sync).

        With ``weight`` (this rank's example count, a scalar or one per row of ``t``), the weighted mean
        ``sum_r w_r t_r / sum_r w_r``: the global-batch mean of per-example means when shards are uneven (a
        plain mean of per-rank means would over-weight the smaller shards)."""
        if self.world_size == 1:
            return t
        if weight is None:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t / self.world_size
        w = torch.as_tensor(weight, dtype=t.dtype, device=t.device)
        w = w.reshape(w.shape + (1,) * (t.dim() - w.dim())).expand_as(t)
        both = torch.stack([t * w, w.clone()])
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        return both[0] / both[1]

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_rows(self, t: Tensor, max_rows: int) -> tuple[Tensor, Tensor]:
        """Every rank's rows of a 2-D tensor, stacked in rank order: ``(world * max_rows, C)`` and a row mask.

        Shards may differ in size (up to ``max_rows``, a bound every rank must pass alike): each rank pads
        its rows to ``max_rows`` and marks the real ones in an extra column, so a single all-gather carries
        rows and counts, and nothing waits on the host (no size exchange, no ``.item()``).
        """
        if self.world_size == 1:
            return local_rows(t)
        n = t.shape[0]
        if n > max_rows:
            raise ValueError(f"a shard of {n} rows exceeds the gather bound of {max_rows} rows")
        buf = t.new_zeros((max_rows, t.shape[1] + 1))
        buf[:n, :-1] = t
        buf[:n, -1] = 1
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(parts, buf)
        rows = torch.cat(parts)
        return rows[:, :-1], rows[:, -1] > 0.5

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP around the student only (teachers stay unwrapped and frozen)."""
        if self.world_size == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
