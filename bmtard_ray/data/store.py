"""What a split is: :class:`Split` (images held in memory, or rows of a memory map on disk, and their labels)
and :class:`DatasetInfo` (class count, image size, statistics and class names of a dataset)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bmtard_ray.errors import DataError


class Split:
    """Images and labels of one split: images uint8 (N, 3, H, W), labels int64 (N,).

    Resident (``Split(images, labels)``): the images are a tensor, on any device. Streamed
    (:meth:`Split.streamed`): they are rows ``rows`` of a uint8 (M, 3, H, W) memory map on disk, and only the
    rows a batch asks for are ever read (:meth:`read`); :meth:`subset` composes the row index, so carving a
    validation split, a stratified subset or a rank's shard copies no image. Labels are always in memory.
    Consumers read batches with :meth:`read` / :meth:`read_range`, which work for both; ``images`` exists only
    for resident splits (a streamed split refuses it rather than copying itself into memory).
    """

    __slots__ = ("_images", "labels", "store", "rows")

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        # Checked once here so that every consumer (loaders, subsets, evaluation) can rely on it.
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise DataError(f"split images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        _check_labels(labels, len(images))
        self._images: Tensor | None = images
        self.labels = labels
        self.store: np.ndarray | None = None
        self.rows: Tensor | None = None

    @classmethod
    def streamed(cls, store: np.ndarray, labels: Tensor, rows: Tensor | None = None) -> Split:
        """Rows ``rows`` (default: all) of ``store``, a uint8 (M, 3, H, W) array (a read-only memory map)."""
        if store.dtype != np.uint8 or store.ndim != 4 or store.shape[1] != 3:
            raise DataError(f"split images must be uint8 (N, 3, H, W), got {store.dtype} {tuple(store.shape)}")
        rows = torch.arange(len(store)) if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()
        _check_labels(labels, len(rows))
        out = cls.__new__(cls)
        out._images, out.labels, out.store, out.rows = None, labels, store, rows
        return out

    @property
    def is_streamed(self) -> bool:
        return self.store is not None

    @property
    def images(self) -> Tensor:
        if self._images is None:
            raise DataError("this split streams from disk and is never held whole: read its batches with "
                            "Split.read / Split.read_range")
        return self._images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        shape = self.store.shape if self.store is not None else self.images.shape
        return int(shape[1]), int(shape[2]), int(shape[3])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def read(self, positions: Tensor) -> Tensor:
        """The uint8 images at ``positions`` (indices into this split), in that order: gathered on the images'
        device when resident; read from the memory map (rows in file order, then put back) when streamed."""
        if self.store is None:
            return self.images[positions.to(self.images.device)]
        assert self.rows is not None
        rows = self.rows[positions.cpu()].numpy()
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows),) + self.store.shape[1:], dtype=np.uint8)
        out[order] = self.store[rows[order]]  # ascending rows: the disk reads run forwards
        return torch.from_numpy(out)

    def read_range(self, start: int, stop: int) -> Tensor:
        """Images ``start:stop`` of this split (a view when resident)."""
        if self.store is None:
            return self.images[start:stop]
        return self.read(torch.arange(start, min(stop, len(self))))

    def subset(self, indices: Tensor) -> Split:
        if self.store is not None:
            assert self.rows is not None
            idx = torch.as_tensor(indices, dtype=torch.long).cpu()
            return Split.streamed(self.store, self.labels[idx.to(self.labels.device)].contiguous(), self.rows[idx])
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.labels.device)
        return Split(self.images[indices.to(self.images.device)].contiguous(), self.labels[indices].contiguous())


def _check_labels(labels: Tensor, n: int) -> None:
    if labels.dtype != torch.int64 or labels.dim() != 1 or len(labels) != n:
        raise DataError(f"split labels must be int64 (N,) with N = {n}, got {labels.dtype} {tuple(labels.shape)}")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...] | None = None  # class names where the data has them (imagefolder, npz 'classes')
