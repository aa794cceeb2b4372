"""Teachers: loading the frozen ones a run distils from, and training the ones it lacks.

Loading: a teacher is any model file the loader of :mod:`bmtard_ray.models.checkpoint` reads (ours, a public
state dict, or the pyautoattack ResNet-18), frozen on the device. Training: a teacher with no checkpoint is trained once (natural training for the clean teacher, SAT or TRADES for
the robust one) on the training split (never the validation or test split) and cached under a folder
named by a hash of everything that determines it, so every later run, trial or worker reuses it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bmtard_ray.config import RunConfig, TeacherConfig, from_dict, teacher_cache_dir, to_dict
from bmtard_ray.data import DatasetInfo
from bmtard_ray.errors import ConfigError
from bmtard_ray.models.checkpoint import PYAUTOATTACK, load_model
from bmtard_ray.names import teacher_roles

# Runs a training config to completion; must leave <output_dir>/<name>/model.pt behind.
RunFn = Callable[[RunConfig], object]


def freeze(model: nn.Module) -> nn.Module:
    """A teacher: eval mode for good, no parameter wants a gradient."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(role: str, tc: TeacherConfig, info: DatasetInfo, device: torch.device) -> nn.Module:
    """Build a frozen teacher from its checkpoint (ours, a public one, or the pyautoattack ResNet-18)."""
    if not tc.checkpoint:
        raise ConfigError(f"no checkpoint for the {role} teacher: run through run_train.py (which trains and caches "
                          f"the teachers) or set teachers.{role}.checkpoint")
    # One loader for every model file: our own format carries its architecture and normalisation.
    loaded = load_model(tc.checkpoint, None if tc.checkpoint == PYAUTOATTACK else tc.arch, info.num_classes,
                        dataset=info.name, mean=tc.mean, std=tc.std, role=f"{role} teacher")
    return freeze(loaded.model.to(device))


def check_given_teachers(cfg: RunConfig, info: DatasetInfo) -> None:
    """Load every teacher the user pointed at (on the CPU) so a bad file fails before anything is trained."""
    for role in teacher_roles(cfg.method.name):
        tc: TeacherConfig = getattr(cfg.teachers, role)
        if tc.checkpoint:
            load_teacher(role, tc, info, torch.device("cpu"))


def teacher_config(cfg: RunConfig, role: str) -> RunConfig:
    """The RunConfig that trains the ``role`` teacher for ``cfg``'s dataset and data split."""
    tc: TeacherConfig = getattr(cfg.teachers, role)
    t = from_dict(to_dict(cfg))
    t.method.name = tc.train_method
    t.student = tc.arch
    t.optim.epochs, t.optim.lr, t.optim.batch_size, t.optim.milestones = tc.epochs, tc.lr, tc.batch_size, tc.milestones
    t.trace = False
    t.val_every = 0
    t.checkpoint_every = 1
    t.eval.attacks = ("clean", "pgd_sat")
    t.eval.n_examples = min(cfg.eval.n_examples or 1000, 1000)
    # Only what determines the weights goes into the key (not names, folders or evaluation settings).
    key = {"role": role, "teacher": to_dict(tc) | {"checkpoint": None}, "data": to_dict(cfg.data) | {"root": None},
           "attack": to_dict(cfg.attack), "method": to_dict(cfg.method), "optim": {"momentum": cfg.optim.momentum,
           "weight_decay": cfg.optim.weight_decay, "gamma": cfg.optim.gamma}, "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    t.name = f"{role}-{tc.arch}-{tc.train_method}-{tc.epochs}ep-{digest}"
    t.output_dir = teacher_cache_dir(cfg)
    t.teachers = type(cfg.teachers)()  # a teacher needs no teachers
    return t


def cached_path(cfg: RunConfig, role: str) -> Path:
    t = teacher_config(cfg, role)
    return Path(t.output_dir) / t.name / "model.pt"


def ensure_teachers(cfg: RunConfig, run: RunFn, log: Callable[[str], None] = print) -> RunConfig:
    """Return ``cfg`` with every needed teacher's checkpoint set, training missing ones through ``run``."""
    out = from_dict(to_dict(cfg))
    for role in teacher_roles(cfg.method.name):
        tc: TeacherConfig = getattr(out.teachers, role)
        if tc.checkpoint:
            continue
        path = cached_path(cfg, role)
        if path.is_file():
            log(f"{role} teacher: reusing {path}")
        else:
            tcfg = teacher_config(cfg, role)
            log(f"{role} teacher: training {tc.arch} with {tc.train_method} for {tc.epochs} epochs -> {path}")
            run(tcfg)
            if not path.is_file():
                raise RuntimeError(f"training the {role} teacher did not produce {path}")
        tc.checkpoint = str(path)
        # A trained teacher's normalisation is whatever it was trained with (none for our models).
    return out
