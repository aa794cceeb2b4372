"""Teachers: loading the frozen ones a run distils from, and training the ones it lacks.

Loading: a teacher is any model file the loader of :mod:`bmtard_ray.models.files` reads (ours, a public
state dict, or the pyautoattack ResNet-18), frozen on the device. Training: a teacher with no checkpoint is
trained once (natural training for the clean teacher, SAT or TRADES for the robust one) on the training split
(never the validation or test split) and cached under a folder named by a hash of everything that determines
it, so every later run, trial or worker reuses it.

A cache entry appears whole or not at all: a teacher is trained in ``<cache>/.incomplete/<name>`` (where an
interrupted Ray teacher run resumes from its checkpoint) and renamed into place once its ``model.pt`` and
``teacher.json`` (the entry's format version) are written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bmtard_ray.config import MethodConfig, RunConfig, TeacherConfig, from_dict, teacher_cache_dir, to_dict
from bmtard_ray.data import DatasetInfo, Split
from bmtard_ray.data.references import scan
from bmtard_ray.errors import CheckpointError, ConfigError
from bmtard_ray.evaluation.probe import chance_warning, probe_accuracy
from bmtard_ray.models import build_model
from bmtard_ray.models.files import PYAUTOATTACK, LoadedModel, load_model
from bmtard_ray.models.refs import check_outputs, check_pretrained
from bmtard_ray.names import REFERENCE_DATASETS, ROBUSTBENCH_MODEL_DIR, arch_slug, is_model_ref, teacher_roles
from bmtard_ray.runtime import fileio
from bmtard_ray.runtime.device import select_device

# Runs a training config to completion; must leave <output_dir>/<name>/model.pt behind.
RunFn = Callable[[RunConfig], object]
BUILDING = ".incomplete"                      # where teachers train before their entry is renamed into place
ENTRY_FILE = "teacher.json"                   # written last into a complete entry
ENTRY_FORMAT = "bmtard_ray.teacher_cache/1"

# Part of every cache key. Bump it when a change to the toolkit alters what the same teacher configuration
# trains, so that no teacher trained under the old rules is reused. 2: milestones decay after the milestone
# epoch (as released) and SAT's uniform start is clamped to [0, 1]; the key no longer holds the student's method.
TEACHER_RULES_VERSION = 2
# Data settings that do not change the training set a teacher sees.
_DATA_NOT_IN_KEY = {"root": None, "download": None, "test_subset": None}
# Keys added after caches were written: left out of the key at these values, so that existing keys stand.
_DATA_KEY_SINCE = {"image_size": None, "memory_budget_mb": ..., "cache_dir": ...}  # ...: never in the key
# Teacher settings added after caches were written: left out of the key at their default, so that a teacher
# cached before them keeps its name (tests/test_teachers.py pins one key).
_TEACHER_KEY_SINCE = {"pretrained": False}


def since(d: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """``d`` without the keys in ``added`` that hold the value they are left out at (``...``: always left out)."""
    return {k: v for k, v in d.items() if k not in added or (added[k] is not ... and v != added[k])}


def data_key(cfg: RunConfig) -> dict[str, Any]:
    """The data settings that decide a teacher's training set. For imagefolder and npz the name says nothing
    of the images: the key holds the data's own content key (path, files' names, sizes, mtimes, resize)."""
    d = to_dict(cfg.data)
    key = since(d, _DATA_KEY_SINCE) | _DATA_NOT_IN_KEY
    if cfg.data.dataset in REFERENCE_DATASETS:
        key["content"] = scan(cfg.data.dataset, cfg.data.root, cfg.data.image_size).key
    return key


def freeze(model: nn.Module) -> nn.Module:
    """A teacher: eval mode for good, no parameter wants a gradient."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_teacher_file(role: str, tc: TeacherConfig, info: DatasetInfo, model_dir: str) -> LoadedModel:
    """The teacher's checkpoint (ours, a public one, the pyautoattack ResNet-18, or a RobustBench name looked
    up under ``model_dir``), loaded on the CPU."""
    if not tc.checkpoint:
        raise ConfigError(f"no checkpoint for the {role} teacher: run through run_train.py (which trains and caches "
                          f"the teachers) or set teachers.{role}.checkpoint")
    # One loader for every model file: our own format carries its architecture and normalisation.
    return load_model(tc.checkpoint, None if tc.checkpoint == PYAUTOATTACK else tc.arch, info.num_classes,
                      dataset=info.name, mean=tc.mean, std=tc.std, role=f"{role} teacher", model_dir=model_dir,
                      default_stats=(info.mean, info.std))


