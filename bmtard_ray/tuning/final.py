"""The best trial's student, re-evaluated once on the test split with the full evaluation suite.

Selection happened on the validation split (the trials never see the test set); this is the only place the
test split is touched, and only for the one selected student.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bmtard_ray import evaluation
from bmtard_ray.config import EvalConfig, RunConfig, from_dict
from bmtard_ray.data import prepare_data
from bmtard_ray.errors import CheckpointError
from bmtard_ray.models import build_model
from bmtard_ray.models.files import model_record
from bmtard_ray.models.refs import pretrained_stats
from bmtard_ray.names import ATTACK_NAMES, BLACK_BOX, teacher_roles
from bmtard_ray.runtime import fileio
from bmtard_ray.runtime.device import select_device
from bmtard_ray.storage import checkpoints
from bmtard_ray.training.metrics import TRACE_COLUMNS
from bmtard_ray.training.outputs import teacher_provenance
from bmtard_ray.training.teachers import load_teacher
from bmtard_ray.tuning.results import TrialRecord
from bmtard_ray.tuning.settings import TuneSettings

# The suite on a CPU: every white-box gradient attack, plus the transfer (black-box) attacks crafted on the
# robust teacher when the method has one. On a GPU, AutoAttack and Square too (on a CPU they take hours for
# a full test set; add them with --final-attacks).
CPU_SUITE = ("clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf")
GPU_EXTRA = ("autoattack", "square")


@dataclass
class FinalResult:
    trial_id: str
    attacks: tuple[str, ...]
    n_examples: int
    accuracy: dict[str, float]
    w_robust: dict[str, float]
    folder: Path
    state: dict[str, Any]          # the checkpoint (history, trace, config)


def checkpoint_of(record: TrialRecord) -> Path:
    """The training-state file of a trial's last reported checkpoint."""
    if not record.checkpoint_path:
        raise CheckpointError(f"trial {record.trial_id} reported no checkpoint")
    path = checkpoints.file_in(record.checkpoint_path)
    if path is None:
        raise CheckpointError(f"trial {record.trial_id}: no {checkpoints.FILE} in its checkpoint "
                              f"{record.checkpoint_path}")
    return path


def suite(cfg: RunConfig, device: torch.device) -> tuple[str, ...]:
    attacks = list(CPU_SUITE) + (list(GPU_EXTRA) if device.type == "cuda" else [])
    if cfg.teachers.robust.checkpoint and "robust" in teacher_roles(cfg.method.name):
        attacks += list(BLACK_BOX)
    return tuple(a for a in attacks if a in ATTACK_NAMES)


def evaluate_best(record: TrialRecord, settings: TuneSettings, out: Path, console: Console) -> FinalResult:
    path = checkpoint_of(record)
    state = checkpoints.read_file(path)
    cfg = from_dict(state["config"])
    device = select_device(cfg.device)
    data = prepare_data(cfg)
    # The trained weights replace timm's: only the normalisation a pretrained student trained with is needed.
    stats = pretrained_stats(cfg.student) if cfg.student_pretrained else (data.info.mean, data.info.std)
    student = build_model(cfg.student, data.info.num_classes, default_stats=stats).to(device)
    student.load_state_dict(state["student"])
    student.eval()
    attacks = tuple(settings.final_attacks) or suite(cfg, device)
    source = None
    if any(a in evaluation.BLACK_BOX for a in attacks):
        source = load_teacher("robust", cfg.teachers.robust, data.info, device, cfg.teachers.model_dir)
    ec = cfg.eval
    n_examples = settings.final_examples or ec.n_examples
    eval_cfg = EvalConfig(attacks=attacks, eps=ec.eps, n_examples=n_examples, batch_size=ec.batch_size, seed=ec.seed,
                          headline=ec.headline, square_queries=ec.square_queries,
                          autoattack_version=ec.autoattack_version)
    console.print(f"[bold]test-set evaluation of trial {record.trial_id}[/bold] ({', '.join(attacks)}; "
                  f"{n_examples or len(data.test)} of {len(data.test)} test images)")
    result = evaluation.evaluate(student, data.test, eval_cfg, device=device, source_model=source, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    model_info = {"name": f"{Path(settings.experiment_dir).name} trial {record.trial_id}",
                  "architecture": cfg.student, "dataset": cfg.data.dataset, "split": "test",
                  "checkpoint": str(path), "method": cfg.method.name,
                  "teachers": teacher_provenance(cfg), "trial_id": record.trial_id, "params": record.effective}
    evaluation.write_reports(result, out, model_info=model_info, stem="test")
    evaluation.print_table(result, f"trial {record.trial_id}: test split")
    acc, w = dict(result.accuracy), dict(result.w_robust)
    summary = {"trial_id": record.trial_id, "params": record.params, "effective": record.effective,
               "validation": {k: record.metrics.get(k) for k in ("val_clean", "val_robust", "val_w_robust")},
               "epochs": record.epochs, "test": {"n_examples": result.n_examples, "accuracy": acc, "w_robust": w}}
    fileio.atomic_torch_save(model_record(student, cfg.student, data.info, cfg, {"summary": summary}), out / "model.pt")
    fileio.atomic_text(json.dumps(summary, indent=2, default=str), out / "summary.json")
    history = state.get("history") or []
    if history:
        fileio.atomic_parquet(fileio.history_table(history), out / "metrics.parquet")
    trace = trace_table(state)
    if trace is not None:
        fileio.atomic_parquet(trace, out / "trace.parquet")
    return FinalResult(record.trial_id, attacks, int(result.n_examples), acc, w, out, state)


def trace_table(state: dict[str, Any]) -> Any:
    """The per-iteration balance trace stored in a training checkpoint, as an Arrow table (or None)."""
    import pyarrow as pa

    parts = state.get("trace") or []
    if not parts:
        return None
    data = torch.cat([torch.as_tensor(p) for p in parts])
    if data.ndim != 2 or data.shape[1] != len(TRACE_COLUMNS):
        return None
    return pa.table({name: data[:, i].numpy() for i, name in enumerate(TRACE_COLUMNS)})
