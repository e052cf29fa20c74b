"""``airnet``: the fast CIFAR teacher, after Keller Jordan's airbench94/96 (arXiv:2404.00498).

A VGG-like net (no residuals by default): a 2x2 patch-whitening convolution initialised from the training
images (weights and bias kept frozen), then three conv groups (64, 256, 256 channels) of
conv -> maxpool -> BN -> GELU -> conv -> BN -> GELU, a global max pool and a bias-free linear head
scaled by 1/9. BatchNorm scales stay fixed at one, so every conv is scale-invariant and trains
well at the large learning rates that make the recipe fast. Convs start as partial identities
(Dirac init), as in airbench. ``residual=True`` adds airbench96's third conv -> BN -> GELU to each
group, its last two convs forming a residual branch around the first's output.

``flip_tta``/``translate_tta``: airbench's test-time augmentation of the prediction (the mirror
image, then also one-pixel shifts; :meth:`Classifier.set_tta`), about one point more on CIFAR-10.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Classifier
from .registry import register


class _FixedScaleBatchNorm(nn.BatchNorm2d):
    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class _DiracConv(nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: self.in_channels])


class _ConvGroup(nn.Sequential):
    """conv -> maxpool -> BN -> GELU -> conv -> BN -> GELU; with ``residual=True`` (airbench96) a
    third conv -> BN -> GELU follows and the last two convs' output is added to the first's."""

    def __init__(self, in_channels: int, out_channels: int, residual: bool = False):
        layers = [_DiracConv(in_channels, out_channels), nn.MaxPool2d(2),
                  _FixedScaleBatchNorm(out_channels), nn.GELU(),
                  _DiracConv(out_channels, out_channels), _FixedScaleBatchNorm(out_channels), nn.GELU()]
        if residual:
            layers += [_DiracConv(out_channels, out_channels), _FixedScaleBatchNorm(out_channels), nn.GELU()]
        super().__init__(*layers)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.residual:
            return super().forward(x)
        layers = list(self)
        shortcut = x
        for layer in layers[:4]:
            shortcut = layer(shortcut)
        out = shortcut
        for layer in layers[4:]:
            out = layer(out)
        return out + shortcut


class _GlobalMaxLinearHead(nn.Module):
    def __init__(self, channels: int, num_classes: int, scale: float):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes, bias=False)
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.amax(dim=(2, 3))  # (B, C)
        return self.fc(pooled) * self.scale


class AirNet(Classifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 widths: tuple[int, int, int] = (64, 256, 256), flip_tta: bool = False,
                 translate_tta: bool = False, residual: bool = False):
        super().__init__()
        self.set_tta(flip_tta, translate_tta)
        whiten_width = 2 * in_channels * 2 * 2
        whiten = nn.Conv2d(in_channels, whiten_width, 2, padding=0)  # (B, 24, H-1, W-1)
        whiten.requires_grad_(False)  # filters set from data (init_from_data), then kept fixed
        self.features = nn.Sequential(
            whiten, nn.GELU(),
            _ConvGroup(whiten_width, widths[0], residual),   # (B, 64, 15, 15) for 32x32 input
            _ConvGroup(widths[0], widths[1], residual),      # (B, 256, 7, 7)
            _ConvGroup(widths[1], widths[2], residual),      # (B, 256, 3, 3)
        )
        self.head = _GlobalMaxLinearHead(widths[2], num_classes, scale=1 / 9)

    @property
    def whiten(self) -> nn.Conv2d:
        return self.features[0]

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from 2x2 patches of normalized training images ``(N, C, H, W)``.

        The filters are the eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue), and
        their negatives, so the first layer sees decorrelated, unit-variance patch coordinates.
        """
        c, kh, kw = self.whiten.weight.shape[1:]
        patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1)  # (N, C, H', W', kh, kw)
        patches = patches.transpose(1, 3).reshape(-1, c * kh * kw)
        patches = patches - patches.mean(dim=0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues[:, None] + eps)).reshape(-1, c, kh, kw)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).flip(0))
        self.whiten.bias.zero_()


register("airnet")(AirNet)
