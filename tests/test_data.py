"""Dataset readers, stratified splits, the device loader, its augmentation and the reference loader.

Fake CIFAR folders are written here in the official on-disk form (Python-2 protocol-2 pickles, as the
official archive and the offline copy's builder write them) with hand-placed pixels, so that a reader that mixes up the
R, G, B plane layout, the batch order or the label key fails.
"""
from __future__ import annotations

import importlib.util
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from bmtard_ray.data import (
    BatchLoader,
    Split,
    dataset_info,
    load_dataset,
    make_reference_loader,
    stratified_subset,
    train_val_split,
)
from bmtard_ray.data.augment import augment_batch, crop_flip
from bmtard_ray.errors import ConfigError, DataError
from bmtard_ray.names import DATASET_NAMES

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_cifar10", SHARED_DATA / "build_cifar10.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _py2_pickle(label_key: str, labels: list[int], data: np.ndarray) -> bytes:
    """A batch dict exactly as the official files store it (byte-string keys, numpy-1 array form)."""
    p = _builder().Py2Pickle()
    return p.dict_of([(b"batch_label", lambda: p.string(b"fake batch")),
                      (label_key.encode(), lambda: p.list(labels, p.int)),
                      (b"data", lambda: p.uint8_matrix(data)),
                      (b"filenames", lambda: p.list([f"f{i}.png".encode() for i in range(len(labels))], p.string))])


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _put_pixel(row: np.ndarray, y: int, x: int, rgb: tuple[int, int, int]) -> None:
    """CIFAR's layout by hand: the R plane (1024 bytes), then G, then B, each 32 rows of 32."""
    for c, v in enumerate(rgb):
        row[c * 1024 + y * 32 + x] = v


