"""CIFAR ResNets whose parameter names match the public checkpoints.

- ``ResNet18``: the kuangliu/pytorch-cifar layout (``conv1, bn1, layer1..4`` with ``shortcut``, ``linear``),
  the layout of pyautoattack's ``model_test.pt`` and of most adversarial-distillation code.
- ``ResNet56``: the akamaster/pytorch_resnet_cifar10 layout (16-32-64 channels, ``conv1, bn1, layer1..3,
  linear``, parameter-free "option A" shortcuts), the layout of the widely used ResNet-56 checkpoints.
- ``ProjectionResNet56``: the layout of the MTARD repository's ``cifar10_nat_teacher_models/resnet.py`` (the
  paper's clean teacher; also chenyaofo/pytorch-cifar-models): same stages, torchvision-style blocks whose
  shortcut, where the shape changes, is a 1x1 conv + BN ``downsample`` Sequential, and a classifier ``fc``.
  ``--arch resnet56`` loads either: the checkpoint's keys choose (:func:`bmtard_ray.models.load_pretrained`).

Both pool adaptively (identical to the original fixed pooling on 32x32), so 64x64 inputs work too.
Residual additions are out of place so that no autograd-saved tensor is overwritten.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bmtard_ray.models.small import InputNormalization


class BasicBlock(nn.Module):
    """kuangliu's block: the projection shortcut (conv1x1 + BN) lives in a ``shortcut`` Sequential."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    layer1: nn.Sequential  # set by name in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, num_classes: int = 10, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
            blocks = [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class OptionABlock(nn.Module):
    """akamaster's block. Its downsampling shortcut has no parameters: take every second pixel and
    zero-pad the channels (planes // 4 on each side), so state-dict keys are only conv1/bn1/conv2/bn2."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = stride != 1 or in_planes != planes
        self.pad = planes // 4

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.downsample:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet56(nn.Module):
    """ResNet-6n+2 for CIFAR (He et al. 2016, option A); ``n=9`` gives ResNet-56 (0.85 M parameters)."""
    layer1: nn.Sequential  # set by name in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential


    def __init__(self, num_classes: int = 10, n: int = 9, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for i, (planes, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
            blocks = [OptionABlock(in_planes if j == 0 else planes, planes, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.linear = nn.Linear(64, num_classes)
        # akamaster initialises convs and the classifier with Kaiming-normal; training from scratch follows it.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class ProjectionBlock(nn.Module):
    """torchvision's BasicBlock as the MTARD repository uses it: ``downsample`` (conv1x1 + BN) only where the
    stride or the width changes, else the identity."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ProjectionResNet56(nn.Module):
    """ResNet-6n+2 for CIFAR in the MTARD repository's layout (projection shortcuts, ``fc``); 0.86 M parameters.

    The authors' clean-teacher checkpoint was trained on [0, 1] inputs without normalisation; the same layout's
    chenyaofo checkpoints were trained with CIFAR mean/std (give ``mean``/``std`` for those).
    """
    layer1: nn.Sequential  # set by name in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential


    def __init__(self, num_classes: int = 10, n: int = 9, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for i, (planes, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
            blocks = [ProjectionBlock(in_planes if j == 0 else planes, planes,
                                      stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # the authors' initialisation (torchvision's)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
