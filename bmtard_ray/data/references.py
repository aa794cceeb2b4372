"""Datasets given by reference: the user's own image folder or .npz file (README, "Your own models and data").

``imagefolder``: ``<root>/train/<class>/*`` and ``<root>/test/<class>/*`` (png, jpg, jpeg, bmp, webp, gif,
tif, tiff, ppm, pgm; other files are ignored); the classes are the sorted names of train/'s subfolders, and
test/ may hold any of them. ``npz``: ``<root>`` is an .npz file, or a folder holding exactly one, with uint8
images ``x_train`` / ``x_test`` as (N, H, W, 3) or (N, 3, H, W), integer labels ``y_train`` / ``y_test`` in
0..K-1, and optionally ``classes`` (K names; else K is the largest label + 1).

Images are decoded to uint8 (N, 3, H, W): non-RGB ones (L, RGBA, P, ...) are converted to RGB, and with
``image_size`` every image is resized to that square (PIL bilinear, antialiased when shrinking); without it
the images must share one square size. The dataset's mean and std are computed from its training images.

A dataset whose train and test images (uint8) fit ``memory_budget_mb`` is decoded into memory (resident
splits, the device loader's path); a larger one is decoded once into a memory-mapped cache entry
(:mod:`bmtard_ray.data.disk_cache`) and streamed from it (:meth:`Split.streamed`). Every problem with the
input is a one-line :class:`DataError` raised before anything is written (a decode error met while a cache
entry is built removes the half-built entry).
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bmtard_ray.data.disk_cache import CACHE_FORMAT, open_or_build
from bmtard_ray.data.store import DatasetInfo, Split
from bmtard_ray.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")  # required; "classes" is optional
PARTS = ("train", "test")
_RESIZE_HINT = "set data.image_size to resize every image to one square size (e.g. --set data.image_size=32)"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass
class Source:
    """What a reference dataset holds, learnt without decoding it: sizes, labels, classes and a content key."""
    kind: str
    path: Path
    num_classes: int
    classes: tuple[str, ...] | None
    height: int
    width: int
    labels: dict[str, np.ndarray]                   # per part, int64
    key: str                                        # hash of the files (names, sizes, mtimes) and the resize
    fill: Callable[[str, np.ndarray], None]         # decodes part into a uint8 (N, 3, H, W) array

    def nbytes(self) -> int:
        return sum(len(y) for y in self.labels.values()) * 3 * self.height * self.width


def _key(kind: str, path: Path, files: list[Path], image_size: int | None) -> str:
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.relative_to(path)) if f != path else f.name, st.st_size, st.st_mtime_ns])
    text = json.dumps({"format": CACHE_FORMAT, "kind": kind, "path": str(path.resolve()), "files": stats,
                       "image_size": image_size})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _to_rgb(im: Any, image_size: int | None) -> np.ndarray:
    """An HWC uint8 RGB array of a PIL image, resized to ``image_size`` squared if given."""
    from PIL import Image

    if im.mode != "RGB":
        im = im.convert("RGBA").convert("RGB") if im.mode == "P" else im.convert("RGB")
    if image_size is not None and im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(im)


# ---------------------------------------------------------------------------------------------------------
# Image folders

def _class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise DataError(f"cannot read image {path} ({_one_line(exc)})") from exc


def scan_imagefolder(root: Path, image_size: int | None) -> Source:
    if not root.exists():
        raise DataError(f"data root {root} does not exist: --data-root must name a folder holding train/ and test/ "
                        f"with one subfolder of images per class")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder: an image folder holds train/<class>/ and test/<class>/")
    for part in PARTS:
        if not (root / part).is_dir():
            raise DataError(f"{root} has no {part}/ folder: an image folder holds train/<class>/ and test/<class>/")
    classes = _class_folders(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} holds no class folders: put each class's images in train/<class>/")
    index = {c: i for i, c in enumerate(classes)}
    files: dict[str, list[Path]] = {}
    labels: dict[str, np.ndarray] = {}
    for part in PARTS:
        names = _class_folders(root / part)
        if part == "test":
            extra = [c for c in names if c not in index]
            if extra:
                raise DataError(f"class '{extra[0]}' is in {root / 'test'} but not in {root / 'train'}: "
                                f"every class needs training images")
        found: list[Path] = []
        ys: list[int] = []
        for c in names:
            images = _images_in(root / part / c)
            if not images:
                raise DataError(f"class folder {root / part / c} holds no images "
                                f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
            found += images
            ys += [index[c]] * len(images)
        if not found:
            raise DataError(f"{root / part} holds no class folders with images")
        files[part], labels[part] = found, np.asarray(ys, dtype=np.int64)
    first = files["train"][0]
    if image_size is not None:
        height = width = image_size
    else:
        width, height = _image_size(first)
        if width != height:
            raise DataError(f"{first} is {width}x{height}, not square: {_RESIZE_HINT}")

    def fill(part: str, out: np.ndarray) -> None:
        from PIL import Image

        for i, p in enumerate(files[part]):
            try:
                with Image.open(p) as im:
                    arr = _to_rgb(im, image_size)
            except Exception as exc:
                raise DataError(f"cannot decode image {p} ({_one_line(exc)})") from exc
            if arr.shape != (height, width, 3):
                raise DataError(f"images differ in size: {first} is {width}x{height} but {p} is "
                                f"{arr.shape[1]}x{arr.shape[0]}: {_RESIZE_HINT}")
            out[i] = arr.transpose(2, 0, 1)

    key = _key("imagefolder", root, files["train"] + files["test"], image_size)
    return Source("imagefolder", root, len(classes), tuple(classes), height, width, labels, key, fill)


# ---------------------------------------------------------------------------------------------------------
# .npz files

def _npz_file(root: Path) -> Path:
    if root.is_file():
        return root
    if not root.exists():
        raise DataError(f"data root {root} does not exist: --data-root must name an .npz file "
                        f"(or a folder holding exactly one)")
    found = sorted(root.glob("*.npz"))
    if len(found) != 1:
        listed = f" ({', '.join(p.name for p in found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
        raise DataError(f"{root} holds {len(found)} .npz files{listed}: --data-root must name an .npz file "
                        f"(or a folder holding exactly one)")
    return found[0]


def _header(zf: zipfile.ZipFile, key: str, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        with zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
    except Exception as exc:
        raise DataError(f"{path}: '{key}' is not a readable array ({_one_line(exc)})") from exc
    return tuple(shape), bool(fortran), dtype


def _array(zf: zipfile.ZipFile, key: str, path: Path) -> np.ndarray:
    try:
        with zf.open(f"{key}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: '{key}' is not a readable array ({_one_line(exc)})") from exc


def scan_npz(root: Path, image_size: int | None) -> Source:
    path = _npz_file(root)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path} is not an .npz archive ({_one_line(exc)})") from exc
    with zf:
        keys = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
        missing = [k for k in NPZ_KEYS if k not in keys]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)}: an .npz dataset holds x_train, y_train, x_test, "
                            f"y_test (and optionally classes)")
        shapes: dict[str, tuple[int, ...]] = {}
        layout: dict[str, bool] = {}  # channels last
        for part in PARTS:
            shape, _, dtype = _header(zf, f"x_{part}", path)
            if dtype != np.uint8:
                raise DataError(f"{path}: x_{part} must hold uint8 images, got {dtype}")
            if len(shape) != 4 or 3 not in (shape[1], shape[3]):
                raise DataError(f"{path}: x_{part} must be (N, H, W, 3) or (N, 3, H, W), got shape {shape}")
            if shape[0] == 0:
                raise DataError(f"{path}: x_{part} holds no images")
            layout[part] = shape[3] == 3
            shapes[part] = shape
        labels: dict[str, np.ndarray] = {}
        for part in PARTS:
            y = _array(zf, f"y_{part}", path)
            if not np.issubdtype(y.dtype, np.integer):
                raise DataError(f"{path}: y_{part} must hold integer labels, got {y.dtype}")
            if y.ndim == 2 and y.shape[1] == 1:
                y = y[:, 0]
            if y.ndim != 1 or len(y) != shapes[part][0]:
                raise DataError(f"{path}: y_{part} must be ({shapes[part][0]},), one label per image of "
                                f"x_{part}, got shape {y.shape}")
            labels[part] = y.astype(np.int64)
        classes = None
        if "classes" in keys:
            names = _array(zf, "classes", path)
            if names.ndim != 1 or len(names) == 0:
                raise DataError(f"{path}: classes must be a 1-D array of class names, got shape {names.shape}")
            classes = tuple(str(c) for c in names.tolist())
        k = len(classes) if classes else max(int(y.max()) for y in labels.values()) + 1
        for part in PARTS:
            y = labels[part]
            if y.min() < 0 or y.max() >= k:
                what = f"classes has {k} names" if classes else "labels count from 0"
                raise DataError(f"{path}: y_{part} labels must lie in 0..{k - 1} ({what}), "
                                f"got {int(y.min())}..{int(y.max())}")
    hw = {p: (s[1:3] if layout[p] else s[2:4]) for p, s in shapes.items()}
    if image_size is not None:
        height = width = image_size
    else:
        height, width = hw["train"]
        if height != width:
            raise DataError(f"{path}: x_train images are {width}x{height}, not square: {_RESIZE_HINT}")
        if hw["test"] != hw["train"]:
            raise DataError(f"{path}: x_train images are {width}x{height} but x_test ones are "
                            f"{hw['test'][1]}x{hw['test'][0]}: {_RESIZE_HINT}")

    def fill(part: str, out: np.ndarray) -> None:
        from PIL import Image

        shape, nhwc = shapes[part], layout[part]
        row = int(np.prod(shape[1:]))
        chunk = max(1, (16 << 20) // row)
        with zipfile.ZipFile(path) as z, z.open(f"x_{part}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _, fortran, _ = read(f)
            whole = np.lib.format.read_array(f, allow_pickle=False) if fortran else None  # rare: read it whole
            for start in range(0, shape[0], chunk):
                n = min(chunk, shape[0] - start)
                if whole is not None:
                    a = whole[start:start + n]
                else:
                    buf = f.read(n * row)
                    if len(buf) != n * row:
                        raise DataError(f"{path}: x_{part} is truncated")
                    a = np.frombuffer(buf, dtype=np.uint8).reshape((n,) + shape[1:])
                a = a.transpose(0, 3, 1, 2) if nhwc else a
                if image_size is not None and a.shape[2:] != (image_size, image_size):
                    a = np.stack([_to_rgb(Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))),
                                          image_size).transpose(2, 0, 1) for im in a])
                out[start:start + n] = a

    key = _key("npz", path.parent, [path], image_size)
    return Source("npz", path, k, classes, height, width, labels, key, fill)


# ---------------------------------------------------------------------------------------------------------
# Loading

def scan(kind: str, root: str | os.PathLike, image_size: int | None = None) -> Source:
    return scan_imagefolder(Path(root), image_size) if kind == "imagefolder" else scan_npz(Path(root), image_size)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std in [0, 1] of uint8 (N, 3, H, W) images, read in chunks of about 8 MB."""
    row = int(np.prod(x.shape[1:]))
    chunk = max(1, (8 << 20) // row)
    total, squares = np.zeros(3, dtype=np.float64), np.zeros(3, dtype=np.float64)
    for i in range(0, len(x), chunk):
        a = np.asarray(x[i:i + chunk], dtype=np.uint32)
        total += a.sum(axis=(0, 2, 3), dtype=np.uint64)
        squares += (a * a).sum(axis=(0, 2, 3), dtype=np.uint64)
    n = len(x) * x.shape[2] * x.shape[3]
    mean = total / n / 255
    std = np.sqrt(np.maximum(squares / n / 255 ** 2 - mean ** 2, 0))
    return (float(mean[0]), float(mean[1]), float(mean[2])), (float(std[0]), float(std[1]), float(std[2]))


def load_reference(kind: str, root: str | os.PathLike, *, image_size: int | None = None,
                   memory_budget_mb: float | None = None,
                   cache_dir: str | os.PathLike | None = None) -> tuple[Split, Split, DatasetInfo]:
    """(train, test, info) of an image folder or .npz file: resident when its uint8 images fit
    ``memory_budget_mb`` (None: no limit), else streamed from a cache entry under ``cache_dir``."""
    src = scan(kind, root, image_size)
    shapes = {p: (len(src.labels[p]), 3, src.height, src.width) for p in PARTS}
    labels = {p: torch.from_numpy(src.labels[p]) for p in PARTS}
    if memory_budget_mb is None or src.nbytes() <= memory_budget_mb * 2 ** 20:
        arrays = {p: np.empty(shapes[p], dtype=np.uint8) for p in PARTS}
        for p in PARTS:
            src.fill(p, arrays[p])
        mean, std = channel_stats(arrays["train"])
        train, test = (Split(torch.from_numpy(arrays[p]), labels[p]) for p in PARTS)
    else:
        if cache_dir is None or "://" in str(cache_dir):
            raise DataError(f"{src.path} ({src.nbytes() / 2 ** 20:.0f} MB decoded) exceeds data.memory_budget_mb "
                            f"({memory_budget_mb}) and streams from a cache: data.cache_dir must be a folder path")

        def build(out: dict[str, np.ndarray]) -> dict[str, Any]:
            for p in PARTS:
                src.fill(p, out[p])
            m, s = channel_stats(out["train"])
            return {"mean": m, "std": s, "source": str(src.path), "key": src.key}

        stored, meta = open_or_build(Path(cache_dir), f"{kind}-{src.key}", shapes, build)
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
        train, test = (Split.streamed(stored[p], labels[p]) for p in PARTS)
    info = DatasetInfo(kind, src.num_classes, src.height, mean, std, src.classes)
    return train, test, info
