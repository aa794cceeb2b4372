"""Datasets as uint8 tensors, a deterministic stratified validation split, and two loaders.

Images are kept as uint8 NCHW tensors: CIFAR-10's 50,000 training images are 150 MB that way, small
enough to live on the GPU for the whole run (airbench style), where cropping and flipping a batch is a few
vectorised kernels instead of a CPU DataLoader. The reference loader reproduces the released code's
pipeline (PIL + torchvision transforms in DataLoader workers) so that the two can be timed side by side.

CIFAR batches are read with pickle + numpy directly: torchvision's CIFAR10 checks the md5 of the official
archive and rejects the offline copy built by ``../shared/data/build_cifar10.py``.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

# augment_batch and crop_params are re-exported: the augmentation was part of this module before.
from bmtard_ray.augment import CROP_PADDING, augment_batch, crop_flip, crop_params, epoch_crop_params  # noqa: F401
from bmtard_ray.config import RunConfig
from bmtard_ray.dist import shard_range
from bmtard_ray.errors import ConfigError, DataError
from bmtard_ray.names import DATASET_NAMES


@dataclass(frozen=True)
class Split:
    """Images and labels of one split: uint8 (N, 3, H, W) and int64 (N,), on any device."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        # Checked once here so that every consumer (loaders, subsets, evaluation) can rely on it.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DataError(f"split images must be uint8 (N, 3, H, W), got {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise DataError(f"split labels must be int64 (N,) with N = {len(self.images)}, got "
                            f"{self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Tensor) -> Split:
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.labels.device)
        return Split(self.images[indices].contiguous(), self.labels[indices].contiguous())


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# The usual per-channel statistics of each training set (used only by models that normalise inside).
_INFO = {
    "cifar10": DatasetInfo("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": DatasetInfo("tiny-imagenet", 200, 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in _INFO:
        raise ConfigError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}")
    return _INFO[name]


# ---------------------------------------------------------------------------------------------------------
# Readers

_CIFAR10_HINT = ("build the offline copy with: python ../shared/data/build_cifar10.py --out {root} "
                 "(or pass --set data.download=true when online)")
_HINTS = {
    "cifar10": _CIFAR10_HINT,
    "cifar100": "pass --set data.download=true when online, or put the official cifar-100-python/ there",
    "tiny-imagenet": "unzip tiny-imagenet-200 there (a subset for smoke tests: ../shared/data/tiny_imagenet_subset.zip)",
}
_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "tiny-imagenet": "tiny-imagenet-200"}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _hint(name: str, root: Path) -> str:
    return _HINTS[name].format(root=root)


def _unpickle(path: Path, name: str, root: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"missing batch file {path}; expected the standard {_FOLDERS[name]}/ folder; "
                        f"{_hint(name, root)}")
    try:
        with open(path, "rb") as f:
            # latin1: the official files are Python-2 pickles whose str keys/values must come back as str.
            d = pickle.load(f, encoding="latin1")
    except Exception as exc:  # truncated, or not a pickle at all
        raise DataError(f"{path} is corrupt or truncated, not a CIFAR batch pickle ({_one_line(exc)}); "
                        f"{_hint(name, root)}") from exc
    if not isinstance(d, dict):
        raise DataError(f"{path} holds a {type(d).__name__}, expected a CIFAR batch dict")
    return d


def _read_cifar(files: list[Path], label_key: str, num_classes: int, name: str, root: Path) -> Split:
    images, labels = [], []
    for path in files:
        d = _unpickle(path, name, root)
        if "data" not in d or label_key not in d:
            raise DataError(f"{path} has no 'data'/'{label_key}' entries: not a {name} batch file")
        data = d["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: expected 'data' as a uint8 array of shape (N, 3072), got {got}")
        try:
            y = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: '{label_key}' is not a list of integers ({_one_line(exc)})") from exc
        if len(y) != len(data):
            raise DataError(f"{path}: {len(data)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{path}: labels out of range, expected 0..{num_classes - 1}, "
                            f"got {int(y.min())}..{int(y.max())}")
        images.append(data.reshape(-1, 3, 32, 32))  # each row is the R, G, then B plane, 32x32 row-major
        labels.append(y)
    x = np.concatenate(images)
    if len(x) == 0:
        raise DataError(f"{files[0].parent} holds no images")
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.concatenate(labels)))