def fake_cifar10(root: Path, per_batch: int = 6, n_test: int = 5) -> tuple[np.ndarray, list[int]]:
    """Five train batches + a test batch; returns all train rows and labels in file order."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_rows, all_labels = [], []
    for k in range(1, 6):
        rows = _rows(per_batch, k)
        labels = [(k + i) % 10 for i in range(per_batch)]
        if k == 2:
            _put_pixel(rows[1], 3, 5, (10, 20, 30))
        (folder / f"data_batch_{k}").write_bytes(_py2_pickle("labels", labels, rows))
        all_rows.append(rows)
        all_labels += labels
    test_rows = _rows(n_test, 99)
    _put_pixel(test_rows[0], 31, 0, (255, 0, 128))
    (folder / "test_batch").write_bytes(_py2_pickle("labels", [9, 0, 1, 2, 3][:n_test], test_rows))
    return np.concatenate(all_rows), all_labels


def fake_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = _rows(12, 7)
    _put_pixel(train[4], 0, 31, (1, 2, 3))
    p = _builder().Py2Pickle()
    fine = [0, 99, 5, 17, 42, 42, 3, 8, 64, 99, 1, 2]
    coarse = [v // 5 for v in fine]
    blob = p.dict_of([(b"filenames", lambda: p.list([b"x%d" % i for i in range(12)], p.string)),
                      (b"batch_label", lambda: p.string(b"training batch 1 of 1")),
                      (b"fine_labels", lambda: p.list(fine, p.int)),
                      (b"coarse_labels", lambda: p.list(coarse, p.int)),
                      (b"data", lambda: p.uint8_matrix(train))])
    (folder / "train").write_bytes(blob)
    (folder / "test").write_bytes(_py2_pickle("fine_labels", [7, 77, 70], _rows(3, 8)))


def coded_split(n: int, num_classes: int = 10, size: int = 8, labels: torch.Tensor | None = None) -> Split:
    """A split whose image i carries i in its first two pixels, so that examples can be traced through a loader."""
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    ids = torch.arange(n)
    images[:, 0, 0, 0] = (ids % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (ids // 256).to(torch.uint8)
    return Split(images, torch.arange(n) % num_classes if labels is None else labels)


def ids_of(images: torch.Tensor) -> torch.Tensor:
    """Recover the ids of ``coded_split`` images (uint8 or float in [0, 1], unaugmented)."""
    if images.is_floating_point():
        images = (images.float() * 255).round().long()
    return images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()


# ---------------------------------------------------------------------------------------------------------
# Dataset info and readers


def test_dataset_info_and_unknown_name() -> None:
    assert DATASET_NAMES == ("cifar10", "cifar100", "tiny-imagenet", "imagefolder", "npz")
    assert [(dataset_info(n).num_classes, dataset_info(n).image_size) for n in DATASET_NAMES[:3]] == [
        (10, 32), (100, 32), (200, 64)]
    with pytest.raises(ConfigError, match="come from its data"):  # imagefolder / npz: test_data_refs.py
        dataset_info("npz")
    assert dataset_info("cifar10").mean == pytest.approx((0.4914, 0.4822, 0.4465))
    with pytest.raises(ConfigError, match="cifar10, cifar100, tiny-imagenet") as e:
        dataset_info("mnist")
    assert "mnist" in str(e.value)


def test_fake_cifar10_decodes_planes_order_and_labels(tmp_path: Path) -> None:
    rows, labels = fake_cifar10(tmp_path)
    train, test, info = load_dataset("cifar10", tmp_path)
    assert info.name == "cifar10" and len(train) == 30 and len(test) == 5
    assert train.images.dtype == torch.uint8 and train.images.shape == (30, 3, 32, 32)
    assert train.images.is_contiguous() and train.labels.dtype == torch.int64
    # data_batch_2's second image is the 8th overall; its pixel at row 3, column 5 was set to RGB (10, 20, 30).
    assert train.images[7, :, 3, 5].tolist() == [10, 20, 30]
    assert test.images[0, :, 31, 0].tolist() == [255, 0, 128]
    # A random row read the same way as the hand-placed pixel: every byte lands where the layout says.
    r = rows[17]
    assert train.images[17, 2, 30, 1].item() == r[2 * 1024 + 30 * 32 + 1]
    assert torch.equal(train.images.reshape(30, 3072), torch.from_numpy(rows))
    assert train.labels.tolist() == labels and test.labels.tolist() == [9, 0, 1, 2, 3]


def test_python3_pickled_cifar_batches_load_too(tmp_path: Path) -> None:
    """A copy re-saved by Python 3 (str keys) reads the same as the Python-2 originals."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = _rows(4, 3)
    _put_pixel(rows[2], 0, 0, (7, 8, 9))
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": [1, 2, 3, 4]}, f)
    train, test, _ = load_dataset("cifar10", tmp_path)
    assert len(train) == 20 and train.images[2, :, 0, 0].tolist() == [7, 8, 9]
    assert test.labels.tolist() == [1, 2, 3, 4]


def test_fake_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    fake_cifar100(tmp_path)
    train, test, info = load_dataset("cifar100", tmp_path)
    assert info.num_classes == 100 and len(train) == 12 and len(test) == 3
    assert train.labels.tolist() == [0, 99, 5, 17, 42, 42, 3, 8, 64, 99, 1, 2]
    assert test.labels.tolist() == [7, 77, 70]
    assert train.images[4, :, 0, 31].tolist() == [1, 2, 3]


def test_real_offline_cifar10_copy(cifar_root: Path) -> None:
    train, test, info = load_dataset("cifar10", cifar_root)
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # The first images of every batch carry the exact original pixels: compare against that independent file.
    exact = np.load(SHARED_DATA / "cifar10_exact_prefix.npz")
    assert torch.equal(train.images[10000 * 2 + 5], torch.from_numpy(exact["train_exact"][2, 5].reshape(3, 32, 32)))
    assert torch.equal(test.images[1016], torch.from_numpy(exact["test_exact"][1016].reshape(3, 32, 32)))
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # the well-known first CIFAR-10 labels


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    with zipfile.ZipFile(SHARED_DATA / "tiny_imagenet_subset.zip") as z:
        z.extractall(root)
    return root


