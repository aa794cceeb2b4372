"""A run in this process (``run_train.py --local``): teachers first, then the trainer, with local checkpoints.

The Ray Train layer (:mod:`bmtard_ray.ray_train`) runs the same trainer in Ray's worker processes; both use
:mod:`bmtard_ray.storage` for run folders and checkpoints and :mod:`bmtard_ray.launch.console` for what they
print.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from bmtard_ray.config import RunConfig, dataset_settings, teacher_cache_dir
from bmtard_ray.data import prepare_data
from bmtard_ray.launch.console import epoch_logger, print_outputs, print_summary, what_trains
from bmtard_ray.launch.events import EpochEvents
from bmtard_ray.launch.preflight import check_batches, probe_all
from bmtard_ray.storage import checkpoints
from bmtard_ray.storage.run_folder import check_run_folder, write_config
from bmtard_ray.training.balance import unreachable_target
from bmtard_ray.training.teachers import check_given_teachers, ensure_teachers, roles_to_train
from bmtard_ray.training.trainer import Trainer


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def run_local(cfg: RunConfig, *, resume: str | Path | None = None, overwrite: bool = False,
              console: Console | None = None) -> dict[str, Any]:
    """Train (teachers first if needed) and evaluate in this process; returns the summary."""
    console = console or Console()
    state = None
    if resume is not None:
        state, _ = checkpoints.load_resume_state(resume)
    run_dir = Path(checkpoints.run_dir_of(resume)) if resume is not None else run_dir_of(cfg)
    to_train = roles_to_train(cfg)
    # Every folder this run writes, probed before anything is removed, trained or written.
    probe_all([(run_dir, "run folder")] + ([(teacher_cache_dir(cfg), "teacher cache")] if to_train else []))
    data = prepare_data(cfg)  # fails on a bad data folder before anything is written
    check_batches(cfg, data, to_train)  # ... on a split too small for one batch of the student or a teacher
    check_given_teachers(cfg, data.info, data.val)  # ... and on a teacher checkpoint that does not fit
    check_run_folder(str(run_dir), resume=resume is not None, overwrite=overwrite)
    cfg = ensure_teachers(cfg, lambda t: run_local(t, overwrite=True, console=console),
                          log=lambda s: console.print(f"[bold]{s}[/bold]"))

    def report(metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        if checkpoint is not None:
            checkpoints.write(checkpoint, run_dir)
        events(metrics)

    trainer = Trainer(cfg, data=data, report=report, log=epoch_logger(console, cfg.optim.epochs))
    if state is not None:
        trainer.load_state_dict(state)
        part = trainer.state.partial
        within = f" and {part.batches} batches of epoch {part.epoch}" if part is not None else ""
        console.print(f"resuming {run_dir} after epoch {trainer.state.epoch}{within}")
    write_config(cfg, run_dir)
    events = EpochEvents(run_dir, fresh=state is None)  # TensorBoard: watch the run live (report() writes)
    console.print(f"[bold]{what_trains(cfg)}[/bold] on {cfg.data.dataset} "
                  f"({len(data.train)} train / {len(data.val)} val / {len(data.test)} test images; "
                  f"{dataset_settings(cfg)}) "
                  f"on {trainer.device}")
    if (note := unreachable_target(cfg.ebb, data.info.num_classes)) is not None:
        console.print(note, style="yellow", soft_wrap=True, markup=False)
    try:
        trainer.fit()
    finally:
        events.close()
    summary = trainer.finish(run_dir)
    print_summary(summary, console)
    print_outputs(cfg, str(run_dir), console)
    return summary