def load_teacher(role: str, tc: TeacherConfig, info: DatasetInfo, device: torch.device,
                 model_dir: str = ROBUSTBENCH_MODEL_DIR) -> nn.Module:
    """A frozen teacher on ``device`` from its checkpoint (see _load_teacher_file)."""
    return freeze(_load_teacher_file(role, tc, info, model_dir).model.to(device))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_model_refs(cfg: RunConfig, info: DatasetInfo) -> None:
    """Build every model the run names by reference (the student, each teacher it trains) on the CPU and run
    one image of the dataset's size through it, so an import, a factory or a class count that fails does so
    before anything is written; pretrained weights asked for must be cached or the hub reachable (no download)."""
    trained: list[TeacherConfig] = [getattr(cfg.teachers, r) for r in teacher_roles(cfg.method.name)]
    wanted = [(cfg.student, cfg.student_pretrained, f"student {cfg.student}")]
    wanted += [(tc.arch, tc.pretrained, f"{r} teacher {tc.arch}") for r, tc in zip(teacher_roles(cfg.method.name),
                                                                                      trained, strict=True)
               if not tc.checkpoint]
    for arch, pretrained, what in wanted:
        if not is_model_ref(arch):
            continue
        if pretrained:
            check_pretrained(arch)
        check_outputs(build_model(arch, info.num_classes, default_stats=(info.mean, info.std)), info.num_classes,
                      info.image_size, what)


def check_given_teachers(cfg: RunConfig, info: DatasetInfo, probe: Split | None = None,
                         warn: Callable[[str], None] = _warn) -> None:
    """Load every teacher the user pointed at (on the CPU) so a bad file fails before anything is trained.

    With ``probe`` (the validation split), each public one is also run on a few hundred of its images, and a
    teacher near chance gets a warning: strict loading checks the layout, not the input normalisation the
    weights expect (our own model files record theirs).
    """
    check_model_refs(cfg, info)
    for role in teacher_roles(cfg.method.name):
        tc: TeacherConfig = getattr(cfg.teachers, role)
        if not tc.checkpoint:
            continue
        loaded = _load_teacher_file(role, tc, info, cfg.teachers.model_dir)
        if is_model_ref(loaded.arch):
            check_outputs(loaded.model, info.num_classes, info.image_size, f"the {role} teacher {tc.checkpoint}")
        if probe is None or len(probe) == 0 or loaded.record is not None:
            continue
        device = select_device(cfg.device)
        accuracy, n = probe_accuracy(loaded.model.to(device), probe, device)
        hint = (f"set teachers.{role}.mean/std if it was trained on normalised inputs, or leave them unset if "
                f"it was not (run_eval.py: --mean/--std)")
        message = chance_warning(f"the {role} teacher {tc.checkpoint}", accuracy, n, info.num_classes, hint)
        if message:
            warn(message)


