"""The registries of names a configuration may use: the floor every other module can read.

Validation (:mod:`bmtard_ray.config`) checks names against these tuples without importing the packages
that implement them (models, data, evaluation, engine), so the bottom layer depends on nothing above it.
Each implementing module asserts that its own table matches the names here.
"""
from __future__ import annotations

# Training methods, and the frozen teachers each one distils from (REFERENCE §1 and §4).
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
DATASET_NAMES: tuple[str, ...] = ("cifar10", "cifar100", "tiny-imagenet")

# Evaluation attacks of REFERENCE §5; the black-box ones are crafted on a source model (the robust teacher).
ATTACK_NAMES: tuple[str, ...] = ("clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "autoattack", "square",
                                 "bb_pgd", "bb_cw")
BLACK_BOX: tuple[str, ...] = ("bb_pgd", "bb_cw")

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def teacher_roles(method: str) -> tuple[str, ...]:
    """The teacher roles ``method`` needs (``()`` for the methods that train without teachers)."""
    return METHOD_TEACHERS[method]