def dataset_folder(name: str, root: Path) -> Path:
    return Path(root) / _FOLDERS[name]  # the standard archive folder of ``name`` under ``root``


def _need_folder(name: str, root: Path) -> Path:
    folder = root / _FOLDERS[name]
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; {_hint(name, root)}")
    if not folder.is_dir():
        raise DataError(f"{folder} not found: expected the standard {_FOLDERS[name]}/ folder under {root}; "
                        f"{_hint(name, root)}")
    return folder


def _download(name: str, root: Path) -> None:
    """Fetch the official archive with torchvision (online users only); our reader then reads it."""
    if name == "tiny-imagenet":
        raise DataError(f"tiny-imagenet cannot be downloaded automatically; {_hint(name, root)}")
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:
        raise DataError(f"downloading {name} into {root} failed ({_one_line(exc)})") from exc


def _decode_images(paths: list[Path], size: int) -> Tensor:
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))  # about 2% of Tiny-ImageNet is greyscale
        except Exception as exc:
            raise DataError(f"cannot decode image {p} ({_one_line(exc)})") from exc
        if arr.shape != (size, size, 3):
            raise DataError(f"{p} is {arr.shape[1]}x{arr.shape[0]}, expected {size}x{size}")
        out[i] = arr
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


def _read_tiny_imagenet(root: Path) -> tuple[Split, Split]:
    """Train and val (used as the test split: Tiny-ImageNet's test labels are not public)."""
    base = _need_folder("tiny-imagenet", root)
    wnids_file = base / "wnids.txt"
    if not wnids_file.is_file():
        raise DataError(f"missing {wnids_file} (one wnid per line); {_hint('tiny-imagenet', root)}")
    wnids = sorted(set(wnids_file.read_text().split()))  # sorted: the class order ImageFolder uses
    if len(wnids) != 200:
        raise DataError(f"{wnids_file} lists {len(wnids)} distinct wnids, expected 200")
    index = {w: i for i, w in enumerate(wnids)}

    train: list[tuple[Path, int]] = []
    for w in wnids:
        folder = base / "train" / w / "images"
        files = sorted(folder.glob("*.JPEG"))
        if not files:
            raise DataError(f"{folder} holds no *.JPEG images; expected train/<wnid>/images/*.JPEG for every wnid")
        train += [(p, index[w]) for p in files]

    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataError(f"missing {ann}; expected val/images/*.JPEG and val/val_annotations.txt")
    val: list[tuple[Path, int]] = []
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        parts = line.split("\t")
        if not line.strip():
            continue
        if len(parts) < 2 or parts[1] not in index:
            raise DataError(f"{ann}:{lineno}: expected '<file>\\t<wnid>...' with a wnid from wnids.txt")
        val.append((base / "val" / "images" / parts[0], index[parts[1]]))
    if not val:
        raise DataError(f"{ann} lists no images")

    def split(items: list[tuple[Path, int]]) -> Split:
        return Split(_decode_images([p for p, _ in items], 64), torch.tensor([c for _, c in items], dtype=torch.int64))

    return split(train), split(val)


