"""Where a run's files live: local paths or cloud URIs (``s3://``, ``gs://``), read and written through
``pyarrow.fs``. No Ray import."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bmtard_ray.runtime import fileio


def is_uri(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def filesystem(uri: str) -> tuple[Any, str]:
    import pyarrow.fs

    if not is_uri(uri):  # pyarrow takes local paths only when absolute
        uri = str(Path(uri).expanduser().resolve())
    return pyarrow.fs.FileSystem.from_uri(uri)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def write_text(run_dir: str, name: str, text: str) -> None:
    if not is_uri(run_dir):
        fileio.atomic_text(text, Path(run_dir) / name)
        return
    fs, path = filesystem(run_dir)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(text.encode())


def upload_dir(local: Path, run_dir: str) -> None:
    import pyarrow.fs

    fs, path = filesystem(run_dir)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)


def remove_run(run_dir: str) -> None:
    fs, path = filesystem(run_dir)
    fs.delete_dir(path)
