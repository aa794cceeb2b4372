"""Two loaders of a training split: the device-resident one every run uses, and the released code's
pipeline (PIL + torchvision transforms in DataLoader workers), kept so that the two can be timed side by side.

The device loader also streams a split too large for memory (a memory-mapped :meth:`Split.streamed`): it then
reads each global batch's rows of this rank from disk (one batch ahead, in a thread) instead of gathering them
on the device, and crops them on the device as before, so both paths give the same batches bit for bit."""
from __future__ import annotations

from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bmtard_ray.data.augment import CROP_PADDING, crop_flip, epoch_crop_params
from bmtard_ray.data.datasets import Split
from bmtard_ray.errors import ConfigError
from bmtard_ray.runtime.dist import shard_range


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps): (seed, epoch) pairs never collide the way
    ``seed * K + epoch`` does, and nearby inputs give unrelated streams."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF


class BatchLoader:
    """Batches ``(x, y)`` from a split held on ``device`` as uint8, shuffled and augmented there.

    ``x`` is ``dtype`` (float32 by default) in [0, 1], NCHW (channels_last memory format on request); ``y``
    is int64. ``batch_size`` is the GLOBAL batch. What global batch k of an epoch holds does not depend on
    the world size: the epoch's permutation comes from a CPU generator seeded with (seed, epoch) and its
    crops and flips are drawn per global batch from another seeded with (seed, epoch); rank r then takes
    its contiguous slice of every global batch (:func:`~bmtard_ray.runtime.dist.shard_range`: the remainder of an
    uneven split goes to the lowest ranks). So 1, 2 or 3 workers see the same images, augmented alike,
    and a run can change its world size between checkpoints (elastic runs) without changing its data.
    A streamed split is read batch by batch (each rank only its own rows, the next batch read while this one
    trains) and copied to the device uint8; a resident one is copied there once. With ``drop_last`` the tail that does not fill a global batch is dropped; otherwise the last global
    batch is short (and split by the same rule).
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool, augment: bool,
                 device: torch.device | str = "cpu", seed: int = 0, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False, dtype: torch.dtype = torch.float32,
                 read_ahead: bool = True) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank} of {world_size}")
        if batch_size < world_size:
            raise ConfigError(f"the global batch ({batch_size}) is smaller than the number of workers ({world_size})")
        if not dtype.is_floating_point:
            raise ConfigError(f"loader dtype must be a floating point type, got {dtype}")
        self.device = torch.device(device)
        # One host-to-device copy for the whole run; every batch afterwards is a gather on the device.
        # (A streamed split stays on disk: see _stream.)
        self.split = split
        self.images = None if split.is_streamed else split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.channels_last, self.dtype, self.read_ahead = channels_last, dtype, read_ahead
        self.epoch = 0
        self.start_batch = 0  # the next epoch's iteration starts at this global batch (a mid-epoch restore)
        n = len(split)
        self.num_batches = n // batch_size if drop_last else -(-n // batch_size)
        self.global_examples = self.num_batches * batch_size if drop_last else n
        self.num_examples = sum(self.batch_rows(k)[1] - self.batch_rows(k)[0] for k in range(self.num_batches))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to iterate next, from global batch ``start_batch`` (a run restored mid-epoch)."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start batch {start_batch} is outside the epoch's {self.num_batches} batches")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_batches

    def global_size(self, k: int) -> int:
        """Rows in global batch ``k`` of an epoch."""
        return min(self.batch_size, self.global_examples - k * self.batch_size)

    def batch_rows(self, k: int) -> tuple[int, int]:
        """This rank's rows ``[start, stop)`` of global batch ``k`` (positions within that batch)."""
        return shard_range(self.global_size(k), self.world_size, self.rank)

    def order(self) -> Tensor:
        """The epoch's global example order (on the CPU), identical on every rank."""
        n = len(self.labels)
        if self.shuffle:
            return torch.randperm(n, generator=torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch)))
        return torch.arange(n)

    def indices(self) -> Tensor:
        """This rank's example indices for the current epoch, in order (on the CPU)."""
        order, bs = self.order(), self.batch_size
        return torch.cat([order[k * bs + a:k * bs + b] for k in range(self.num_batches)
                          for a, b in [self.batch_rows(k)]] or [order[:0]])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        host_order = self.order()
        order = host_order.to(self.device)
        bs = self.batch_size
        crops = None
        if self.augment:
            # Per epoch and global batch, from a CPU generator: the same crops for every world size and on
            # the CPU and a GPU. (The mix keeps the stream rank 0 drew before batches became global, so a
            # 1-worker run computes what it computed then.)
            gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, 0, 1))
            crops = epoch_crop_params(gen, [self.global_size(k) for k in range(self.num_batches)], self.device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        streamed = self._stream(host_order) if self.images is None else None
        try:
            for k in range(self.start_batch, self.num_batches):
                a, b = self.batch_rows(k)
                sel = order[k * bs + a:k * bs + b]
                x = next(streamed) if streamed is not None else self.images[sel]  # type: ignore[index]
                if crops is not None:  # on uint8: a quarter of the bytes a float crop would move
                    dx, dy, flip = crops[:, k * bs + a:k * bs + b]
                    x = crop_flip(x, dx, dy, flip.bool())
                x = x.to(dtype=self.dtype, memory_format=memory_format).div_(255)
                yield x, self.labels[sel]
        finally:
            if streamed is not None:
                streamed.close()  # stops its reader thread
        self.start_batch = 0  # a restored epoch starts mid-way once

    def _stream(self, order: Tensor) -> Generator[Tensor, None, None]:
        """This rank's uint8 rows of each global batch from ``start_batch`` on, read from disk on a thread
        one batch ahead (NumPy's gather from the memory map releases the GIL; ``read_ahead=False``: in this
        thread, when asked) and moved to the device."""
        bs, pin = self.batch_size, self.device.type == "cuda"

        def read(k: int) -> Tensor:
            a, b = self.batch_rows(k)
            x = self.split.read(order[k * bs + a:k * bs + b])
            return x.pin_memory() if pin else x

        if not self.read_ahead:  # read each batch when it is needed (bench/bench_data.py compares the two)
            for k in range(self.start_batch, self.num_batches):
                yield read(k).to(self.device, non_blocking=pin)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bmtard-read")
        try:
            ahead: Future[Tensor] | None = pool.submit(read, self.start_batch) \
                if self.start_batch < self.num_batches else None
            for k in range(self.start_batch, self.num_batches):
                assert ahead is not None
                x = ahead.result()
                ahead = pool.submit(read, k + 1) if k + 1 < self.num_batches else None
                yield x.to(self.device, non_blocking=pin)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class _ReferenceDataset(torch.utils.data.Dataset):
    """PIL images through torchvision transforms, one example at a time, as the released code does."""

    def __init__(self, split: Split, augment: bool) -> None:
        import torchvision.transforms as T

        # HWC numpy once, so that a worker's __getitem__ is just PIL + the transforms (a streamed split is
        # read image by image instead).
        self.split = split
        self.images = None if split.is_streamed else \
            np.ascontiguousarray(split.images.cpu().permute(0, 2, 3, 1).numpy())
        self.labels = split.labels.cpu().numpy()
        size = split.image_shape[1]
        ops = [T.RandomCrop(size, padding=CROP_PADDING), T.RandomHorizontalFlip()] if augment else []
        self.transform = T.Compose(ops + [T.ToTensor()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        image = self.images[i] if self.images is not None else \
            self.split.read(torch.tensor([i]))[0].permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray(image)), int(self.labels[i])


class _ShardedLoader(torch.utils.data.DataLoader):
    """Over a DistributedSampler; the trainer sets its epoch (as for BatchLoader): all ranks reshuffle alike."""
    def set_epoch(self, epoch: int) -> None:
        sampler = self.sampler
        assert isinstance(sampler, torch.utils.data.DistributedSampler)
        sampler.set_epoch(epoch)


def make_reference_loader(split: Split, batch_size: int, *, shuffle: bool, augment: bool, num_workers: int,
                          seed: int = 0, drop_last: bool | None = None, rank: int = 0,
                          world_size: int = 1) -> torch.utils.data.DataLoader:
    """The released code's pipeline: PIL + torchvision transforms in DataLoader worker processes, CPU
    float batches in [0, 1]. ``drop_last`` defaults to ``shuffle`` (training drops the ragged batch like
    the device loader does; evaluation keeps every example). With ``world_size`` > 1 each rank reads only
    its shard (torch's DistributedSampler: every rank draws the same per-epoch permutation from ``seed``
    and takes every world_size-th example), so W ranks together see the epoch once, not W times;
    ``batch_size`` is then the rank's share of the global batch."""
    if batch_size < 1 or num_workers < 0:
        raise ConfigError(f"batch size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank} of {world_size}")
    drop, dataset = shuffle if drop_last is None else drop_last, _ReferenceDataset(split, augment)
    g = torch.Generator().manual_seed(seed + rank)  # the shuffle (W = 1) and the workers' seeds: ranks differ
    common: dict[str, Any] = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                  drop_last=drop, generator=g, persistent_workers=num_workers > 0)
    if world_size == 1:
        return torch.utils.data.DataLoader(dataset, shuffle=shuffle, **common)
    sampler: torch.utils.data.DistributedSampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop)
    return _ShardedLoader(dataset, sampler=sampler, **common)
