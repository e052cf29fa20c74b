"""Any timm architecture behind the zoo's contract: ``create("timm:<name>", ...)``.

timm already splits every model into ``forward_features(x)`` and ``forward_head(features)``; the
wrapper keeps that split and ends the feature path in an ``nn.Identity`` named ``features``, so
hook-based tools (the grad-cam package) see exactly the tensor that feature matching and the CAM
losses read. A model whose features are not a spatial map (a ViT's tokens) has no CAM
(``cam_layer = None``: the dashboard shows input-gradient saliency). Where the head is global
average pooling then one linear layer (ResNets, EfficientNets; checked numerically when the model
is built), the original CAM is exact and cheap; other heads go through Grad-CAM. Models whose
feature maps come channels-last (``output_fmt == "NHWC"``: Swin) are permuted to channels-first
at the ``features`` point and back before their head, so that CAMs and feature terms read channels
where every other model has them.

ImageNet models downsample 32 times, so a 32x32 image leaves a 1x1 map: pass ``output_stride=8``
(timm's dilated variant, where the model has one) for 4x4 maps on CIFAR-sized inputs. Parameters
are stored under ``model.`` followed by timm's own names.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from .base import Classifier

PREFIX = "timm:"


def _timm():
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a runtime requirement
        raise RuntimeError("timm architectures need the timm package: pip install 'timm>=1.0,<2'") from None
    return timm


def version() -> str:
    return _timm().__version__


def factory(name: str) -> Callable[..., "TimmClassifier"]:
    """``TimmClassifier`` for timm's ``name``; ``KeyError`` naming how to list the choices."""
    timm = _timm()
    if not timm.is_model(name):
        raise KeyError(f"unknown timm architecture {name!r} (timm {timm.__version__}); list them with "
                       f"python -c \"import timm; print(timm.list_models('*{name[:6]}*'))\"")
    return functools.partial(TimmClassifier, name)


def _create(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    try:
        return _timm().create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, ConnectionError, RuntimeError) as error:  # hub errors subclass OSError
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load pretrained weights for timm model {name!r} from the Hugging Face Hub: "
            f"{type(error).__name__}: {error}. Offline, download them where you are online "
            f"(huggingface-cli download timm/<tag>) into the Hugging Face cache and set HF_HUB_OFFLINE=1, "
            f"or pass pretrained_cfg_overlay={{'file': '/path/to/weights.safetensors'}}, or bring trained "
            f"weights with `python -m kd_core import`") from error


class TimmClassifier(Classifier):
    def __init__(self, name: str, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 pretrained: bool = False, **timm_args: Any):
        super().__init__()
        self.timm_name = name
        self.model = _create(name, pretrained, num_classes=num_classes, in_chans=in_channels, **timm_args)
        self.features = nn.Identity()  # the hook point: its output is forward_features' result
        self._nhwc = False  # timm's feature map is (B, H, W, C): permuted to (B, C, H, W) at the hook point
        self._linear_head = False
        self._probe(in_channels, input_size)

    @torch.no_grad()
    def _probe(self, in_channels: int, input_size: int) -> None:
        """One pass on a blank image, in eval mode: is the feature map spatial, and is the head
        pool-then-linear (so that CAMs need no gradients)?"""
        was_training = self.model.training
        self.model.eval()
        try:
            features = self.model.forward_features(torch.zeros(1, in_channels, input_size, input_size))
        except Exception as error:  # noqa: BLE001 - timm raises many kinds for a wrong input size
            raise ValueError(f"timm model {self.timm_name!r} does not take {input_size}x{input_size} inputs with "
                             f"{in_channels} channel(s): {error}. Models with a fixed size take img_size="
                             f"{input_size} as an architecture argument") from None
        finally:
            self.model.train(was_training)
        if features.ndim != 4:
            self.cam_layer = None
            return
        channels = getattr(self.model, "num_features", None)
        self._nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC" or (
            channels is not None and features.shape[1] != channels and features.shape[-1] == channels)
        if self._nhwc:
            features = features.permute(0, 3, 1, 2)
        if channels is not None and features.shape[1] != channels:  # a layout we cannot read as a map
            self.cam_layer = None
            return
        classifier = self.model.get_classifier()
        if isinstance(classifier, nn.Linear) and classifier.in_features == features.shape[1]:
            probe = torch.randn(2, *features.shape[1:], generator=torch.Generator().manual_seed(0))
            self.model.eval()
            try:
                head = self.forward_head(probe)
            finally:
                self.model.train(was_training)
            pooled = probe.mean(dim=(2, 3)) @ classifier.weight.T
            if classifier.bias is not None:
                pooled = pooled + classifier.bias
            self._linear_head = head.shape == pooled.shape and torch.allclose(head, pooled, atol=1e-4, rtol=1e-4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        return self.features(features.permute(0, 3, 1, 2) if self._nhwc else features)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(features.permute(0, 2, 3, 1) if self._nhwc else features)

    def linear_cam_weight(self) -> torch.Tensor | None:
        return self.model.get_classifier().weight if self._linear_head else None