def load_dataset(name: str, root: str | os.PathLike, *, download: bool = False) -> tuple[Split, Split, DatasetInfo]:
    """(train, test, info) for ``name`` from its standard folder under ``root`` (images as uint8 NCHW)."""
    info = dataset_info(name)
    root = Path(root)
    if download and not (root / _FOLDERS[name]).is_dir():
        # Only when absent: torchvision would otherwise replace an offline copy whose md5s differ.
        _download(name, root)
    folder = _need_folder(name, root)
    if name == "cifar10":
        train = _read_cifar([folder / f"data_batch_{i}" for i in range(1, 6)], "labels", 10, name, root)
        test = _read_cifar([folder / "test_batch"], "labels", 10, name, root)
    elif name == "cifar100":
        train = _read_cifar([folder / "train"], "fine_labels", 100, name, root)
        test = _read_cifar([folder / "test"], "fine_labels", 100, name, root)
    else:
        train, test = _read_tiny_imagenet(root)
    return train, test, info


# ---------------------------------------------------------------------------------------------------------
# Splits


def _balanced_quota(counts: Tensor, n: int, order: Tensor) -> Tensor:
    """How many of each class to take: ``n`` in all, as equal as the class sizes allow (water filling).

    Classes too small for their share give it up to the others; the last few that cannot be split evenly
    go to classes in ``order`` (a seeded permutation, so no class is always favoured).
    """
    quota = torch.zeros_like(counts)
    remaining = n
    while remaining > 0:
        open_ = (quota < counts).nonzero().squeeze(1)
        share = remaining // len(open_)
        if share == 0:
            ranked = order[torch.isin(order, open_)]
            quota[ranked[:remaining]] += 1
            break
        add = torch.minimum(counts[open_] - quota[open_], torch.tensor(share))
        quota[open_] += add
        remaining -= int(add.sum())
    return quota


def _stratified_indices(labels: Tensor, n: int, seed: int) -> Tensor:
    """``n`` sorted indices with (as far as possible) equal counts per class, picked by a seeded permutation."""
    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    # Group the permutation by class while keeping its random order inside each class.
    by_class = perm[torch.argsort(labels[perm], stable=True)]
    _, counts = torch.unique_consecutive(labels[by_class], return_counts=True)
    quota = _balanced_quota(counts, n, torch.randperm(len(counts), generator=g))
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(len(labels)) - torch.repeat_interleave(starts, counts)
    return by_class[rank_in_class < torch.repeat_interleave(quota, counts)].sort().values


def stratified_subset(split: Split, n: int, seed: int) -> Split:
    """A class-balanced subset of ``n`` examples (the whole split when ``n >= len(split)``)."""
    if n < 0:
        raise ConfigError(f"subset size must be >= 0, got {n}")
    if n >= len(split):
        return split
    return split.subset(_stratified_indices(split.labels, n, seed).to(split.labels.device))


def train_val_split(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """(rest of train, val): a stratified validation split carved from the training set, so that tuning
    never sees the test set. Deterministic for a given seed."""
    if val_size < 0 or val_size >= len(train):
        raise ConfigError(f"val_size must be in [0, {len(train)}) (the training set's size), got {val_size}")
    if val_size == 0:
        return train, train.subset(torch.zeros(0, dtype=torch.long))
    val_idx = _stratified_indices(train.labels, val_size, seed)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    dev = train.labels.device
    return train.subset(keep.nonzero().squeeze(1).to(dev)), train.subset(val_idx.to(dev))


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps): (seed, epoch) pairs never collide the way
    ``seed * K + epoch`` does, and nearby inputs give unrelated streams."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF


# ---------------------------------------------------------------------------------------------------------
# Loaders


