"""Where a failed worker's full error text goes, so that the terminal shows its cause once, in one line.

A joined cluster's worker output is not streamed to the driver (``log_to_driver=False``); when a worker fails
with an error the driver prints as one line, Ray's full text of it (the worker's traceback, the node, the
actor) is written to ``error.log`` in the run folder, or, when the run has no folder yet (a teacher still
training), to a file in the system's temporary folder; the one line says which.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bmtard_ray.runtime import fileio
from bmtard_ray.storage.paths import is_uri

ERROR_LOG = "error.log"


def write_error_log(exc: BaseException, run_dir: str, name: str) -> str:
    """Write ``exc``'s full text next to the run (or to a temporary file); returns where it went."""
    text = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {type(exc).__name__}:\n{exc}\n"
    if not is_uri(run_dir) and Path(run_dir).is_dir():
        path = Path(run_dir) / ERROR_LOG
        try:
            fileio.atomic_text(text, path)
            return str(path)
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f"bmtard-{name}-", suffix=".log")
    with open(fd, "w") as f:
        f.write(text)
    return tmp