def test_tiny_imagenet_subset(tiny_root: Path) -> None:
    train, test, info = load_dataset("tiny-imagenet", tiny_root)
    assert info.num_classes == 200 and info.image_size == 64
    assert train.images.shape == (4000, 3, 64, 64) and test.images.shape == (2000, 3, 64, 64)
    assert torch.bincount(train.labels, minlength=200).tolist() == [20] * 200
    assert torch.bincount(test.labels, minlength=200).tolist() == [10] * 200
    wnids = sorted((tiny_root / "tiny-imagenet-200" / "wnids.txt").read_text().split())
    # val_0.JPEG is annotated n03444034: its class is that wnid's position in sorted order.
    assert test.labels[0].item() == wnids.index("n03444034")
    assert train.labels[:20].tolist() == [0] * 20 and train.labels[-1].item() == 199
    # Greyscale files (about 100 of them) become three equal channels, not an error or one channel.
    grey = (train.images[:, 0] == train.images[:, 1]).flatten(1).all(1) & (
        train.images[:, 1] == train.images[:, 2]).flatten(1).all(1)
    assert 20 < int(grey.sum()) < 200
    from PIL import Image
    with Image.open(tiny_root / "tiny-imagenet-200" / "val" / "images" / "val_1.JPEG") as im:
        assert torch.equal(test.images[1], torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))


# ---------------------------------------------------------------------------------------------------------
# Errors: one line, naming the path and what is expected


def _error(call: Callable[[], object]) -> str:
    with pytest.raises(DataError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_root_and_folder(tmp_path: Path) -> None:
    msg = _error(lambda: load_dataset("cifar10", tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg
    assert f"build_cifar10.py --out {tmp_path / 'nowhere'}" in msg and "data.download=true" in msg
    msg = _error(lambda: load_dataset("cifar10", tmp_path))
    assert "cifar-10-batches-py" in msg and "build_cifar10.py" in msg
    assert "cifar-100-python" in _error(lambda: load_dataset("cifar100", tmp_path))
    assert "tiny-imagenet-200" in _error(lambda: load_dataset("tiny-imagenet", tmp_path))
    assert "cannot be downloaded" in _error(lambda: load_dataset("tiny-imagenet", tmp_path, download=True))


def test_missing_batch_file(tmp_path: Path) -> None:
    fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    msg = _error(lambda: load_dataset("cifar10", tmp_path))
    assert "missing batch file" in msg and "data_batch_4" in msg and "build_cifar10.py" in msg


@pytest.mark.parametrize("cut", [100, 20000])
def test_truncated_batch(tmp_path: Path, cut: int) -> None:
    fake_cifar10(tmp_path, per_batch=10)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:cut])
    msg = _error(lambda: load_dataset("cifar10", tmp_path))
    assert "data_batch_3" in msg and "corrupt or truncated" in msg


def test_not_a_pickle(tmp_path: Path) -> None:
    fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_text("<html>404 Not Found</html>\n")
    assert "test_batch" in _error(lambda: load_dataset("cifar10", tmp_path))


def _replace_batch(root: Path, name: str, obj: object) -> None:
    with open(root / "cifar-10-batches-py" / name, "wb") as f:
        pickle.dump(obj, f)


def test_wrong_shapes_and_labels(tmp_path: Path) -> None:
    fake_cifar10(tmp_path)
    _replace_batch(tmp_path, "data_batch_1", {"data": np.zeros((4, 1024), np.uint8), "labels": [0] * 4})
    msg = _error(lambda: load_dataset("cifar10", tmp_path))
    assert "data_batch_1" in msg and "(N, 3072)" in msg and "(4, 1024)" in msg
    _replace_batch(tmp_path, "data_batch_1", {"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3})
    assert "4 images but 3 labels" in _error(lambda: load_dataset("cifar10", tmp_path))
    _replace_batch(tmp_path, "data_batch_1", {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 10, 2]})
    msg = _error(lambda: load_dataset("cifar10", tmp_path))
    assert "data_batch_1" in msg and "out of range" in msg and "0..9" in msg
    _replace_batch(tmp_path, "data_batch_1", {"data": np.zeros((4, 3072), np.uint8), "labels": [0, -1, 1, 2]})
    assert "out of range" in _error(lambda: load_dataset("cifar10", tmp_path))
    _replace_batch(tmp_path, "data_batch_1", {"images": np.zeros((4, 3072), np.uint8)})
    assert "'labels'" in _error(lambda: load_dataset("cifar10", tmp_path))
    _replace_batch(tmp_path, "data_batch_1", [1, 2, 3])
    assert "expected a CIFAR batch dict" in _error(lambda: load_dataset("cifar10", tmp_path))


def test_cifar100_label_range_is_100(tmp_path: Path) -> None:
    fake_cifar100(tmp_path)
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [99, 100]}, f)
    assert "0..99" in _error(lambda: load_dataset("cifar100", tmp_path))


