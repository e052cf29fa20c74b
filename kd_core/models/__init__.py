"""The model zoo: ``create(name, num_classes=10, in_channels=3, **kw)`` and ``list_models()``.

``name`` is a registered architecture or ``timm:<name>`` for any timm architecture
(:mod:`kd_core.models.timm_models`)."""
from __future__ import annotations

import inspect
from typing import Any, Callable

from . import airnet, reparam, resnet_cifar, small, timm_models, torchvision_models  # noqa: F401  (fill the registry)
from ..profile import count_parameters
from .base import Classifier
from .registry import MODELS


def factory(name: str) -> Callable[..., Classifier]:
    """What builds architecture ``name``; ``KeyError`` naming the choices for an unknown one."""
    if not isinstance(name, str):
        raise KeyError(f"an architecture name must be text, not {type(name).__name__}")
    if name.startswith(timm_models.PREFIX):
        return timm_models.factory(name.removeprefix(timm_models.PREFIX))
    try:
        return MODELS.get(name)
    except KeyError as error:
        raise KeyError(f"{error.args[0]}; or timm:<name> for any timm architecture") from None


def create(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> Classifier:
    """Build a model by name. Unknown names raise ``KeyError`` listing the choices."""
    return factory(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)


def arch_args_for(name: str, num_classes: int, input_shape: tuple[int, int, int], **kwargs: Any) -> dict[str, Any]:
    """``create`` arguments for inputs of ``input_shape`` ``(C, H, W)``: the channels, and the side
    for models whose flatten head depends on it."""
    args = {"num_classes": num_classes, "in_channels": input_shape[0], **kwargs}
    if "input_size" in inspect.signature(factory(name)).parameters:
        args.setdefault("input_size", input_shape[-1])
    return args


def arch_versions(name: str) -> dict[str, str]:
    """Versions of the libraries an architecture comes from, for a checkpoint's metadata."""
    return {"timm": timm_models.version()} if name.startswith(timm_models.PREFIX) else {}


def list_models() -> list[str]:
    """The registered architectures (``timm:<name>`` names are open-ended and not listed)."""
    return MODELS.names()


__all__ = ["Classifier", "arch_args_for", "arch_versions", "create", "factory", "list_models", "count_parameters"]
