"""Structural re-parameterization: train a richer form of a small net, ship the small net.

A plain stack of convolutions with few channels and no normalization (CAM-Net) is hard to
optimize. During training each of its convolutions is replaced by a block that computes a
*linear* function of the same receptive field but is easier to optimize:

- the 3x3 convolution, with BatchNorm;
- a 1x1 branch on the 3x3 kernel's centre tap, with BatchNorm (RepVGG, Ding et al. 2021).

In eval mode every block is an affine map with a 3x3 support, so it folds exactly into one 3x3
convolution with bias (:meth:`RepConv3x3.fold`), and the trained net folds into the plain
architecture it stands for (:meth:`RepCamNet.reparameterize`), with the same parameter count and
MACs as if it had been trained directly. :func:`kd_core.run.run` folds before it evaluates and
writes the checkpoint, so what ships, and what CI re-checks, is the plain net.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import GapLinearClassifier, GapLinearHead
from .registry import register
from .small import CamNet, _same_maxpool_2x2


def fuse_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weight, bias) of ``bn(conv(x))`` for a bias-free conv with ``weight``, BN in eval mode,
    computed in ``weight``'s dtype."""
    gamma, beta, mean, var = (t.to(weight.dtype) for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    scale = gamma / torch.sqrt(var + bn.eps)                                 # (C_out,)
    return weight * scale.reshape(-1, 1, 1, 1), beta - mean * scale


class RepConv3x3(nn.Module):
    """Train-time stand-in for ``nn.Conv2d(c_in, c_out, 3, stride, padding)`` (padding 0 or 1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, padding: int = 1):
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"RepConv3x3 supports padding 0 or 1, got {padding}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding = stride, padding
        self.conv3 = nn.Conv2d(in_channels, out_channels, 3, stride, padding, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        # the stride is taken by _centre: torch 2.14's CPU kernel for a strided 1x1 convolution on a
        # 3-channel channels-last input corrupts the heap on AVX2 CPUs at one thread (a crash in training)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        """The pixels the 1x1 branch reads, so that its taps sit on the 3x3 kernel's centres:
        what ``nn.Conv2d(..., 1, stride)`` would read of the input (cropped by 1 for padding 0)."""
        x = x if self.padding == 1 else x[..., 1:-1, 1:-1]
        return x if self.stride == 1 else x[..., ::self.stride, ::self.stride]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn3(self.conv3(x)) + self.bn1(self.conv1(self._centre(x)))

    @torch.no_grad()
    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight (C_out, C_in, 3, 3), bias (C_out,))`` of the one conv equal to this block in eval mode."""
        weight3, bias3 = fuse_bn(self.conv3.weight.double(), self.bn3)
        weight1, bias1 = fuse_bn(self.conv1.weight.double(), self.bn1)
        weight = weight3 + F.pad(weight1, [1, 1, 1, 1])                      # 1x1 on the centre tap
        return weight.float(), (bias3 + bias1).float()


class RepCamNet(GapLinearClassifier):
    """CAM-Net in re-parameterizable training form; :meth:`reparameterize` gives the plain
    96,170-parameter ``camnet`` computing the same function (in eval mode)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, flip_tta: bool = False,
                 translate_tta: bool = False):
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.set_tta(flip_tta, translate_tta)  # the plain net keeps them
        self.features = nn.Sequential(
            RepConv3x3(in_channels, 128, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            _same_maxpool_2x2(),
            RepConv3x3(128, 64, stride=2, padding=0),
            nn.LeakyReLU(0.2),
            _same_maxpool_2x2(),
            RepConv3x3(64, 32, stride=2, padding=0),
        )
        self.head = GapLinearHead(32, num_classes)

    @torch.no_grad()
    def reparameterize(self) -> tuple[str, dict[str, Any], CamNet]:
        """The registry name and arguments of the plain net, and that net with the folded weights."""
        args = {"num_classes": self.num_classes, "in_channels": self.in_channels}
        if self.flip_tta:
            args.update(flip_tta=True, translate_tta=self.translate_tta)
        plain = CamNet(**args)
        for index in (0, 3, 6):
            weight, bias = self.features[index].fold()
            plain.features[index].weight.copy_(weight)
            plain.features[index].bias.copy_(bias)
        plain.head.load_state_dict(self.head.state_dict())
        return "camnet", args, plain.train(self.training)


register("camnet_rep")(RepCamNet)
