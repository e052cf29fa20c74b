"""torchvision's ResNet-18, ResNet-50 and MobileNetV2 behind the zoo's contract.

``small_input=True`` swaps the ImageNet stem for a 32x32-friendly one (3x3 stride-1 first conv,
no max-pool for ResNets; stride-1 first conv for MobileNetV2), as CIFAR papers do. For ResNets
``stem_stride=2`` keeps that 3x3 conv but at stride 2: a quarter of the cost (ResNet-18: 0.14
instead of 0.56 GMACs an image) with 16x16 maps entering the first stage, where the ImageNet
stem (a 16th of the cost) leaves 8x8.
``pretrained=True`` loads ImageNet weights through torchvision (needs internet or a filled
torch hub cache); the classifier head is always replaced to ``num_classes``.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from .base import GapLinearClassifier, GapLinearHead
from .registry import register

_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "mobilenet_v2": "MobileNet_V2_Weights.IMAGENET1K_V2",
}


def _build(arch: str, pretrained: bool) -> nn.Module:
    weights = _WEIGHTS[arch] if pretrained else None
    try:
        return getattr(torchvision.models, arch)(weights=weights)
    except (OSError, RuntimeError, ConnectionError) as error:  # urllib errors subclass OSError
        raise RuntimeError(
            f"could not load ImageNet weights {weights} for {arch}: {error}. Offline, put the file "
            f"torchvision would download into {torch.hub.get_dir()}/checkpoints/ and retry, or use "
            "pretrained=False."
        ) from error


class TorchvisionResNet(GapLinearClassifier):
    def __init__(self, arch: str, num_classes: int = 10, in_channels: int = 3,
                 small_input: bool = True, stem_stride: int = 1, pretrained: bool = False,
                 flip_tta: bool = False, translate_tta: bool = False):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, not {stem_stride!r}")
        if stem_stride != 1 and not small_input:
            raise ValueError("stem_stride applies to the small-input 3x3 stem; the ImageNet stem (small_input=False) "
                             "has its own strides")
        net = _build(arch, pretrained)
        if small_input or in_channels != 3:
            stride, kernel = (stem_stride, 3) if small_input else (2, 7)
            net.conv1 = nn.Conv2d(in_channels, 64, kernel, stride, kernel // 2, bias=False)
        self.features = nn.Sequential(
            net.conv1, net.bn1, net.relu, nn.Identity() if small_input else net.maxpool,
            net.layer1, net.layer2, net.layer3, net.layer4,
        )
        self.head = GapLinearHead(net.fc.in_features, num_classes)
        self.set_tta(flip_tta, translate_tta)


class TorchvisionMobileNetV2(GapLinearClassifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 small_input: bool = True, pretrained: bool = False, flip_tta: bool = False,
                 translate_tta: bool = False):
        super().__init__()
        net = _build("mobilenet_v2", pretrained)
        stem = net.features[0][0]
        if small_input or in_channels != 3:
            net.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3,
                                           1 if small_input else 2, 1, bias=False)
        self.features = net.features  # (B, 1280, H/16, W/16) with the small stem
        self.head = GapLinearHead(net.last_channel, num_classes, dropout=0.2)
        self.set_tta(flip_tta, translate_tta)


for _arch in ("resnet18", "resnet50"):
    register(_arch)(lambda arch=_arch, **kw: TorchvisionResNet(arch, **kw))
register("mobilenet_v2")(TorchvisionMobileNetV2)
