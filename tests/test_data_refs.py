"""Datasets by reference (issue 27): an image folder and an .npz file of the user's own, resident or streamed
from a memory-mapped cache, and every bad input as one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bmtard_ray.config import EvalConfig, build_config
from bmtard_ray.data import (
    BatchLoader,
    Split,
    load_dataset,
    num_classes,
    prepare_data,
    stratified_subset,
    train_val_split,
)
from bmtard_ray.data.references import channel_stats
from bmtard_ray.errors import ConfigError, DataError
from bmtard_ray.evaluation.core import evaluate
from bmtard_ray.evaluation.probe import probe_accuracy
from bmtard_ray.models import build_model
from bmtard_ray.training.teachers import teacher_config

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
N_TRAIN, N_TEST = 300, 100


@pytest.fixture(scope="module")
def cifar(cifar_root: Path) -> tuple[Split, Split]:
    """The first few hundred CIFAR-10 training and test images (the real offline copy)."""
    train, test, _ = load_dataset("cifar10", cifar_root)
    return (Split(train.images[:N_TRAIN].clone(), train.labels[:N_TRAIN].clone()),
            Split(test.images[:N_TEST].clone(), test.labels[:N_TEST].clone()))


def write_folder(root: Path, parts: dict[str, Split], ext: str = ".png") -> Path:
    for part, split in parts.items():
        for i, (x, y) in enumerate(zip(split.images, split.labels.tolist(), strict=True)):
            folder = root / part / CLASSES[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}{ext}")
    return root


def folder_order(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """``split`` in the order an image folder lists it (classes by name, files by name) and relabelled by
    the sorted class names."""
    rank = {c: i for i, c in enumerate(sorted(CLASSES))}
    labels = torch.tensor([rank[CLASSES[y]] for y in split.labels.tolist()])
    order = torch.argsort(labels, stable=True)
    return split.images[order], labels[order]


@pytest.fixture(scope="module")
def folder(cifar: tuple[Split, Split], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("imagefolder"), {"train": cifar[0], "test": cifar[1]})


def read_all(split: Split) -> torch.Tensor:
    return split.read_range(0, len(split))


def test_an_image_folder_gives_the_same_pixels_classes_and_statistics(folder: Path, cifar: Any) -> None:
    train, test, info = load_dataset("imagefolder", folder)
    assert not train.is_streamed
    for got, want in ((train, cifar[0]), (test, cifar[1])):
        x, y = folder_order(want)
        assert torch.equal(got.images, x) and torch.equal(got.labels, y)
    assert (info.name, info.num_classes, info.image_size) == ("imagefolder", 10, 32)
    assert info.classes == tuple(sorted(CLASSES))
    x = train.images.double() / 255
    assert info.mean == pytest.approx(tuple(x.mean((0, 2, 3)).tolist()), abs=1e-9)
    assert info.std == pytest.approx(tuple(x.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False).tolist()),
                                     abs=1e-9)
    assert num_classes("imagefolder", folder) == 10


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_an_npz_file_gives_the_same_pixels(tmp_path: Path, cifar: Any, layout: str) -> None:
    arrays = {}
    for part, split in zip(("train", "test"), cifar, strict=True):
        x = split.images.numpy()
        arrays[f"x_{part}"] = x.transpose(0, 2, 3, 1) if layout == "nhwc" else x
        arrays[f"y_{part}"] = split.labels.numpy().astype(np.int32 if layout == "nhwc" else np.int64)
    if layout == "nchw":
        arrays["classes"] = np.array(CLASSES)
    np.savez(tmp_path / "mine.npz", **arrays)
    for root in (tmp_path / "mine.npz", tmp_path):  # the file, or a folder holding exactly one
        train, test, info = load_dataset("npz", root)
        assert torch.equal(train.images, cifar[0].images) and torch.equal(train.labels, cifar[0].labels)
        assert torch.equal(test.images, cifar[1].images) and torch.equal(test.labels, cifar[1].labels)
        assert (info.num_classes, info.image_size) == (10, 32)
        assert info.classes == (CLASSES if layout == "nchw" else None)
    streamed, _, _ = load_dataset("npz", tmp_path, memory_budget_mb=0, cache_dir=tmp_path / "cache")
    assert streamed.is_streamed and torch.equal(read_all(streamed), cifar[0].images)


def test_resize_and_non_rgb_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    images = {"a/rgb.png": Image.fromarray(rgb), "a/grey.png": Image.fromarray(rgb[:, :, 0]),
              "b/rgba.png": Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])),
              "b/pal.png": Image.fromarray(rgb).quantize(16), "b/small.jpg": Image.fromarray(rgb[:20, :20])}
    for part in ("train", "test"):
        for name, im in images.items():
            (tmp_path / part / name).parent.mkdir(parents=True, exist_ok=True)
            im.save(tmp_path / part / name)
    with pytest.raises(DataError) as e:  # 40x30, not square
        load_dataset("imagefolder", tmp_path)
    assert "not square" in str(e.value) and "data.image_size" in str(e.value)
    train, test, info = load_dataset("imagefolder", tmp_path, image_size=16)
    assert tuple(train.images.shape) == (5, 3, 16, 16) and info.image_size == 16
    want = np.asarray(Image.fromarray(rgb).resize((16, 16), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(train.images[1].numpy(), want)  # a/rgb.png (files sorted: grey, rgb)
    grey = train.images[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # L -> RGB
    assert train.labels.tolist() == [0, 0, 1, 1, 1]


def test_mixed_sizes_without_resize_name_two_files(tmp_path: Path) -> None:
    for part in ("train", "test"):
        for name, size in (("a/0.png", 32), ("a/1.png", 32), ("b/2.png", 24)):
            (tmp_path / part / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (size, size)).save(tmp_path / part / name)
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "train/a/0.png is 32x32 but" in msg and "train/b/2.png is 24x24" in msg
    assert "data.image_size" in msg
    assert tuple(load_dataset("imagefolder", tmp_path, image_size=32)[0].images.shape) == (3, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------------
# The streaming path


def both(folder: Path, cache: Path) -> tuple[tuple[Split, Split, Any], tuple[Split, Split, Any]]:
    resident = load_dataset("imagefolder", folder, memory_budget_mb=10)  # 1.2 MB: fits
    streamed = load_dataset("imagefolder", folder, memory_budget_mb=0, cache_dir=cache)
    return resident, streamed


def test_streamed_global_batches_are_the_resident_ones_for_1_2_3_workers(folder: Path, tmp_path: Path) -> None:
    (rtrain, _, rinfo), (strain, _, sinfo) = both(folder, tmp_path / "cache")
    assert strain.is_streamed and not rtrain.is_streamed
    assert sinfo == rinfo  # statistics computed while decoding match the in-memory ones
    rtrain, _ = train_val_split(rtrain, 50, 0)
    strain, _ = train_val_split(strain, 50, 0)
    kw: dict[str, Any] = dict(shuffle=True, augment=True, seed=3, drop_last=False)
    for epoch in (0, 1):
        one = BatchLoader(rtrain, 32, **kw)
        one.set_epoch(epoch)
        want = list(one)
        for world in (1, 2, 3):
            loaders = [BatchLoader(strain, 32, rank=r, world_size=world, **kw) for r in range(world)]
            for loader in loaders:
                loader.set_epoch(epoch)
            got = list(zip(*loaders, strict=True))
            assert len(got) == len(want) == 8  # 250 images: 7 full batches and a short one
            for k, ranks in enumerate(got):
                x = torch.cat([xr for xr, _ in ranks])
                y = torch.cat([yr for _, yr in ranks])
                assert torch.equal(x, want[k][0]) and torch.equal(y, want[k][1]), (epoch, world, k)
    # A restart mid-epoch reads from the batch it resumes at.
    later = BatchLoader(strain, 32, rank=1, world_size=2, **kw)
    later.set_epoch(1, 5)
    ref = BatchLoader(rtrain, 32, rank=1, world_size=2, **kw)
    ref.set_epoch(1)
    rest = list(ref)[5:]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(later, rest, strict=True))


def test_streamed_validation_and_evaluation_match_resident(folder: Path, tmp_path: Path) -> None:
    (rtrain, rtest, _), (strain, stest, _) = both(folder, tmp_path / "cache")
    _, rval = train_val_split(rtrain, 60, 1)
    _, sval = train_val_split(strain, 60, 1)
    assert sval.is_streamed and torch.equal(read_all(sval), rval.images) and torch.equal(sval.labels, rval.labels)
    sub_r, sub_s = stratified_subset(rval, 20, 0), stratified_subset(sval, 20, 0)
    assert sub_s.is_streamed and torch.equal(read_all(sub_s), sub_r.images)
    with pytest.raises(DataError, match="streams from disk"):
        _ = sval.images  # never copied into memory whole
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10)
    cfg = EvalConfig(attacks=("clean", "pgd_sat"), batch_size=16, n_examples=None)
    for resident, streamed in ((rval, sval), (rtest, stest)):
        a, b = evaluate(model, resident, cfg), evaluate(model, streamed, cfg)
        assert a.accuracy == b.accuracy and a.n_examples == b.n_examples
    assert probe_accuracy(model, rval, torch.device("cpu"), n=40) == probe_accuracy(model, sval, torch.device("cpu"),
                                                                                     n=40)


def test_the_cache_is_reused_rebuilt_when_damaged_and_keyed_by_content(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load_dataset("imagefolder", folder, memory_budget_mb=0, cache_dir=cache)
    (entry,) = cache.iterdir()
    assert entry.name.startswith("imagefolder-") and sorted(p.name for p in entry.iterdir()) == [
        "meta.json", "test.npy", "train.npy"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["shapes"]["train"] == [N_TRAIN, 3, 32, 32]
    stamp = (entry / "train.npy").stat().st_mtime_ns
    load_dataset("imagefolder", folder, memory_budget_mb=0, cache_dir=cache)
    assert (entry / "train.npy").stat().st_mtime_ns == stamp  # reused, not decoded again
    with open(entry / "train.npy", "r+b") as f:  # a damaged entry (truncated) is rebuilt
        f.truncate(1000)
    train, _, _ = load_dataset("imagefolder", folder, memory_budget_mb=0, cache_dir=cache)
    assert torch.equal(read_all(train), load_dataset("imagefolder", folder)[0].images)
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no temporary folder left behind
    # Another resize is another entry.
    load_dataset("imagefolder", folder, image_size=16, memory_budget_mb=0, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2


def test_the_teacher_cache_key_tells_image_folders_apart_by_content(cifar: Any, tmp_path: Path) -> None:
    a = write_folder(tmp_path / "a", {"train": cifar[0], "test": cifar[1]})
    b = write_folder(tmp_path / "b", {"train": cifar[1], "test": cifar[1]})

    def name(root: Path, *sets: str) -> str:
        cfg = build_config("smoke", overrides=["data.dataset=imagefolder", f"data.root={root}", *sets])
        return teacher_config(cfg, "clean").name

    assert name(a) == name(a) != name(b)
    assert name(a) != name(a, "data.image_size=16")
    assert name(a) == name(a, "data.memory_budget_mb=0")  # the path taken does not change the teacher
    first = name(a)
    os.utime(next((a / "train").rglob("*.png")), ns=(1, 1))
    assert name(a) != first  # a changed file is another dataset


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line each, nothing written


def _bad_folder(tmp_path: Path, case: str) -> Path:
    root = tmp_path / "data"
    if case == "missing folder":
        return root
    for part in ("train", "test"):
        for c in ("a", "b"):
            (root / part / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / part / c / "0.png")
    if case == "missing train/":
        import shutil
        shutil.rmtree(root / "train")
    elif case == "empty class folder":
        (root / "train" / "b" / "0.png").unlink()
    elif case == "class only in test/":
        (root / "test" / "zebra").mkdir()
        Image.new("RGB", (8, 8)).save(root / "test" / "zebra" / "0.png")
    elif case == "corrupt image":
        (root / "train" / "b" / "1.png").write_bytes(b"not a png at all")
    elif case == "truncated image":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            root / "test" / "a" / "1.png")
        data = (root / "test" / "a" / "1.png").read_bytes()
        (root / "test" / "a" / "1.png").write_bytes(data[:len(data) // 2])
    return root


@pytest.mark.parametrize("case, message", [
    ("missing folder", "data root {root} does not exist"),
    ("missing train/", "{root} has no train/ folder"),
    ("empty class folder", "class folder {root}/train/b holds no images"),
    ("class only in test/", "class 'zebra' is in {root}/test but not in {root}/train"),
    ("corrupt image", "cannot decode image {root}/train/b/1.png"),
    ("truncated image", "cannot decode image {root}/test/a/1.png"),
])
@pytest.mark.parametrize("streamed", [False, True])
def test_bad_image_folders_are_one_line_and_write_nothing(tmp_path: Path, case: str, message: str,
                                                          streamed: bool) -> None:
    root = _bad_folder(tmp_path, case)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", root, memory_budget_mb=0 if streamed else None, cache_dir=cache)
    assert message.format(root=root) in str(e.value) and "\n" not in str(e.value)
    assert not cache.exists() or list(cache.iterdir()) == []


def _npz(tmp_path: Path, **change: Any) -> Path:
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {"x_train": rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8),
                              "y_train": np.arange(20) % 4,
                              "x_test": rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), "y_test": np.arange(6) % 4}
    arrays.update(change)
    np.savez(tmp_path / "d.npz", **{k: v for k, v in arrays.items() if v is not None})
    return tmp_path / "d.npz"


@pytest.mark.parametrize("change, message", [
    ({"y_test": None}, "d.npz lacks y_test: an .npz dataset holds x_train, y_train, x_test, y_test"),
    ({"x_train": np.zeros((20, 8, 8, 3), dtype=np.float32)}, "x_train must hold uint8 images, got float32"),
    ({"x_train": np.zeros((20, 8, 8), dtype=np.uint8)}, "x_train must be (N, H, W, 3) or (N, 3, H, W), got shape"),
    ({"y_train": np.arange(19) % 4}, "y_train must be (20,), one label per image of x_train"),
    ({"y_train": np.linspace(0, 1, 20)}, "y_train must hold integer labels, got float64"),
    ({"y_test": np.array([0, 1, 2, 3, -1, 0])}, "y_test labels must lie in 0..3"),
    ({"classes": np.array(["a", "b", "c"])}, "y_train labels must lie in 0..2 (classes has 3 names), got 0..3"),
    ({"x_test": np.zeros((6, 16, 16, 3), dtype=np.uint8)}, "x_train images are 8x8 but x_test ones are 16x16"),
])
def test_bad_npz_files_are_one_line(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = _npz(tmp_path, **change)
    with pytest.raises(DataError) as e:
        load_dataset("npz", path, memory_budget_mb=0, cache_dir=tmp_path / "cache")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_npz_paths_and_an_unwritable_cache(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("npz", tmp_path / "none.npz")
    with pytest.raises(DataError, match="holds 0 .npz files"):
        load_dataset("npz", tmp_path)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="junk.npz is not an .npz archive"):
        load_dataset("npz", tmp_path / "junk.npz")
    path = _npz(tmp_path)
    with pytest.raises(DataError, match="holds 2 .npz files"):
        load_dataset("npz", tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError) as e:
        load_dataset("npz", path, memory_budget_mb=0, cache_dir=blocker / "cache")
    assert f"cannot write the data cache {blocker / 'cache'}" in str(e.value) and "data.cache_dir" in str(e.value)


def test_config_and_split_size_errors(tmp_path: Path) -> None:
    path = _npz(tmp_path)
    with pytest.raises(ConfigError, match="data.image_size applies to imagefolder and npz only"):
        build_config("smoke", overrides=["data.image_size=32"])
    with pytest.raises(ConfigError, match="data.memory_budget_mb must be an integer >= 0"):
        build_config("smoke", overrides=["data.memory_budget_mb=-1"])
    cfg = build_config("smoke", overrides=["data.dataset=npz", f"data.root={path}"])  # val_size 500 > 20 images
    with pytest.raises(ConfigError, match=r"data.val_size \(500\) must be smaller than the training set \(20 images\)"
                                          r": set a smaller one, e.g. --set data.val_size=2"):
        prepare_data(cfg)


# ---------------------------------------------------------------------------------------------------------
# End to end


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_run_train_on_an_image_folder(folder: Path, tmp_path: Path) -> None:
    proc = cli("--local", "--preset", "smoke", "--dataset", "imagefolder", "--data-root", str(folder), "--epochs", "1",
               "--output-dir", str(tmp_path / "runs"), "--set", "data.val_size=60", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "bmtard-smoke" / "summary.json").read_text())
    assert summary["dataset"] == "imagefolder" and summary["classes"] == sorted(CLASSES)
    assert summary["results"]["test"]["n_examples"] == 64
    assert not (tmp_path / "runs" / "data_cache").exists()  # it fits the budget: decoded in memory


def test_run_train_refuses_a_bad_image_folder_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "mine" / "train").mkdir(parents=True)
    proc = cli("--local", "--preset", "smoke", "--dataset", "imagefolder", "--data-root", "mine", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == "error: mine has no test/ folder: an image folder holds train/<class>/ " \
                                           "and test/<class>/", proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.slow
def test_two_ray_workers_stream_an_image_folder(folder: Path, tmp_path: Path) -> None:
    # natural: one Ray Train run (no teachers to train first), so the test stays well under two minutes. The
    # student is a user's factory in the working directory: the Ray Train workers import it too.
    shutil.copy(Path(__file__).with_name("user_models.py"), tmp_path / "my_ray_models.py")
    proc = cli("--preset", "smoke", "--method", "natural", "--dataset", "imagefolder", "--data-root", str(folder),
               "--epochs", "1", "--output-dir", str(tmp_path / "runs"), "--set", "data.val_size=60", "--set",
               "data.memory_budget_mb=0", "--workers", "2", "--student", "my_ray_models:tiny_net", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "2 Ray worker(s)" in " ".join(proc.stdout.split()), proc.stdout[-2000:]
    run = tmp_path / "runs" / "bmtard-smoke"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["classes"] == sorted(CLASSES) and (run / "model.pt").is_file()
    assert summary["student"] == "my_ray_models:tiny_net"
    (entry,) = (tmp_path / "runs" / "data_cache").iterdir()  # decoded once, by the driver; workers read it
    assert entry.name.startswith("imagefolder-")


def test_channel_stats_of_a_memory_map_match_torch(tmp_path: Path) -> None:
    x = np.random.default_rng(1).integers(0, 256, (50, 3, 5, 7), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    mean, std = channel_stats(np.load(tmp_path / "x.npy", mmap_mode="r"))
    t = torch.from_numpy(x).double() / 255
    assert mean == pytest.approx(tuple(t.mean((0, 2, 3)).tolist()), abs=1e-12)
    assert std == pytest.approx(tuple(t.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False).tolist()), abs=1e-9)
