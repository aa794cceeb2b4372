"""Atomic file writes and safe reads: a result or checkpoint is either complete on disk or absent.

Every writer goes to a temporary name in the same folder and then ``os.replace``s it, which is atomic on
POSIX filesystems, so an interrupted run never leaves a half-written file under the real name.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bmtard_ray.errors import CheckpointError


def _atomic(path: Path, write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: Path) -> Path:
    return _atomic(path, lambda p: torch.save(obj, p))


def atomic_text(text: str, path: Path) -> Path:
    return _atomic(path, lambda p: p.write_text(text))


def atomic_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """A matplotlib figure saved whole or not at all (the temporary name keeps the suffix that picks the format)."""
    return _atomic(path, lambda p: fig.savefig(p, **savefig), suffix=f".tmp{Path(path).suffix}")


def atomic_parquet(table: Any, path: Path) -> Path:
    import pyarrow.parquet as pq

    return _atomic(path, lambda p: pq.write_table(table, p))


def history_table(history: list[dict[str, Any]]) -> Any:
    """Per-epoch metrics as an Arrow table (columns are the union of keys; missing values are null)."""
    import pyarrow as pa

    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    return pa.table({k: [row.get(k) for row in history] for k in keys})


def safe_load(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors for the usual ways a file is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty")
    if head[:1] == b"<":
        raise CheckpointError(f"{what} {path} is a web page (HTML), not a checkpoint: the download link probably "
                              "returned a login or confirmation page")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError) as exc:
        raise CheckpointError(f"{what} {path} is truncated or corrupt ({_first_line(exc)})") from exc
    except Exception as exc:  # pickle errors of all kinds: not a torch checkpoint
        raise CheckpointError(f"{what} {path} is not a readable PyTorch checkpoint ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:120]}" if text else type(exc).__name__
