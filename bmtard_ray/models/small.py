"""Small CNNs for CPU runs and tests, and the input-normalisation layer every model carries.

``InputNormalization`` lives here (not in the package ``__init__``) so that the architecture modules can
import it without a circular import.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel, or the identity when no statistics are set.

    Inputs are images in [0, 1], so attacks keep their epsilons in pixel units and the normalisation is part
    of the differentiable model. The statistics are NON-persistent buffers: they follow ``.to(device)`` but
    stay out of ``state_dict()``, so our checkpoints keep exactly the key layout of the public ones.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.ones(1, 3, 1, 1), persistent=False)
        self.enabled = False
        if mean is not None and std is not None:
            self.set(mean, std)

    @torch.no_grad()
    def set(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> None:
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.mean.copy_(m.to(self.mean.device))
        self.std.copy_(s.to(self.std.device))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        if not self.enabled:
            return "identity"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    """A 4-conv VGG-style net (widths w, 2w, 4w, 8w) for the CPU preset.

    Each conv works at a quarter of the previous resolution, so every layer costs about the same: at
    ``width=32`` on 32x32 inputs the convolutions take 0.9 + 4.7 + 4.7 + 4.7 = 15.0 M multiply-adds.
    Global average pooling lets it run on 64x64 (Tiny-ImageNet) inputs unchanged.
    """

    def __init__(self, num_classes: int = 10, width: int = 32,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        w = width
        self.normalize = InputNormalization(mean, std)
        self.block1 = _conv_bn(3, w)
        self.block2 = _conv_bn(w, 2 * w)
        self.block3 = _conv_bn(2 * w, 4 * w)
        self.block4 = _conv_bn(4 * w, 8 * w)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalize(x)
        out = F.max_pool2d(self.block1(out), 2)
        out = F.max_pool2d(self.block2(out), 2)
        out = F.max_pool2d(self.block3(out), 2)
        out = self.block4(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class TinyCNN(nn.Module):
    """Two convs with BatchNorm and a linear head: milliseconds per batch, for tests."""

    def __init__(self, num_classes: int = 10, width: int = 8,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
