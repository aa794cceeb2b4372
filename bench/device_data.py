#!/usr/bin/env python
"""CIFAR-10 for the lent GPU machine: stage the compressed copy in the checkout here, rebuild it there.

Only the checkout travels to that machine (64 MiB at most, code included); ``../shared`` beside it does
not. The JPEG copy of CIFAR-10 (``cifar10_jpeg.npz``, 53.2 MiB) fits beside the code; the exact-pixel
prefix (``cifar10_exact_prefix.npz``, 16.4 MiB more) does not, so the device rebuilds every image from its
JPEG (``build_cifar10.py --no-exact``): the same labels and order, JPEG-decoded pixels, which is what
timing needs.

    python bench/device_data.py            # here: copy the npz and build_cifar10.py into .device_data/
    # run tool: carry [".device_data"]; there, bench/device_check.py calls rebuild() before its parts

``.device_data/`` is git-ignored, so it travels only when the run tool's ``carry`` names it.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE_DIR = REPO / ".device_data"
SHARED_DATA = REPO.parent / "shared" / "data"
NPZ = "cifar10_jpeg.npz"
BUILDER = "build_cifar10.py"
NPZ_SHA256 = "5c1b2fde228c7ca8a730335ba907d1e423f3dfd93125fda1eaaf61b338e1f3eb"  # ../shared/data/README.md
FOLDER = "cifar-10-batches-py"


class DeviceDataError(Exception):
    """A missing or corrupt source file, or a rebuild that failed (one line)."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stage(shared: Path = SHARED_DATA, dest: Path = STAGE_DIR) -> list[Path]:
    """Copy the JPEG npz (checked against its published sha256) and the builder into ``dest``."""
    out = []
    for name in (NPZ, BUILDER):
        src = shared / name
        if not src.is_file():
            raise DeviceDataError(f"{src} is missing: stage needs ../shared/data beside the checkout")
        target = dest / name
        if not (target.is_file() and target.stat().st_size == src.stat().st_size):
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        out.append(target)
    if sha256(dest / NPZ) != NPZ_SHA256:
        raise DeviceDataError(f"{dest / NPZ} does not have the published sha256 {NPZ_SHA256[:12]}...: copy it again")
    return out


def built(root: Path) -> bool:
    return (root / FOLDER / "test_batch").is_file() and (root / FOLDER / "data_batch_5").is_file()


def rebuild(src: Path, out: Path, timeout: float) -> Path:
    """``out/cifar-10-batches-py`` rebuilt from ``src`` (all images from JPEG); kept when already built."""
    if built(out):
        return out
    for name in (NPZ, BUILDER):
        if not (src / name).is_file():
            raise DeviceDataError(f"{src / name} is missing (run `python bench/device_data.py` and carry .device_data)")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(src / BUILDER), "--src", str(src), "--out", str(out), "--no-exact", "--force"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeviceDataError(f"rebuilding CIFAR-10 took more than {timeout:.0f} s") from None
    if done.returncode != 0 or not built(out):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DeviceDataError(f"{BUILDER} failed (exit {done.returncode}): {tail[0]}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Stage the CIFAR-10 JPEG copy into .device_data/ for the GPU check.")
    p.add_argument("--shared", default=str(SHARED_DATA), help="folder holding cifar10_jpeg.npz and build_cifar10.py")
    p.add_argument("--dest", default=str(STAGE_DIR))
    args = p.parse_args(argv)
    try:
        files = stage(Path(args.shared), Path(args.dest))
    except DeviceDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in files) / 2**20
    print(f"staged {', '.join(str(f) for f in files)} ({size:.1f} MiB); carry [\"{Path(args.dest).name}\"]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
