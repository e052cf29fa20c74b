"""The model zoo: ``create(name, num_classes=10, in_channels=3, **kw)`` and ``list_models()``."""
from __future__ import annotations

import inspect
from typing import Any

from . import airnet, reparam, resnet_cifar, small, torchvision_models  # noqa: F401  (fill the registry)
from ..profile import count_parameters
from .base import Classifier
from .registry import MODELS


def create(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> Classifier:
    """Build a model by registry name. Unknown names raise ``KeyError`` listing the choices."""
    return MODELS.create(name, num_classes=num_classes, in_channels=in_channels, **kwargs)


def arch_args_for(name: str, num_classes: int, input_shape: tuple[int, int, int], **kwargs: Any) -> dict[str, Any]:
    """``create`` arguments for inputs of ``input_shape`` ``(C, H, W)``: the channels, and the side
    for models whose flatten head depends on it."""
    args = {"num_classes": num_classes, "in_channels": input_shape[0], **kwargs}
    if "input_size" in inspect.signature(MODELS.get(name)).parameters:
        args.setdefault("input_size", input_shape[-1])
    return args


def list_models() -> list[str]:
    return MODELS.names()

__all__ = ["Classifier", "arch_args_for", "create", "list_models", "count_parameters"]
