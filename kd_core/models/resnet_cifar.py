"""CIFAR ResNets of He et al. 2016 (section 4.2): 6n+2 layers, widths 16/32/64, identity
shortcuts with zero-padded channels (option A), so depth 20 has 0.27 M parameters."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import GapLinearClassifier, GapLinearHead
from .registry import register


class _ZeroPadShortcut(nn.Module):
    """Option A: subsample by 2 and pad the new channels with zeros; no parameters."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = _ZeroPadShortcut(out_channels - in_channels) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(GapLinearClassifier):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3,
                 widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
        ]
        channels = widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(channels, width, stride))
                channels = width
        self.features = nn.Sequential(*layers)  # (B, 64, H/4, W/4)
        self.head = GapLinearHead(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def _register_depth(depth: int) -> None:
    def factory(num_classes: int = 10, in_channels: int = 3, **kwargs) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, **kwargs)

    factory.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016)."
    register(f"resnet{depth}")(factory)


for _depth in (8, 14, 20, 32, 56):
    _register_depth(_depth)
