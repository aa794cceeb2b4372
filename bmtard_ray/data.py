"""Datasets as uint8 tensors, a deterministic validation split, and two loaders.

Images are kept as uint8 NCHW tensors: CIFAR-10's 50,000 training images are 150 MB that way, small
enough to live on the GPU for the whole run (airbench style), where cropping and flipping a batch is a few
vectorised kernels instead of a CPU DataLoader. The reference loader reproduces the released code's
pipeline (torchvision transforms in DataLoader workers) so the two can be timed side by side.

CIFAR batches are read with pickle + numpy directly: torchvision's CIFAR10 checks the md5 of the official
archive and rejects the offline copy built by ``../shared/data/build_cifar10.py``.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bmtard_ray.errors import ConfigError, DataError

DATASET_NAMES = ("cifar10", "cifar100", "tiny-imagenet")


@dataclass(frozen=True)
class Split:
    images: Tensor  # uint8 (N, 3, H, W)
    labels: Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Tensor) -> "Split":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return Split(self.images[indices].contiguous(), self.labels[indices].contiguous())


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


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


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as exc:  # truncated or not a pickle at all
        raise DataError(f"{path} is corrupt or not a CIFAR batch file ({type(exc).__name__})") from exc


def _cifar_arrays(files: list[Path], label_key: str, num_classes: int) -> Split:
    images, labels = [], []
    for path in files:
        d = _unpickle(path)
        if "data" not in d or label_key not in d:
            raise DataError(f"{path} has no '{label_key}'/'data' entries: not a CIFAR batch file")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != len(d[label_key]):
            raise DataError(f"{path}: expected data of shape (N, 3072) with N labels, got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are the R, G, B planes, each 32x32 row-major
        labels.append(np.asarray(d[label_key], dtype=np.int64))
    y = np.concatenate(labels)
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"labels out of range [0, {num_classes}) in {files[0].parent}")
    return Split(torch.from_numpy(np.concatenate(images)).contiguous(), torch.from_numpy(y))


def _need_folder(folder: Path, name: str, root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; for CIFAR-10 offline build it with: "
                        f"python ../shared/data/build_cifar10.py --out {root} (or pass --set data.download=true)")
    if not folder.is_dir():
        raise DataError(f"{folder} not found: expected the standard {name} folder under {root} "
                        f"(CIFAR-10 offline: python ../shared/data/build_cifar10.py --out {root})")


def _download(name: str, root: Path) -> None:
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}.get(name)
    if cls is None:
        raise DataError(f"{name} cannot be downloaded automatically; put it under {root}")
    try:
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except Exception as exc:
        raise DataError(f"downloading {name} into {root} failed ({type(exc).__name__}: {exc})") from exc


def _tiny_imagenet(root: Path) -> tuple[Split, Split]:
    from PIL import Image

    base = root / "tiny-imagenet-200"
    _need_folder(base, "tiny-imagenet-200", root)
    wnids_file = base / "wnids.txt"
    if not wnids_file.is_file():
        raise DataError(f"missing {wnids_file}")
    wnids = sorted(w.strip() for w in wnids_file.read_text().split() if w.strip())  # ImageFolder order
    index = {w: i for i, w in enumerate(wnids)}

    def load(paths: list[tuple[Path, int]]) -> Split:
        imgs = np.empty((len(paths), 3, 64, 64), dtype=np.uint8)
        for i, (p, _) in enumerate(paths):
            try:
                with Image.open(p) as im:
                    imgs[i] = np.asarray(im.convert("RGB").resize((64, 64))).transpose(2, 0, 1)
            except Exception as exc:
                raise DataError(f"cannot decode image {p} ({type(exc).__name__})") from exc
        return Split(torch.from_numpy(imgs), torch.tensor([c for _, c in paths], dtype=torch.int64))

    train = [(p, index[w]) for w in wnids for p in sorted((base / "train" / w / "images").glob("*.JPEG"))]
    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataError(f"missing {ann}")
    val = []
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in index:
            val.append((base / "val" / "images" / parts[0], index[parts[1]]))
    if not train or not val:
        raise DataError(f"{base} holds no images in the standard layout (train/<wnid>/images/*.JPEG, val/images)")
    return load(train), load(val)


def load_dataset(name: str, root: str | os.PathLike, *, download: bool = False) -> tuple[Split, Split, DatasetInfo]:
    """(train, test, info) for ``name`` from its standard folder under ``root``."""
    info = dataset_info(name)
    root = Path(root)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        if download and not folder.is_dir():
            _download(name, root)
        _need_folder(folder, "cifar-10-batches-py", root)
        train = _cifar_arrays([folder / f"data_batch_{i}" for i in range(1, 6)], "labels", 10)
        test = _cifar_arrays([folder / "test_batch"], "labels", 10)
    elif name == "cifar100":
        folder = root / "cifar-100-python"
        if download and not folder.is_dir():
            _download(name, root)
        _need_folder(folder, "cifar-100-python", root)
        train = _cifar_arrays([folder / "train"], "fine_labels", 100)
        test = _cifar_arrays([folder / "test"], "fine_labels", 100)
    else:
        train, test = _tiny_imagenet(root)
    return train, test, info


# ---------------------------------------------------------------------------------------------------------
# Splits


def _stratified_indices(labels: Tensor, n: int, seed: int) -> Tensor:
    """``n`` indices with (as far as possible) equal counts per class, chosen by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    classes = labels.unique()
    per_class = [perm[labels[perm] == c] for c in classes]
    base, extra = divmod(n, len(classes))
    chosen = []
    for i, idx in enumerate(per_class):
        want = base + (1 if i < extra else 0)
        chosen.append(idx[:want])
    out = torch.cat(chosen)
    if len(out) < n:  # some class too small: top up from the rest in permutation order
        rest = perm[~torch.isin(perm, out)]
        out = torch.cat([out, rest[: n - len(out)]])
    return out.sort().values