def teacher_config(cfg: RunConfig, role: str) -> RunConfig:
    """The RunConfig that trains the ``role`` teacher for ``cfg``'s dataset and data split."""
    tc: TeacherConfig = getattr(cfg.teachers, role)
    t = from_dict(to_dict(cfg))
    # A teacher trains with its own method at that method's defaults: nothing in the student's method section
    # (its name, TRADES' beta, ARD's alpha, ...) may change which teacher a run gets.
    t.method = MethodConfig(name=tc.train_method)
    t.student, t.student_pretrained = tc.arch, tc.pretrained
    t.optim.epochs, t.optim.lr, t.optim.batch_size, t.optim.milestones = tc.epochs, tc.lr, tc.batch_size, tc.milestones
    t.trace = False
    t.val_every = 0
    t.checkpoint_every = 1
    t.eval.attacks = ("clean", "pgd_sat")
    t.eval.n_examples = min(cfg.eval.n_examples or 1000, 1000)
    # Only what determines the weights goes into the key (not names, folders, evaluation settings, the
    # normalisation of a given checkpoint, or the student's method): runs of different methods share teachers.
    key = {"rules": TEACHER_RULES_VERSION, "role": role,
           "teacher": since(to_dict(tc), _TEACHER_KEY_SINCE) | {"checkpoint": None, "mean": None, "std": None},
           "data": data_key(cfg),
           "attack": None if tc.train_method == "natural" else to_dict(cfg.attack),  # natural training has none
           "method": to_dict(t.method), "optim": {"momentum": cfg.optim.momentum,
           "weight_decay": cfg.optim.weight_decay, "gamma": cfg.optim.gamma}, "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    # The digest holds the full architecture name (a reference's too); the folder name a readable form of it.
    t.name = f"{role}-{arch_slug(tc.arch)}-{tc.train_method}-{tc.epochs}ep-{digest}"
    t.output_dir = teacher_cache_dir(cfg)
    t.teachers = type(cfg.teachers)()  # a teacher needs no teachers
    return t


def cached_path(cfg: RunConfig, role: str) -> Path:
    t = teacher_config(cfg, role)
    return Path(t.output_dir) / t.name / "model.pt"


def roles_to_train(cfg: RunConfig) -> list[str]:
    """The teachers ``cfg`` needs that have neither a checkpoint nor a cache entry (they will be trained)."""
    return [role for role in teacher_roles(cfg.method.name)
            if not getattr(cfg.teachers, role).checkpoint and not cached_path(cfg, role).is_file()]


def check_entry(entry: Path) -> None:
    """A cache entry written under another format refuses with one line; one from before entries carried
    a format (a ``model.pt`` alone: it was written last, so the entry is whole) is used as is."""
    meta = entry / ENTRY_FILE
    if not meta.is_file():
        return
    try:
        found = json.loads(meta.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != ENTRY_FORMAT:
        raise CheckpointError(f"teacher cache entry {entry} has format {found!r}, this version reads {ENTRY_FORMAT}: "
                              "remove the folder to train that teacher again")


def build_entry(tcfg: RunConfig, run: RunFn, role: str) -> Path:
    """Train a teacher in the cache's building area and rename it into place when complete."""
    final = Path(tcfg.output_dir) / tcfg.name
    building = from_dict(to_dict(tcfg))
    building.output_dir = str(Path(tcfg.output_dir) / BUILDING)
    built = Path(building.output_dir) / building.name
    run(building)
    if not (built / "model.pt").is_file():
        raise RuntimeError(f"training the {role} teacher did not produce {built / 'model.pt'}")
    fileio.atomic_text(json.dumps({"format": ENTRY_FORMAT, "role": role, "name": tcfg.name}) + "\n", built / ENTRY_FILE)
    if (final / "model.pt").is_file():  # another run finished the same teacher meanwhile: keep theirs
        shutil.rmtree(built, ignore_errors=True)
        return final / "model.pt"
    if final.exists():                  # a half-made entry left by a version without this rule
        shutil.rmtree(final)
    os.replace(built, final)
    return final / "model.pt"


def ensure_teachers(cfg: RunConfig, run: RunFn, log: Callable[[str], None] = print) -> RunConfig:
    """Return ``cfg`` with every needed teacher's checkpoint set, training missing ones through ``run``."""
    out = from_dict(to_dict(cfg))
    for role in teacher_roles(cfg.method.name):
        tc: TeacherConfig = getattr(out.teachers, role)
        if tc.checkpoint:
            continue
        path = cached_path(cfg, role)
        if path.is_file():
            check_entry(path.parent)
            log(f"{role} teacher: reusing {path}")
        else:
            log(f"{role} teacher: training {tc.arch} with {tc.train_method} for {tc.epochs} epochs -> {path}")
            build_entry(teacher_config(cfg, role), run, role)
            log(f"{role} teacher: cached at {path}")
        tc.checkpoint = str(path)
        # A trained teacher's normalisation is whatever it was trained with (none for our models).
    return out