class BatchLoader:
    """Batches ``(x, y)`` from a split held on ``device`` as uint8, shuffled and augmented there.

    ``x`` is ``dtype`` (float32 by default) in [0, 1], NCHW (channels_last memory format on request); ``y``
    is int64. ``batch_size`` is the GLOBAL batch. What global batch k of an epoch holds does not depend on
    the world size: the epoch's permutation comes from a CPU generator seeded with (seed, epoch) and its
    crops and flips are drawn per global batch from another seeded with (seed, epoch); rank r then takes
    its contiguous slice of every global batch (:func:`~bmtard_ray.dist.shard_range`: the remainder of an
    uneven split goes to the lowest ranks). So 1, 2 or 3 workers see the same images, augmented alike,
    and a run can change its world size between checkpoints (elastic runs) without changing its data.
    With ``drop_last`` the tail that does not fill a global batch is dropped; otherwise the last global
    batch is short (and split by the same rule).
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool, augment: bool,
                 device: torch.device | str = "cpu", seed: int = 0, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False, dtype: torch.dtype = torch.float32) -> None:
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
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.channels_last, self.dtype = channels_last, dtype
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
        order = self.order().to(self.device)
        bs = self.batch_size
        crops = None
        if self.augment:
            # Per epoch and global batch, from a CPU generator: the same crops for every world size and on
            # the CPU and a GPU. (The mix keeps the stream rank 0 drew before batches became global, so a
            # 1-worker run computes what it computed then.)
            gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, 0, 1))
            crops = epoch_crop_params(gen, [self.global_size(k) for k in range(self.num_batches)], self.device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for k in range(self.start_batch, self.num_batches):
            a, b = self.batch_rows(k)
            sel = order[k * bs + a:k * bs + b]
            x = self.images[sel]
            if crops is not None:  # on uint8: a quarter of the bytes a float crop would move
                dx, dy, flip = crops[:, k * bs + a:k * bs + b]
                x = crop_flip(x, dx, dy, flip.bool())
            x = x.to(dtype=self.dtype, memory_format=memory_format).div_(255)
            yield x, self.labels[sel]
        self.start_batch = 0  # a restored epoch starts mid-way once


class _ReferenceDataset(torch.utils.data.Dataset):
    """PIL images through torchvision transforms, one example at a time, as the released code does."""

    def __init__(self, split: Split, augment: bool) -> None:
        import torchvision.transforms as T

        # HWC numpy once, so that a worker's __getitem__ is just PIL + the transforms.
        self.images = np.ascontiguousarray(split.images.cpu().permute(0, 2, 3, 1).numpy())
        self.labels = split.labels.cpu().numpy()
        size = self.images.shape[1]
        ops = [T.RandomCrop(size, padding=CROP_PADDING), T.RandomHorizontalFlip()] if augment else []
        self.transform = T.Compose(ops + [T.ToTensor()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class _ShardedLoader(torch.utils.data.DataLoader):
    """Over a DistributedSampler; the loop sets its epoch (as for BatchLoader): all ranks reshuffle alike."""
    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)  # type: ignore[union-attr]


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
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                  drop_last=drop, generator=g, persistent_workers=num_workers > 0)
    if world_size == 1:
        return torch.utils.data.DataLoader(dataset, shuffle=shuffle, **common)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                                  seed=seed, drop_last=drop)
    return _ShardedLoader(dataset, sampler=sampler, **common)


# ---------------------------------------------------------------------------------------------------------
# A run's data: the splits a configuration trains, validates and tests on.


@dataclass
class DataBundle:
    train: Split
    val: Split
    test: Split
    info: DatasetInfo


def prepare_data(cfg: RunConfig) -> DataBundle:
    """Load the dataset, carve the validation split from the training set, apply the CPU-preset subsets."""
    d = cfg.data
    train, test, info = load_dataset(d.dataset, d.root, download=d.download)
    if d.val_size >= len(train):
        raise ConfigError(f"data.val_size ({d.val_size}) must be smaller than the training set ({len(train)})")
    train, val = train_val_split(train, d.val_size, d.split_seed)
    if d.train_subset is not None and d.train_subset < len(train):
        train = stratified_subset(train, d.train_subset, d.split_seed)
    if d.test_subset is not None and d.test_subset < len(test):
        test = stratified_subset(test, d.test_subset, d.split_seed)
    return DataBundle(train, val, test, info)
