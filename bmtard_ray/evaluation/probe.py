"""A quick clean-accuracy probe of a loaded model, and the warning when it is near chance.

A checkpoint's keys say which layout it has, not whether its weights expect normalised inputs (the MTARD
repository's ResNet-56 was trained on [0, 1] images, chenyaofo's models of the same layout on normalised
ones). A model given the wrong normalisation loads strictly and then classifies at about chance, which a few
hundred validation images show in a second or two.
"""
from __future__ import annotations

import torch
from torch import nn

from bmtard_ray.data import Split, stratified_subset

PROBE_EXAMPLES = 256  # enough to tell chance (10 % on CIFAR-10, std ~2 %) from a working model


@torch.no_grad()
def probe_accuracy(model: nn.Module, split: Split, device: torch.device, *, n: int | None = None, seed: int = 0,
                   batch_size: int = 128) -> tuple[float, int]:
    """(clean accuracy in percent, images used) of ``model`` in eval mode on a stratified subset of ``split``
    (``PROBE_EXAMPLES`` images unless ``n``)."""
    subset = stratified_subset(split, PROBE_EXAMPLES if n is None else n, seed)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(subset), batch_size):
            x = subset.read_range(i, i + batch_size).to(device).float().div_(255)
            y = subset.labels[i:i + batch_size].to(device)
            correct += int((model(x).argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return (100.0 * correct / len(subset) if len(subset) else float("nan")), len(subset)


def near_chance(accuracy: float, num_classes: int) -> bool:
    """At most twice the chance rate: what a model fed inputs normalised other than in training scores."""
    return accuracy <= 2 * 100.0 / num_classes


def chance_warning(what: str, accuracy: float, n: int, num_classes: int, hint: str,
                   split: str = "validation") -> str | None:
    """The one-line warning for ``what`` (e.g. "the clean teacher x.pt") when its accuracy is near chance."""
    if n == 0 or not near_chance(accuracy, num_classes):
        return None
    return (f"{what} classifies {accuracy:.1f} % of {n} {split} images correctly, near chance "
            f"({100 / num_classes:.0f} %): its input normalisation is probably wrong; {hint}")