def stratified_subset(split: Split, n: int, seed: int) -> Split:
    if n >= len(split):
        return split
    return split.subset(_stratified_indices(split.labels, n, seed))


def train_val_split(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Carve a stratified validation split from the training set (tuning never touches the test set)."""
    if val_size < 0 or val_size >= len(train):
        raise ConfigError(f"val_size must be in [0, {len(train)}), got {val_size}")
    if val_size == 0:
        return train, Split(train.images[:0], train.labels[:0])
    val_idx = _stratified_indices(train.labels, val_size, seed)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    return train.subset(keep.nonzero().squeeze(1)), train.subset(val_idx)


# ---------------------------------------------------------------------------------------------------------
# Loaders


def augment_batch(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, vectorised over the batch."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device)
    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h)).to(x.device)   # (n, h)
    cols = torch.arange(w, device=x.device).view(1, w).expand(n, w)
    cols = torch.where(flip.to(x.device).view(n, 1), w - 1 - cols, cols) + dx.to(x.device).view(n, 1)  # (n, w)
    idx_r = rows.view(n, 1, h, 1).expand(n, c, h, w)
    idx_c = cols.view(n, 1, 1, w).expand(n, c, h, w)
    # Advanced indexing picks, for every image, its own window of the padded batch (flipped if drawn).
    return padded[torch.arange(n, device=x.device).view(n, 1, 1, 1), torch.arange(c, device=x.device).view(1, c, 1, 1),
                  idx_r, idx_c]


class BatchLoader:
    """Batches from a split held on ``device`` as uint8; shuffled and augmented there.

    The permutation of an epoch comes from a generator seeded with (seed, epoch), identical on every rank;
    rank r takes every world_size-th index of it, so the ranks together see the global epoch once.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool, augment: bool,
                 device: torch.device | str = "cpu", seed: int = 0, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.channels_last = channels_last
        self.epoch = 0
        per_rank = len(split) // world_size if drop_last else -(-len(split) // world_size)
        self.per_rank = per_rank
        self.num_batches = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
        self.num_examples = self.num_batches * batch_size if drop_last else per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _indices(self) -> Tensor:
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        total = self.per_rank * self.world_size
        if total > n:  # pad by wrap-around so every rank gets the same count
            perm = torch.cat([perm, perm[: total - n]])
        return perm[:total][self.rank::self.world_size].to(self.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self._indices()
        gen = None
        if self.augment:
            gen = torch.Generator(device=self.device).manual_seed(
                (self.seed * 1_000_003 + self.epoch) * 1009 + self.rank + 1)
        for b in range(self.num_batches):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[sel]
            if self.augment:
                x = augment_batch(x, gen)
            x = x.float().div_(255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[sel]


class _TorchDataset(torch.utils.data.Dataset):
    def __init__(self, split: Split, augment: bool) -> None:
        import torchvision.transforms as T
        from PIL import Image

        self.split, self.Image = split, Image
        size = split.images.shape[-1]
        ops = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if augment else []
        self.transform = T.Compose(ops + [T.ToTensor()])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = self.Image.fromarray(self.split.images[i].permute(1, 2, 0).numpy())
        return self.transform(img), int(self.split.labels[i])


def make_reference_loader(split: Split, batch_size: int, *, shuffle: bool, augment: bool, num_workers: int,
                          seed: int = 0) -> torch.utils.data.DataLoader:
    """The released code's pipeline: PIL + torchvision transforms in DataLoader worker processes."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(_TorchDataset(split, augment), batch_size=batch_size, shuffle=shuffle,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                       drop_last=True, generator=g, persistent_workers=num_workers > 0)
