"""Structural re-parameterization: train a richer form of a small net, ship the small net.

A plain stack of convolutions with few channels and no normalization (CAM-Net) is hard to
optimize. During training each of its convolutions is replaced by a block that computes a
*linear* function of the same receptive field but is easier to optimize:

- a 3x3 branch, optionally widened ExpandNets-style (Guo et al. 2020): a 3x3 convolution to
  ``expand`` x the output channels followed by a 1x1 convolution back, with BatchNorm;
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

from .airnet import AirNet
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

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, padding: int = 1, expand: int = 1):
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"RepConv3x3 supports padding 0 or 1, got {padding}")
        if expand < 1:
            raise ValueError(f"expand must be at least 1, got {expand}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding, self.expand = stride, padding, expand
        hidden = out_channels * expand
        self.conv3 = nn.Conv2d(in_channels, hidden, 3, stride, padding, bias=False)
        self.project = nn.Conv2d(hidden, out_channels, 1, bias=False) if expand > 1 else None
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        """The input the 1x1 branch reads, so that its taps sit on the 3x3 kernel's centres."""
        return x if self.padding == 1 else x[..., 1:-1, 1:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.conv3(x)
        if self.project is not None:
            wide = self.project(wide)
        return self.bn3(wide) + self.bn1(self.conv1(self._centre(x)))

    @torch.no_grad()
    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight (C_out, C_in, 3, 3), bias (C_out,))`` of the one conv equal to this block in eval mode."""
        kernel = self.conv3.weight.double()
        if self.project is not None:
            kernel = torch.einsum("oh,hikl->oikl", self.project.weight.double()[:, :, 0, 0], kernel)
        weight3, bias3 = fuse_bn(kernel, self.bn3)
        weight1, bias1 = fuse_bn(self.conv1.weight.double(), self.bn1)
        weight = weight3 + F.pad(weight1, [1, 1, 1, 1])                      # 1x1 on the centre tap
        return weight.float(), (bias3 + bias1).float()


class RepCamNet(GapLinearClassifier):
    """CAM-Net in re-parameterizable training form; :meth:`reparameterize` gives the plain
    96,170-parameter ``camnet`` computing the same function (in eval mode)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, expand: int = 1, flip_tta: bool = False,
                 translate_tta: bool = False):
        super().__init__()
        self.num_classes, self.in_channels, self.expand = num_classes, in_channels, expand
        self.set_tta(flip_tta, translate_tta)  # the plain net keeps them
        self.features = nn.Sequential(
            RepConv3x3(in_channels, 128, stride=2, padding=1, expand=expand),
            nn.LeakyReLU(0.2),
            _same_maxpool_2x2(),
            RepConv3x3(128, 64, stride=2, padding=0, expand=expand),
            nn.LeakyReLU(0.2),
            _same_maxpool_2x2(),
            RepConv3x3(64, 32, stride=2, padding=0, expand=expand),
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


class RepBranchConv3x3(nn.Module):
    """Train-time stand-in for airnet's bias-free, Dirac-initialised 3x3 "same" convolution: the
    3x3 convolution and a 1x1 one on its centre tap, each followed by a BatchNorm without affine
    parameters, summed. Pure normalizations keep both branches scale-invariant, which airbench's
    large learning rate relies on; the relative weight of the branches needs no parameter of its
    own, since the BatchNorm after the block removes the scale of their sum. In eval mode the
    block is ``conv(x, weight) + bias``: :meth:`fold`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv3 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        nn.init.dirac_(self.conv3.weight.data[:in_channels])  # airnet's partial-identity start
        self.bn3 = nn.BatchNorm2d(out_channels, affine=False, momentum=0.4)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels, affine=False, momentum=0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))

    @torch.no_grad()
    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight (C_out, C_in, 3, 3), bias (C_out,))`` of the one conv equal to this block in eval mode."""
        total_weight, total_bias = 0, 0
        for conv, bn, pad in ((self.conv3, self.bn3, 0), (self.conv1, self.bn1, 1)):
            scale = torch.rsqrt(bn.running_var.double() + bn.eps)
            total_weight = total_weight + F.pad(conv.weight.double() * scale.reshape(-1, 1, 1, 1), [pad] * 4)
            total_bias = total_bias - bn.running_mean.double() * scale
        return total_weight.float(), total_bias.float()


class RepAirNet(AirNet):
    """airnet in re-parameterizable training form: every 3x3 convolution is a
    :class:`RepBranchConv3x3`. :meth:`reparameterize` gives the plain ``airnet`` of the same widths
    computing the same function in eval mode: each block folds into its convolution, and the block's
    bias into the running mean of the BatchNorm that follows it (after the max-pool, for a group's
    first convolution: a per-channel constant passes through max-pooling unchanged)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 widths: tuple[int, int, int] = (64, 256, 256), flip_tta: bool = False,
                 translate_tta: bool = False, residual: bool = False):
        super().__init__(num_classes, in_channels, widths, flip_tta, translate_tta, residual)
        self.arch_args = {"num_classes": num_classes, "in_channels": in_channels, "widths": tuple(widths),
                          "flip_tta": flip_tta, "translate_tta": translate_tta, "residual": residual}
        for group in self.features[2:]:
            for index in _conv_positions(group):
                conv = group[index]
                group[index] = RepBranchConv3x3(conv.in_channels, conv.out_channels)

    @torch.no_grad()
    def reparameterize(self) -> tuple[str, dict[str, Any], AirNet]:
        """The registry name and arguments of the plain net, and that net with the folded weights."""
        args = dict(self.arch_args, widths=list(self.arch_args["widths"]))
        if not args["residual"]:
            del args["residual"]
        plain = AirNet(**args)
        plain.load_state_dict(self.state_dict(), strict=False)  # whitening, norms, head
        for rep_group, plain_group in zip(self.features[2:], plain.features[2:]):
            for index in _conv_positions(rep_group):
                weight, bias = rep_group[index].fold()
                plain_group[index].weight.copy_(weight)
                norm = plain_group[index + 2 if index == 0 else index + 1]  # after the max-pool, or next
                norm.running_mean.sub_(bias)
        return "airnet", args, plain.train(self.training)


def _conv_positions(group: nn.Sequential) -> list[int]:
    """Indices of the 3x3 convolutions in an airnet conv group (conv, pool, BN, GELU, conv, BN, GELU[, conv, BN, GELU])."""
    return [index for index, layer in enumerate(group) if isinstance(layer, (nn.Conv2d, RepBranchConv3x3))]


register("airnet_rep")(RepAirNet)
