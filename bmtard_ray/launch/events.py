"""TensorBoard event files of a training run: every per-epoch metric as a scalar, so that a long run can be
watched live (``tensorboard --logdir runs/<name>``, or ``python run_tune.py --review runs/<name>``).

Whoever drives the trainer (the in-process launch, or the Ray driver with rank 0's reports) feeds each
epoch's metrics here, tagged by their group in :mod:`bmtard_ray.training.metrics`; the events land in the
run folder beside ``metrics.parquet``, which holds the same numbers. tensorboardX only: neither TensorFlow
nor Ray is needed.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from bmtard_ray.training.metrics import tag_of

EVENT_FILES = "events.out.tfevents.*"


class EpochEvents:
    """Writes one point per metric per epoch (step = epoch) into ``run_dir``, on disk within seconds; a metric's
    tag is ``<group>/<name>`` (:func:`~bmtard_ray.training.metrics.tag_of`).

    ``fresh``: the run starts from epoch 1, so event files of an earlier run in the same folder (one it
    replaces with --overwrite) are removed; a resumed run appends a new file and its curves continue."""

    def __init__(self, run_dir: str | Path, *, fresh: bool) -> None:
        from tensorboardX import SummaryWriter

        folder = Path(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if fresh:
            for old in folder.glob(EVENT_FILES):
                old.unlink()
        # tensorboardX writes from a background thread and flushes every flush_secs: 2 s keeps a live view
        # live. A unique suffix: two writers opened in the same second (a quick resume) would share a name.
        self.writer = SummaryWriter(logdir=str(folder), flush_secs=2,
                                    filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def __call__(self, metrics: dict[str, Any]) -> None:
        epoch = metrics.get("epoch")
        if not isinstance(epoch, (int, float)):
            return
        for name, value in metrics.items():
            tag = tag_of(name)
            # Baselines report NaN temperatures: no point rather than a gap-filling NaN.
            if tag and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), global_step=int(epoch))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
