"""A user's own model code: factories that bmtard_ray builds by reference, as ``my_models:<callable>``.

A factory takes ``num_classes`` (as a keyword) and returns an ``nn.Module`` that takes images in [0, 1].
This one normalises its inputs itself, as the toolkit's own models do.
"""
from __future__ import annotations

import torch
from torch import nn


class SmallConvNet(nn.Module):
    """Three conv blocks and a linear head; any square image size."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1), persistent=False)

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - self.mean) / self.std))


def small_convnet(num_classes: int) -> nn.Module:
    return SmallConvNet(num_classes)
