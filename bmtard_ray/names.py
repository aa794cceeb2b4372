"""The registries of names a configuration may use: the floor every other module can read.

Validation (:mod:`bmtard_ray.config`) checks names against these tuples without importing the packages
that implement them (models, data, evaluation, training), so the bottom layer depends on nothing above it.
Each implementing module asserts that its own table matches the names here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeGuard

from bmtard_ray.errors import ConfigError

# Training methods, and the frozen teachers each one distils from (docs/algorithm.md §2 and §7).
METHOD_TEACHERS: dict[str, tuple[str, ...]] = {
    "bmtard": ("clean", "robust"),
    "mtard": ("clean", "robust"),
    "natural": (),
    "sat": (),
    "trades": (),
    "ard": ("robust",),
    "rslad": ("robust",),
}
METHOD_NAMES: tuple[str, ...] = tuple(METHOD_TEACHERS)
# How a teacher the toolkit trains itself is trained.
TEACHER_TRAIN_METHODS: tuple[str, ...] = ("natural", "sat", "trades")

MODEL_NAMES: tuple[str, ...] = ("resnet18", "mobilenetv2", "resnet56", "wrn34_10", "wrn70_16", "small_cnn", "tiny_cnn")
# Besides MODEL_NAMES, an architecture may be named by reference (README, "Your own models and data"):
# ``timm:<name>`` is a model of the timm library, ``<module>:<callable>`` a factory called with ``num_classes=K``.
# Only the syntax is checked here; bmtard_ray.models.refs imports and builds them.
TIMM_PREFIX = "timm:"
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_REF = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")
_TIMM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
DATASET_NAMES: tuple[str, ...] = ("cifar10", "cifar100", "tiny-imagenet", "imagefolder", "npz")
# Datasets given by reference (data.root names the user's own folder or .npz file): their classes, sizes and
# statistics come from the data itself (bmtard_ray.data.references), not from a table.
REFERENCE_DATASETS: tuple[str, ...] = ("imagefolder", "npz")

# Evaluation attacks of docs/algorithm.md §8; the black-box ones are crafted on a source model (the robust teacher).
ATTACK_NAMES: tuple[str, ...] = ("clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "autoattack", "square",
                                 "bb_pgd", "bb_cw")
BLACK_BOX: tuple[str, ...] = ("bb_pgd", "bb_cw")

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def is_model_ref(name: object) -> TypeGuard[str]:
    """Whether ``name`` names an architecture by reference (``timm:<name>`` or ``<module>:<callable>``)."""
    return isinstance(name, str) and ":" in name and not name.startswith("robustbench:")


def is_timm_ref(name: object) -> TypeGuard[str]:
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def check_arch(name: object, what: str) -> None:
    """``name`` is a built-in architecture or a well-formed reference; ``what`` names the key in errors."""
    if name in MODEL_NAMES:
        return
    if is_timm_ref(name):
        if not _TIMM_NAME.fullmatch(name[len(TIMM_PREFIX):]):
            raise ConfigError(f"{what} '{name}' is not a timm model name: write timm:<name>, e.g. timm:resnet18")
        return
    if isinstance(name, str) and name.startswith("robustbench:"):
        raise ConfigError(f"{what} '{name}' names a checkpoint, not an architecture: give it as a teacher's "
                          f"checkpoint (teachers.<role>.checkpoint)")
    if is_model_ref(name):
        if not _MODULE_REF.fullmatch(name):
            raise ConfigError(f"{what} '{name}' is not a model reference: write <module>:<callable> (a factory "
                              f"taking num_classes, e.g. my_models:small_net) or timm:<name>")
        return
    raise ConfigError(f"unknown {what} '{name}'; choose one of: {', '.join(MODEL_NAMES)}, timm:<name> or "
                      f"<module>:<callable>")


def arch_slug(name: str) -> str:
    """``name`` as a part of a folder name (a reference's ``:`` and other odd characters become ``-``)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-.") or "model"


def teacher_roles(method: str) -> tuple[str, ...]:
    """The teacher roles ``method`` needs (``()`` for the methods that train without teachers)."""
    return METHOD_TEACHERS[method]


# RobustBench model names as checkpoints, ``robustbench:<Name>`` (CIFAR-10/100, L-inf). RobustBench keeps a
# downloaded model at ``<model_dir>/<dataset>/Linf/<Name>.pt``; bmtard_ray.models.robustbench loads it.
ROBUSTBENCH_PREFIX = "robustbench:"
ROBUSTBENCH_THREAT_MODEL = "Linf"
ROBUSTBENCH_MODEL_DIR = "models"  # robustbench.utils.load_model's default, relative to the working directory
ROBUSTBENCH_DATASETS: tuple[str, ...] = ("cifar10", "cifar100")  # ours that RobustBench has L-inf models for
# The statistics RobustBench's DMWideResNet normalises with (robustbench/model_zoo/architectures/dm_wide_resnet.py).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class KnownModel:
    """The architecture (a MODEL_NAMES entry) and input normalisation of a RobustBench model."""
    arch: str
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


# The names whose architecture the toolkit knows: the paper's robust teachers and their families.
ROBUSTBENCH_KNOWN: dict[str, dict[str, KnownModel]] = {
    "cifar10": {
        # TRADES' WRN-34-10 (the paper's CIFAR-10 robust teacher): WideResNet(34, 10, sub_block1=True), [0, 1] inputs
        "Zhang2019Theoretically": KnownModel("wrn34_10"),
        # Gowal et al. 2020, WRN-70-16 (DeepMind layout, Swish)
        "Gowal2020Uncovering_70_16": KnownModel("wrn70_16", CIFAR10_MEAN, CIFAR10_STD),
        "Gowal2020Uncovering_70_16_extra": KnownModel("wrn70_16", CIFAR10_MEAN, CIFAR10_STD),
    },
    "cifar100": {
        # the paper's CIFAR-100 robust teacher and its extra-data sibling
        "Gowal2020Uncovering": KnownModel("wrn70_16", CIFAR100_MEAN, CIFAR100_STD),
        "Gowal2020Uncovering_extra": KnownModel("wrn70_16", CIFAR100_MEAN, CIFAR100_STD),
    },
}


def is_robustbench(spec: str | None) -> TypeGuard[str]:
    return bool(spec) and str(spec).startswith(ROBUSTBENCH_PREFIX)


def robustbench_name(spec: str) -> str:
    """The RobustBench name in ``robustbench:<Name>`` (a bare name: no folder, no extension)."""
    name = spec[len(ROBUSTBENCH_PREFIX):]
    if not name or "/" in name or "\\" in name or name.endswith(".pt") or name.strip() != name:
        raise ConfigError(f"'{spec}' is not a RobustBench model name: write robustbench:<Name>, "
                          f"e.g. robustbench:Zhang2019Theoretically")
    return name


def check_robustbench_dataset(spec: str, dataset: str) -> None:
    if dataset not in ROBUSTBENCH_DATASETS:
        raise ConfigError(f"{spec}: RobustBench has no L-inf models for dataset '{dataset}' here "
                          f"(only {', '.join(ROBUSTBENCH_DATASETS)})")


def known_robustbench_model(spec: str, dataset: str) -> KnownModel | None:
    """The architecture and normalisation of a name this toolkit knows, else None."""
    return ROBUSTBENCH_KNOWN.get(dataset, {}).get(robustbench_name(spec))


def apply_checkpoint_archs(cfg: Any, explicit: set[str]) -> Any:
    """A teacher checkpoint that names its architecture (a name in ``ROBUSTBENCH_KNOWN``) sets
    ``teachers.<role>.arch`` of the RunConfig ``cfg`` (in place); an explicitly given arch that contradicts it
    is an error."""
    for role in ("clean", "robust"):
        tc = getattr(cfg.teachers, role)
        known = known_robustbench_model(tc.checkpoint, cfg.data.dataset) if is_robustbench(tc.checkpoint) else None
        if known is None:
            continue
        key = f"teachers.{role}.arch"
        if key in explicit and tc.arch != known.arch:
            raise ConfigError(f"teachers.{role}.checkpoint {tc.checkpoint} is a '{known.arch}' model; "
                              f"{key}={tc.arch} contradicts it")
        tc.arch = known.arch
    return cfg


# Defaults that depend on the dataset, resolved once by config.build_config after every layer: a key that no
# preset, config file or override sets takes its value for the run's dataset (datasets not listed keep the
# field's default); explicit values always win. The released CIFAR-100 code multiplies both losses by 10.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {"loss.scale": {"cifar100": 10.0}}