def fake_tiny_imagenet(root: Path) -> list[str]:
    """200 classes, one train and one val image each; wnids.txt in REVERSED order (classes follow sorted order)."""
    from PIL import Image

    base = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
    ann = []
    for i, w in enumerate(wnids):
        (base / "train" / w / "images").mkdir(parents=True)
        # PNG bytes under the .JPEG name keep the pixels exact; PIL reads by content, not by extension.
        Image.new("L" if i == 5 else "RGB", (64, 64), 40 if i == 5 else (i, 1, 2)).save(
            base / "train" / w / "images" / f"{w}_0.JPEG", format="PNG")
        Image.new("RGB", (64, 64), (0, i, 0)).save(base / "val" / "images" / f"val_{199 - i}.JPEG", format="PNG")
        ann.append(f"val_{199 - i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return wnids


def test_fake_tiny_imagenet_class_order_and_greyscale(tmp_path: Path) -> None:
    fake_tiny_imagenet(tmp_path)
    train, test, _ = load_dataset("tiny-imagenet", tmp_path)
    assert train.labels.tolist() == list(range(200)) and test.labels.tolist() == list(range(200))
    assert train.images[:, 0, 10, 10].tolist()[:5] == [0, 1, 2, 3, 4] and test.images[7, :, 0, 0].tolist() == [0, 7, 0]
    assert (train.images[5] == 40).all()  # the greyscale image became three equal channels


def test_tiny_imagenet_errors(tmp_path: Path) -> None:
    base = tmp_path / "tiny-imagenet-200"
    base.mkdir()
    assert "wnids.txt" in _error(lambda: load_dataset("tiny-imagenet", tmp_path))
    (base / "wnids.txt").write_text("n01\nn02\n")
    assert "expected 200" in _error(lambda: load_dataset("tiny-imagenet", tmp_path))
    wnids = fake_tiny_imagenet(tmp_path / "a")
    ann = tmp_path / "a" / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_x.JPEG\tn99999999\t0\t0\t1\t1\n")
    msg = _error(lambda: load_dataset("tiny-imagenet", tmp_path / "a"))
    assert "val_annotations.txt:201" in msg and "wnids.txt" in msg
    from PIL import Image
    fake_tiny_imagenet(tmp_path / "b")
    bad = tmp_path / "b" / "tiny-imagenet-200" / "train" / wnids[3] / "images" / f"{wnids[3]}_0.JPEG"
    Image.new("RGB", (32, 64)).save(bad, format="PNG")
    msg = _error(lambda: load_dataset("tiny-imagenet", tmp_path / "b"))
    assert str(bad) in msg and "expected 64x64" in msg
    bad.write_bytes(b"not an image")
    assert "cannot decode image" in _error(lambda: load_dataset("tiny-imagenet", tmp_path / "b"))


def test_split_rejects_wrong_dtypes() -> None:
    with pytest.raises(DataError, match="uint8"):
        Split(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match="int64"):
        Split(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------
# Splits


def test_train_val_split_stratified_disjoint_deterministic() -> None:
    train = coded_split(1000)
    rest, val = train_val_split(train, 200, seed=3)
    assert len(rest) == 800 and len(val) == 200
    assert torch.bincount(val.labels).tolist() == [20] * 10
    rest_ids, val_ids = ids_of(rest.images), ids_of(val.images)
    assert not set(rest_ids.tolist()) & set(val_ids.tolist())
    assert sorted(rest_ids.tolist() + val_ids.tolist()) == list(range(1000))
    assert torch.equal(train.labels[val_ids], val.labels)  # images travel with their labels
    again = train_val_split(train, 200, seed=3)[1]
    assert torch.equal(again.images, val.images)
    other = train_val_split(train, 200, seed=4)[1]
    assert not torch.equal(ids_of(other.images), val_ids)


def test_val_split_uneven_and_imbalanced_classes() -> None:
    rest, val = train_val_split(coded_split(1000), 205, seed=0)
    counts = torch.bincount(val.labels).tolist()
    assert sum(counts) == 205 and max(counts) - min(counts) == 1
    # Which classes get the odd extra example is drawn by the seed, not always the lowest class ids.
    favoured = {tuple((torch.bincount(train_val_split(coded_split(1000), 205, seed=s)[1].labels) == 21)
                      .nonzero().squeeze(1).tolist()) for s in range(4)}
    assert len(favoured) > 1
    # Class 0 has only 3 examples: it gives all of them, the other classes share the rest equally.
    labels = torch.cat([torch.zeros(3, dtype=torch.long), torch.arange(97) % 3 + 1])
    _, val = train_val_split(coded_split(100, labels=labels), 30, seed=0)
    assert torch.bincount(val.labels).tolist() == [3, 9, 9, 9]


def test_val_split_edges() -> None:
    train = coded_split(50)
    rest, val = train_val_split(train, 0, seed=0)
    assert len(val) == 0 and val.images.shape == (0, 3, 8, 8) and len(rest) == 50
    for bad in (50, 51, -1):
        with pytest.raises(ConfigError, match="val_size"):
            train_val_split(train, bad, seed=0)


def test_stratified_subset() -> None:
    split = coded_split(500)
    sub = stratified_subset(split, 120, seed=1)
    assert torch.bincount(sub.labels).tolist() == [12] * 10
    assert torch.equal(sub.images, stratified_subset(split, 120, seed=1).images)
    assert stratified_subset(split, 500, seed=1) is split
    with pytest.raises(ConfigError):
        stratified_subset(split, -1, seed=1)


# ---------------------------------------------------------------------------------------------------------
# Device loader


def _epoch_ids(loader: BatchLoader) -> list[torch.Tensor]:
    return [ids_of(x) for x, _ in loader]


def _global_batches(n: int, batch: int, world: int, **kw: Any) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every global batch of one epoch as the ranks of a ``world``-worker run hold it: [batch][rank] -> (x, y)."""
    loaders = [BatchLoader(coded_split(n), batch, rank=r, world_size=world, **kw) for r in range(world)]
    return [list(parts) for parts in zip(*[list(loader) for loader in loaders], strict=False)]


def test_global_batch_k_is_the_same_for_every_world_size() -> None:
    """Issue 15: batch k of an epoch (which images, which crops and flips) does not depend on the world size;
    ranks hold contiguous slices, the remainder on the lowest ranks (32 rows on 3 ranks: 11, 11, 10)."""
    kw = {"shuffle": True, "augment": True, "seed": 5, "drop_last": True}
    one = _global_batches(100, 32, 1, **kw)
    assert len(one) == 3  # 100 // 32: the tail that does not fill a global batch is dropped
    for world, sizes in ((2, [16, 16]), (3, [11, 11, 10]), (5, [7, 7, 6, 6, 6])):
        split = _global_batches(100, 32, world, **kw)
        assert len(split) == len(one)
        for k, parts in enumerate(split):
            assert [len(y) for _, y in parts] == sizes
            x = torch.cat([p[0] for p in parts])
            y = torch.cat([p[1] for p in parts])
            assert torch.equal(x, one[k][0][0]) and torch.equal(y, one[k][0][1]), (world, k)
    ranks = [BatchLoader(coded_split(100), 32, rank=r, world_size=3, **kw) for r in range(3)]
    assert [r.num_examples for r in ranks] == [33, 33, 30] and all(len(r) == 3 for r in ranks)
    ids = torch.cat([r.indices() for r in ranks])
    assert len(set(ids.tolist())) == 96  # no duplicates


def test_a_loader_restarts_mid_epoch_at_the_same_batch() -> None:
    kw = {"shuffle": True, "augment": True, "seed": 2, "drop_last": True}
    full = list(BatchLoader(coded_split(64), 16, **kw))
    later = BatchLoader(coded_split(64), 16, rank=1, world_size=3, **kw)
    later.set_epoch(0, 2)  # restored after 2 batches, on another world size
    rest = list(later)
    assert len(rest) == 2 and torch.equal(rest[0][0], full[2][0][6:11])  # rank 1 of 3 holds rows 6..10 of 16
    assert torch.equal(rest[1][0], full[3][0][6:11])
    assert len(list(later)) == 4  # the next pass is a whole epoch again
    with pytest.raises(ValueError):
        later.set_epoch(0, 5)


def test_uneven_sizes_and_short_tails() -> None:
    assert [len(y) for _, y in BatchLoader(coded_split(10), 4, shuffle=False, augment=False)] == [4, 4, 2]
    # Without drop_last the last global batch is short and split by the same rule.
    parts = _global_batches(10, 4, 2, shuffle=False, augment=False)
    assert [[ids_of(x).tolist() for x, _ in p] for p in parts] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8], [9]]]
    with pytest.raises(ConfigError, match="smaller than the number of workers"):
        BatchLoader(coded_split(10), 2, shuffle=False, augment=False, world_size=3)


def test_loader_seed_and_epoch_determinism() -> None:
    split = coded_split(64)
    a = BatchLoader(split, 16, shuffle=True, augment=True, seed=1)
    b = BatchLoader(split, 16, shuffle=True, augment=True, seed=1)
    first = [x for x, _ in a]
    assert all(torch.equal(x, y) for x, (y, _) in zip(first, b, strict=False))  # crops and flips included
    a.set_epoch(1)
    assert not torch.equal(torch.cat([x for x, _ in a]), torch.cat(first))
    plain = [BatchLoader(split, 64, shuffle=True, augment=False, seed=s) for s in (1, 1, 2)]
    orders = [_epoch_ids(p)[0] for p in plain]
    plain[1].set_epoch(1)
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])
    assert not torch.equal(_epoch_ids(plain[1])[0], orders[0])


def test_loader_output_values_and_formats() -> None:
    split = coded_split(20)
    x, y = next(iter(BatchLoader(split, 20, shuffle=False, augment=False)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, split.images.float() / 255) and torch.equal(y, split.labels)
    x, _ = next(iter(BatchLoader(split, 8, shuffle=True, augment=True, channels_last=True, dtype=torch.bfloat16)))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iter(BatchLoader(split, 20, shuffle=True, augment=True)))
    assert x.min() >= 0 and x.max() <= 1
    with pytest.raises(ConfigError):
        BatchLoader(split, 0, shuffle=False, augment=False)
    with pytest.raises(ConfigError):
        BatchLoader(split, 4, shuffle=False, augment=False, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------------------
# Augmentation


def test_crop_with_known_offset_and_flip() -> None:
    x = torch.randint(1, 256, (3, 3, 8, 8), dtype=torch.uint8)  # no zeros, so padding is recognisable
    dx, dy = torch.tensor([0, 4, 7]), torch.tensor([0, 4, 2])
    out = crop_flip(x, dx, dy, torch.tensor([False, False, False]))
    padded = torch.zeros(3, 3, 16, 16, dtype=torch.uint8)
    padded[:, :, 4:12, 4:12] = x
    for i in range(3):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8])
    assert torch.equal(out[1], x[1])  # the centre crop is the image itself
    assert (out[0, :, :4, :] == 0).all() and (out[0, :, 4:, 4:] == x[0, :, :4, :4]).all()
    flipped = crop_flip(x, dx, dy, torch.tensor([True, True, True]))
    assert torch.equal(flipped[1], x[1].flip(-1))
    assert torch.equal(flipped[2], padded[2, :, 2:10, 7:15].flip(-1))
    # By hand: output column j reads padded column 7 + 7 - j, row i reads padded row 2 + i (padding is 4).
    assert (flipped[2, :, :, :3] == 0).all() and (flipped[2, :, :2, :] == 0).all()
    assert torch.equal(flipped[2, :, 2:, 3], x[2, :, 0:6, 7]) and torch.equal(flipped[2, :, 2:, 7], x[2, :, 0:6, 3])


def test_augment_batch_draws_every_image_a_shifted_possibly_flipped_window() -> None:
    n = 64
    x = torch.randint(1, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    found = []
    for i in range(n):
        matches = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                   if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8].flip(-1) if f else
                                  padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert matches, f"image {i} is not a crop of its padded image"
        found.append(matches[0])
    flips = [f for _, _, f in found]
    assert 16 < sum(flips) < 48  # flips happen about half the time
    assert len({(dy, dx) for dy, dx, _ in found}) > 20  # offsets vary over the 81 possible
    again = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


# ---------------------------------------------------------------------------------------------------------
# Reference loader


def test_reference_loader_plain_and_augmented() -> None:
    split = coded_split(20, size=32)
    x, y = next(iter(make_reference_loader(split, 20, shuffle=False, augment=False, num_workers=0)))
    assert x.dtype == torch.float32 and x.shape == (20, 3, 32, 32) and x.device.type == "cpu"
    assert torch.allclose(x, split.images.float() / 255) and torch.equal(y, split.labels)
    # Evaluation keeps the ragged last batch; training (shuffle) drops it.
    assert [len(b[1]) for b in make_reference_loader(split, 8, shuffle=False, augment=False, num_workers=0)] == [8, 8,
                                                                                                                 4]
    assert len(make_reference_loader(split, 8, shuffle=True, augment=True, num_workers=0)) == 2
    orders = [torch.cat([b[1] for b in make_reference_loader(coded_split(40, num_classes=40), 8, shuffle=True,
                                                              augment=False, num_workers=0, seed=s)]) for s in (3, 3,
                                                                                                                4)]
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])


def test_reference_loader_shards_the_epoch_over_ranks() -> None:
    """W ranks together see each example of an epoch once (W x the data before the fix), reshuffled per epoch."""
    split = coded_split(40, num_classes=40)  # label i = example i
    loaders = [make_reference_loader(split, 4, shuffle=True, augment=False, num_workers=0, seed=7, rank=r, world_size=2)
               for r in range(2)]
    assert [len(loader) for loader in loaders] == [5, 5]  # 20 examples per rank in batches of 4, not 40
    epochs = []
    for epoch in (1, 2):
        for loader in loaders:
            loader.set_epoch(epoch)
        seen = [torch.cat([y for _, y in loader]) for loader in loaders]
        assert sorted(torch.cat(seen).tolist()) == list(range(40))  # disjoint shards covering the epoch
        epochs.append(seen[0])
    assert not torch.equal(epochs[0], epochs[1])
    with pytest.raises(ConfigError, match="rank must be in"):
        make_reference_loader(split, 4, shuffle=True, augment=False, num_workers=0, rank=2, world_size=2)


def test_reference_loader_with_a_worker_process() -> None:
    split = coded_split(16, size=32)
    loader = make_reference_loader(split, 8, shuffle=True, augment=True, num_workers=1, seed=0)
    batches = list(loader)
    assert len(batches) == 2 and all(x.shape == (8, 3, 32, 32) for x, _ in batches)
    x = torch.cat([b[0] for b in batches])
    assert x.min() >= 0 and x.max() <= 1 and sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted(
        split.labels.tolist())
