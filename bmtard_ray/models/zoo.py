"""Students and teachers by name: the builders behind ``build_model``."""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from bmtard_ray.errors import ConfigError
from bmtard_ray.models.mobilenetv2 import MobileNetV2
from bmtard_ray.models.refs import build_ref
from bmtard_ray.models.resnet import ProjectionResNet56, ResNet18, ResNet56
from bmtard_ray.models.small import SmallCNN, TinyCNN
from bmtard_ray.models.wideresnet import DMWideResNet, WideResNet
from bmtard_ray.names import MODEL_NAMES, check_arch, is_model_ref

Stats = Sequence[float] | None


_BUILDERS: dict[str, Callable[[int, Stats, Stats], nn.Module]] = {
    "resnet18": lambda k, m, s: ResNet18(k, mean=m, std=s),  # kuangliu layout, pyautoattack's model_test.pt
    "mobilenetv2": lambda k, m, s: MobileNetV2(k, mean=m, std=s),  # kuangliu CIFAR layout
    "resnet56": lambda k, m, s: ResNet56(k, mean=m, std=s),  # akamaster layout, option-A shortcuts
    "wrn34_10": lambda k, m, s: WideResNet(34, 10, k, mean=m, std=s),  # TRADES layout incl. sub_block1
    "wrn70_16": lambda k, m, s: DMWideResNet(70, 16, k, mean=m, std=s),  # DeepMind/RobustBench layout, Swish
    "small_cnn": lambda k, m, s: SmallCNN(k, mean=m, std=s),  # ~15 M multiply-adds at 32x32
    "tiny_cnn": lambda k, m, s: TinyCNN(k, mean=m, std=s),  # for tests
}
assert tuple(_BUILDERS) == MODEL_NAMES

# Architectures whose public checkpoints come in more than one parameter layout. The first layout is the one
# build_model makes by default (and the toolkit trains); load_pretrained picks the layout a file's keys have.
LAYOUTS: dict[str, dict[str, Callable[[int, Stats, Stats], nn.Module]]] = {
    "resnet56": {
        "option_a": _BUILDERS["resnet56"],
        # the MTARD repository's cifar10_nat_teacher_models (the paper's clean teacher), chenyaofo's models
        "projection": lambda k, m, s: ProjectionResNet56(k, mean=m, std=s),
    },
}


def _check_stats(name: str, values: Stats) -> tuple[float, float, float] | None:
    if values is None:
        return None
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be 3 numbers (one per RGB channel), got {values!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{name} must be 3 finite numbers (one per RGB channel), got {values!r}")
    return out[0], out[1], out[2]


def build_model(name: str, num_classes: int, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, layout: str | None = None, pretrained: bool = False,
                default_stats: tuple[Sequence[float], Sequence[float]] | None = None) -> nn.Module:
    """A freshly initialised model by name; ``mean``/``std`` (both or neither) normalise [0, 1] inputs inside.

    ``layout`` chooses among the parameter layouts of an architecture listed in ``LAYOUTS`` (default: its first).
    ``name`` may also be a reference (``timm:<name>``, ``<module>:<callable>``: models.refs); ``pretrained``
    (timm only) starts from timm's weights, and ``default_stats`` (the dataset's mean/std) normalise a timm model
    whose statistics neither ``mean``/``std`` nor its pretrained weights give.
    """
    if name not in _BUILDERS:
        check_arch(name, "model")  # one line for a malformed reference or an unknown name
    variants = LAYOUTS.get(name, {})
    if layout is not None and layout not in variants:
        known = ", ".join(variants) if variants else "none (it has one layout)"
        raise ConfigError(f"model '{name}' has no layout '{layout}'; layouts: {known}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    m, s = _check_stats("mean", mean), _check_stats("std", std)
    if (m is None) != (s is None):
        raise ConfigError("give both mean and std for input normalisation, or neither")
    if s is not None and min(s) <= 0:
        raise ConfigError(f"std must be positive, got {std!r}")
    if is_model_ref(name):
        model = build_ref(name, int(num_classes), stats=(m, s) if m is not None and s is not None else None,
                          pretrained=pretrained, default_stats=default_stats)
    elif pretrained:
        raise ConfigError(f"model '{name}' has no pretrained weights here (only timm:<name> models do)")
    else:
        builder = variants[layout] if layout is not None else _BUILDERS[name]
        model = builder(int(num_classes), m, s)
    model.arch_name = name  # named in load_weights' errors
    model.layout = layout or next(iter(variants), None)
    return model


def _weight_keys(keys: Iterable[str]) -> set[str]:
    # BN counters may be absent (PyTorch < 0.4.1); mean/std are RobustBench's normalisation buffers.
    return {k for k in keys if not k.endswith("num_batches_tracked")} - {"mean", "std"}


def layout_for_keys(name: str, keys: set[str] | Sequence[str]) -> str | None:
    """The layout of ``name`` whose parameter names are exactly ``keys``, or None (built on the meta device)."""
    wanted = _weight_keys(keys)
    for layout in LAYOUTS.get(name, {}):
        with torch.device("meta"):
            candidate = build_model(name, 10, layout=layout)
        if _weight_keys(candidate.state_dict().keys()) == wanted:
            return layout
    return None


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; shared ones once)."""
    return sum(p.numel() for p in model.parameters())
