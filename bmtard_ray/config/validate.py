"""Validation: every impossible value of a configuration is caught here, before a worker or a file exists."""
from __future__ import annotations

import math
from pathlib import Path

from bmtard_ray.config.schema import EBB_MODES, ENTROPY_TARGET_MODES, REDUCTIONS, RunConfig, TeacherConfig
from bmtard_ray.errors import ConfigError
from bmtard_ray.names import (
    ATTACK_NAMES,
    DATASET_NAMES,
    DEVICES,
    METHOD_NAMES,
    REFERENCE_DATASETS,
    TEACHER_TRAIN_METHODS,
    check_arch,
    check_robustbench_dataset,
    is_robustbench,
    is_timm_ref,
    robustbench_name,
)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def validate(cfg: RunConfig) -> RunConfig:
    c = cfg
    _check(c.method.name in METHOD_NAMES,
           f"unknown method '{c.method.name}'; choose one of: {', '.join(METHOD_NAMES)}")
    check_arch(c.student, "student model")
    _check(not c.student_pretrained or is_timm_ref(c.student),
           f"student_pretrained needs a timm:<name> student (pretrained weights come from timm), got '{c.student}'")
    _check(c.data.dataset in DATASET_NAMES,
           f"unknown dataset '{c.data.dataset}'; choose one of: {', '.join(DATASET_NAMES)}")
    _check(c.device in DEVICES, f"unknown device '{c.device}'; choose one of: {', '.join(DEVICES)}")
    _check(c.data.loader in ("device", "reference"),
           f"data.loader must be 'device' or 'reference', got '{c.data.loader}'")
    _check(c.data.val_size >= 0, f"data.val_size must be >= 0, got {c.data.val_size}")
    _check(c.data.num_workers >= 0, f"data.num_workers must be >= 0, got {c.data.num_workers}")
    d = c.data
    if d.image_size is not None:
        _check(d.dataset in REFERENCE_DATASETS,
               f"data.image_size applies to {' and '.join(REFERENCE_DATASETS)} only (dataset {d.dataset})")
        _check(isinstance(d.image_size, int) and d.image_size >= 8,
               f"data.image_size must be an integer >= 8 (pixels) or null, got {d.image_size}")
    _check(isinstance(d.memory_budget_mb, int) and d.memory_budget_mb >= 0,
           f"data.memory_budget_mb must be an integer >= 0, got {d.memory_budget_mb}")
    for key in ("train_subset", "test_subset"):
        v = getattr(c.data, key)
        _check(v is None or v > 0, f"data.{key} must be a positive count or null, got {v}")
    _check(_finite(c.attack.eps) and c.attack.eps >= 0, f"attack.eps must be >= 0, got {c.attack.eps}")
    _check(_finite(c.attack.step_size) and c.attack.step_size >= 0,
           f"attack.step_size must be >= 0, got {c.attack.step_size}")
    _check(c.attack.steps >= 0, f"attack.steps must be >= 0, got {c.attack.steps}")
    _check(_finite(c.attack.init_std) and c.attack.init_std >= 0,
           f"attack.init_std must be >= 0, got {c.attack.init_std}")
    _check(c.loss.reduction in REDUCTIONS,
           f"unknown loss.reduction '{c.loss.reduction}'; choose one of: {', '.join(REDUCTIONS)}")
    _check(_finite(c.loss.scale) and c.loss.scale > 0, f"loss.scale must be > 0, got {c.loss.scale}")
    _check(_finite(c.loss.log_eps) and c.loss.log_eps >= 0, f"loss.log_eps must be >= 0, got {c.loss.log_eps}")
    e = c.ebb
    _check(e.mode in EBB_MODES, f"unknown ebb.mode '{e.mode}'; choose one of: {', '.join(EBB_MODES)}")
    _check(_finite(e.smoothing) and 0 <= e.smoothing < 1, f"ebb.smoothing must be in [0, 1), got {e.smoothing}")
    _check(_finite(e.tau_min) and e.tau_min > 0, f"ebb.tau_min must be > 0, got {e.tau_min}")
    _check(_finite(e.tau_max) and e.tau_min <= e.tau_max,
           f"ebb.tau_min ({e.tau_min}) must be <= ebb.tau_max ({e.tau_max})")
    for key in ("tau_adv_init", "tau_nat_init"):
        v = getattr(e, key)
        # Solve mode never uses the initial temperatures, so their range is only checked where they act.
        _check(_finite(v) and (e.mode == "solve" or e.tau_min <= v <= e.tau_max),
               f"ebb.{key} must lie in [tau_min, tau_max] = [{e.tau_min}, {e.tau_max}], got {v}")
    _check(_finite(e.eta_tau) and e.eta_tau >= 0, f"ebb.eta_tau must be >= 0, got {e.eta_tau}")
    _check(e.target_mode in ENTROPY_TARGET_MODES,
           f"unknown ebb.target_mode '{e.target_mode}'; choose one of: {', '.join(ENTROPY_TARGET_MODES)}")
    if e.target_entropy is not None:
        _check(_finite(e.target_entropy) and e.target_entropy > 0,
               f"ebb.target_entropy must be > 0 (or null), got {e.target_entropy}")
        if e.target_mode == "fraction":
            _check(e.target_entropy <= 1,
                   f"ebb.target_entropy as a fraction of log K must be in (0, 1], got {e.target_entropy}")
    n = c.nlb
    _check(_finite(n.rho) and 0 < n.rho <= 1, f"nlb.rho must be in (0, 1], got {n.rho}")
    _check(_finite(n.beta) and n.beta >= 0, f"nlb.beta must be >= 0, got {n.beta}")
    _check(_finite(n.w_adv_init) and 0 <= n.w_adv_init <= 1, f"nlb.w_adv_init must be in [0, 1], got {n.w_adv_init}")
    _check(n.ref_window >= 1, f"nlb.ref_window must be >= 1, got {n.ref_window}")
    m = c.method
    _check(_finite(m.trades_beta) and m.trades_beta >= 0, f"method.trades_beta must be >= 0, got {m.trades_beta}")
    _check(_finite(m.ard_alpha) and 0 <= m.ard_alpha <= 1, f"method.ard_alpha must be in [0, 1], got {m.ard_alpha}")
    _check(_finite(m.ard_temperature) and m.ard_temperature > 0,
           f"method.ard_temperature must be > 0, got {m.ard_temperature}")
    o = c.optim
    _check(o.batch_size >= 1, f"optim.batch_size must be >= 1, got {o.batch_size}")
    _check(o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}")
    _check(_finite(o.lr) and o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(_finite(o.momentum) and 0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}")
    _check(_finite(o.weight_decay) and o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(_finite(o.gamma) and 0 < o.gamma <= 1, f"optim.gamma must be in (0, 1], got {o.gamma}")
    _check(list(o.milestones) == sorted(set(o.milestones)) and all(m_ > 0 for m_ in o.milestones),
           f"optim.milestones must be increasing positive epochs, got {list(o.milestones)}")
    for role in ("clean", "robust"):
        t: TeacherConfig = getattr(c.teachers, role)
        check_arch(t.arch, f"teachers.{role}.arch")
        _check(not t.pretrained or is_timm_ref(t.arch),
               f"teachers.{role}.pretrained needs a timm:<name> arch (pretrained weights come from timm), "
               f"got '{t.arch}'")
        _check(not (t.pretrained and t.checkpoint), f"teachers.{role}.pretrained starts a teacher the toolkit trains "
               f"from timm's weights; with teachers.{role}.checkpoint set it would be ignored: drop one of them")
        _check(t.train_method in TEACHER_TRAIN_METHODS,
               f"teachers.{role}.train_method must be natural, sat or trades, got '{t.train_method}'")
        _check(t.epochs >= 1 and t.batch_size >= 1 and t.lr > 0,
               f"teachers.{role}: epochs, batch_size and lr must be positive")
        if is_robustbench(t.checkpoint):  # resolved when loaded: the file may still be downloaded then
            robustbench_name(t.checkpoint)
            check_robustbench_dataset(t.checkpoint, c.data.dataset)
        elif t.checkpoint and t.checkpoint != "pyautoattack":
            _check(Path(t.checkpoint).is_file(), f"teachers.{role}.checkpoint {t.checkpoint} does not exist")
    v = c.eval
    for a in v.attacks:
        _check(a in ATTACK_NAMES, f"unknown eval attack '{a}'; choose from: {', '.join(ATTACK_NAMES)}")
    _check(v.headline in ATTACK_NAMES and v.headline != "clean",
           f"eval.headline must be a non-clean attack from: {', '.join(a for a in ATTACK_NAMES if a != 'clean')}")
    _check(_finite(v.eps) and v.eps >= 0, f"eval.eps must be >= 0, got {v.eps}")
    _check(v.batch_size >= 1, f"eval.batch_size must be >= 1, got {v.batch_size}")
    _check(v.n_examples is None or v.n_examples > 0, f"eval.n_examples must be positive or null, got {v.n_examples}")
    _check(min(c.val_every, c.checkpoint_every, c.checkpoint_every_iters) >= 0,
           "val_every and checkpoint_every(_iters) must be >= 0")
    _check(c.val_examples is None or c.val_examples > 0, f"val_examples must be positive or null, got {c.val_examples}")
    if c.val_every and c.data.val_size == 0:
        raise ConfigError("val_every > 0 needs a validation split: set data.val_size > 0 (or val_every=0)")
    return cfg
