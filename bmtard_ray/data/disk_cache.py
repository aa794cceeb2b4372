"""The decoded-image cache of a streamed dataset: uint8 (N, 3, H, W) memory maps, one entry per content key.

A dataset too large for ``data.memory_budget_mb`` (an image folder or an .npz file) is decoded once into
``<cache_dir>/<kind>-<key>/`` (``train.npy``, ``test.npy``: NumPy files opened as read-only memory maps, and
``meta.json``), where the key hashes the files' names, sizes and modification times and the resize option
(:mod:`bmtard_ray.data.references`), so a changed dataset gets a new entry.

An entry appears whole or not at all: it is decoded into a temporary folder beside it and renamed into place
once its ``meta.json`` is written, so an interrupted decode leaves no entry that could be used; processes
that build the same entry at once (Ray workers) each rename theirs and the first one stays. An entry that
does not open (a truncated file, a foreign meta.json) is removed and rebuilt.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bmtard_ray.errors import DataError

CACHE_FORMAT = "bmtard_ray.data_cache/1"
META = "meta.json"

Shapes = dict[str, tuple[int, int, int, int]]
Arrays = dict[str, np.ndarray]


def _open(entry: Path, shapes: Shapes) -> tuple[Arrays, dict[str, Any]] | None:
    """The entry's memory maps and meta, or None when it is missing, incomplete or not of this format."""
    try:
        meta = json.loads((entry / META).read_text())
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            return None
        arrays: Arrays = {}
        for name, shape in shapes.items():
            a = np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if a.dtype != np.uint8 or tuple(a.shape) != tuple(shape):
                return None
            arrays[name] = a
        return arrays, meta
    except (OSError, ValueError, EOFError):  # missing, truncated (mmap longer than the file) or garbled
        return None


def _unwritable(cache_dir: Path, exc: OSError) -> DataError:
    return DataError(f"cannot write the data cache {cache_dir} ({exc.strerror or exc}): set data.cache_dir to "
                     f"a writable folder (or raise data.memory_budget_mb to keep the dataset in memory)")


def open_or_build(cache_dir: Path, entry_name: str, shapes: Shapes,
                  build: Callable[[Arrays], dict[str, Any]]) -> tuple[Arrays, dict[str, Any]]:
    """The read-only memory maps of entry ``entry_name`` (one array of ``shapes`` per split) and its meta;
    when absent, ``build(arrays)`` fills writable ones and returns what to add to the meta."""
    final = cache_dir / entry_name
    found = _open(final, shapes)
    if found is not None:
        return found
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if final.exists():  # incomplete or of another format: rebuilt
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry_name}.", dir=cache_dir))
    except OSError as exc:
        raise _unwritable(cache_dir, exc) from exc
    try:
        arrays: Arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.uint8,
                                                          shape=shape) for name, shape in shapes.items()}
        extra = build(arrays)
        for a in arrays.values():
            a.flush()  # type: ignore[attr-defined]
        del arrays
        meta = {"format": CACHE_FORMAT, "shapes": {k: list(v) for k, v in shapes.items()}, **extra}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if _open(final, shapes) is None:  # not another process's finished entry: a real failure
                raise
    except OSError as exc:
        raise _unwritable(cache_dir, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; else what an error left
    found = _open(final, shapes)
    if found is None:
        raise DataError(f"the data cache entry {final} does not open after it was written: remove it and retry")
    return found
