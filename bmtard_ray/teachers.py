"""Teachers the toolkit trains itself: derived configs and a content-addressed cache.

A teacher with no checkpoint is trained once (natural training for the clean teacher, SAT or TRADES for
the robust one) on the training split (never the validation or test split) and cached under a folder
named by a hash of everything that determines it, so every later run, trial or worker reuses it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from bmtard_ray.config import RunConfig, TeacherConfig, from_dict, teacher_cache_dir, to_dict
from bmtard_ray.engine import teacher_roles

# Runs a training config to completion; must leave <output_dir>/<name>/model.pt behind.
RunFn = Callable[[RunConfig], object]


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
