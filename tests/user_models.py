"""Factories a user could write, named as ``user_models:<callable>`` by tests/test_model_refs.py.

Each takes ``num_classes`` and returns an ``nn.Module`` taking [0, 1] images (or fails the way it is named for).
"""
from __future__ import annotations

import torch.nn as nn


def tiny_net(num_classes: int) -> nn.Module:
    """A few thousand parameters: conv, pool, linear (any image size)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, num_classes))


def broken_net(num_classes: int) -> nn.Module:
    raise ValueError(f"no layout for {num_classes} classes\nsecond line")


def not_a_module(num_classes: int) -> object:
    return {"classes": num_classes}


def three_outputs(num_classes: int) -> nn.Module:
    """Ignores num_classes: the class-count check must catch it."""
    return tiny_net(3)


class Nets:
    @staticmethod
    def wide(num_classes: int) -> nn.Module:
        return tiny_net(num_classes)
