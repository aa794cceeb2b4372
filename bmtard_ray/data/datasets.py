"""Datasets as uint8 tensors: CIFAR-10/100 and Tiny ImageNet read from their standard folders.

Images are kept as uint8 NCHW tensors: CIFAR-10's 50,000 training images are 150 MB that way, small
enough to live on the GPU for the whole run (airbench style), where cropping and flipping a batch is a few
vectorised kernels instead of a CPU DataLoader (:mod:`bmtard_ray.data.loaders`).

CIFAR batches are read with pickle + numpy directly: torchvision's CIFAR10 checks the md5 of the official
archive and rejects a copy rebuilt in the same format from other sources (such as the offline, JPEG-based
copy this project is developed with; README, "What the main job does").
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bmtard_ray.data.references import load_reference, scan
from bmtard_ray.data.store import DatasetInfo, Split
from bmtard_ray.errors import ConfigError, DataError
from bmtard_ray.names import DATASET_NAMES, REFERENCE_DATASETS

# The usual per-channel statistics of each training set (used only by models that normalise inside).
_INFO = {
    "cifar10": DatasetInfo("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": DatasetInfo("tiny-imagenet", 200, 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


def dataset_info(name: str) -> DatasetInfo:
    """The table entry of a standard dataset (``imagefolder`` and ``npz`` take theirs from the data:
    :func:`load_dataset`, :func:`num_classes`)."""
    if name in REFERENCE_DATASETS:
        raise ConfigError(f"the classes and image size of dataset '{name}' come from its data: load it first")
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
    "tiny-imagenet": "unzip tiny-imagenet-200 there (a subset for smoke tests: "
                     "../shared/data/tiny_imagenet_subset.zip)",
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
    """The standard archive folder of ``name`` under ``root``; for imagefolder and npz, ``root`` itself."""
    return Path(root) if name in REFERENCE_DATASETS else Path(root) / _FOLDERS[name]


def num_classes(name: str, root: str | os.PathLike, image_size: int | None = None) -> int:
    """The class count of ``name``: from the table, or (imagefolder, npz) from the data's listing and labels."""
    return scan(name, Path(root), image_size).num_classes if name in REFERENCE_DATASETS \
        else dataset_info(name).num_classes


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


def load_dataset(name: str, root: str | os.PathLike, *, download: bool = False, image_size: int | None = None,
                 memory_budget_mb: float | None = None,
                 cache_dir: str | os.PathLike | None = None) -> tuple[Split, Split, DatasetInfo]:
    """(train, test, info) for ``name`` from its standard folder under ``root`` (images as uint8 NCHW); for
    imagefolder and npz, from ``root`` itself (:mod:`bmtard_ray.data.references`: resized to ``image_size``,
    streamed from ``cache_dir`` when larger than ``memory_budget_mb``)."""
    if name in REFERENCE_DATASETS:
        return load_reference(name, root, image_size=image_size, memory_budget_mb=memory_budget_mb,
                              cache_dir=cache_dir)
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
