"""Wide ResNets with the parameter names of the two public robust teachers.

- ``WideResNet`` (``wrn34_10``): the TRADES layout (yaodongyu/TRADES ``models/wideresnet.py``): ``conv1``,
  ``block1..3.layer.N.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc`` -- and the extra ``sub_block1``
  that TRADES defines but never calls. Its weights are in TRADES' ``model_cifar_wrn.pt``, so it must exist
  for a strict load; it takes no part in ``forward``.
- ``DMWideResNet`` (``wrn70_16``): DeepMind's WRN of Gowal et al. 2020 as packaged by RobustBench
  (``init_conv``, ``layer.G.block.B.{batchnorm_0,conv_0,batchnorm_1,conv_1,shortcut}``, ``batchnorm``,
  ``logits``), Swish activations and TensorFlow-style "SAME" padding for the strided convs. RobustBench
  stores the normalisation as persistent ``mean``/``std`` buffers; ours are non-persistent, and
  ``load_weights`` moves a checkpoint's ``mean``/``std`` into the model's normaliser.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bmtard_ray.models.small import InputNormalization


class WRNBlock(nn.Module):
    """TRADES' pre-activation block. When the width changes, the activated input feeds both the conv and
    the 1x1 ``convShortcut``; otherwise the raw input is the identity shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride,
                                                                       padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(F.relu(self.bn2(out)))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WRNBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor, TRADES layout. ``WideResNet(10, 1)`` is a tiny WRN-10-1 for tests."""

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(3, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        # Unused in forward; kept so TRADES' checkpoint (which holds its weights) loads strictly.
        self.sub_block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():  # TRADES' initialisation (He-normal over fan-out, zero classifier bias)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    # Keys that may be absent from a checkpoint: other WRN-34-10 checkpoints often lack the unused sub-block.
    optional_checkpoint_prefixes = ("sub_block1.",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class DMBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"unsupported stride {stride}")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        # padding=0 here and an explicit pad in forward: TF "SAME" pads (0, 1) for stride 2, not (1, 1).
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None if in_planes == out_planes else nn.Conv2d(in_planes, out_planes, 1, stride=stride,
                                                                          padding=0, bias=False)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.silu(self.batchnorm_0(x))  # Swish = x * sigmoid(x)
        v = F.pad(act, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1))
        out = self.conv_1(F.silu(self.batchnorm_1(self.conv_0(v))))
        shortcut = x if self.shortcut is None else self.shortcut(act)
        return shortcut + out


class DMBlockGroup(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(*[DMBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """WRN-depth-width in DeepMind/RobustBench layout; ``DMWideResNet(70, 16)`` is Gowal et al.'s teacher."""

    def __init__(self, depth: int = 70, width: int = 16, num_classes: int = 10,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DMWideResNet depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * width, 32 * width, 64 * width]
        self.normalize = InputNormalization(mean, std)
        self.init_conv = nn.Conv2d(3, ch[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(DMBlockGroup(n, ch[0], ch[1], 1), DMBlockGroup(n, ch[1], ch[2], 2),
                                   DMBlockGroup(n, ch[2], ch[3], 2))
        self.batchnorm = nn.BatchNorm2d(ch[3])
        self.logits = nn.Linear(ch[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(self.init_conv(self.normalize(x)))
        out = F.silu(self.batchnorm(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.logits(out)
