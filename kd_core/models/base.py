"""The contract every classifier in the zoo follows.

``forward(x) == forward_head(forward_features(x))``, except that a model built with test-time
augmentation (:meth:`Classifier.set_tta`: airbench's mirror image, and its one-pixel shifts) averages
several such passes in eval mode; :class:`SingleView` gives one pass. ``forward_features`` returns the last spatial
feature map ``(B, C, H, W)``; feature matching, the CAM losses and the dashboard's Grad-CAM all
read that same tensor. ``cam_layer`` is the dotted name of the submodule whose output it is, so
hook-based tools (the grad-cam package) find it by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mirror_mean(single_pass, x: torch.Tensor) -> torch.Tensor:
    """Mean logits of ``x`` and its mirror image."""
    return 0.5 * (single_pass(x) + single_pass(x.flip(-1)))


def shifted_mirror_mean(single_pass, x: torch.Tensor) -> torch.Tensor:
    """airbench's level-2 test-time augmentation: the mirror pair of ``x``, weighted half, and the
    mirror pairs of ``x`` shifted one pixel up-left and one down-right (reflect padding), a quarter
    each: six passes."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., :height, :width], padded[..., 2:, 2:]
    return 0.5 * mirror_mean(single_pass, x) + 0.25 * (mirror_mean(single_pass, up_left) +
                                                       mirror_mean(single_pass, down_right))


BATCHED_TTA_MAX = 64  # views of a few images (an upload being explained) go through the net as one batch


def tta_view_list(x: torch.Tensor, translate: bool) -> tuple[list[torch.Tensor], list[float]]:
    """Every test-time-augmentation view of ``x`` ``(B, C, H, W)``, the image itself first, and each
    view's weight in the mean."""
    views, weights = [x, x.flip(-1)], [0.5, 0.5]
    if translate:
        height, width = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        up_left, down_right = padded[..., :height, :width], padded[..., 2:, 2:]
        views += [up_left, up_left.flip(-1), down_right, down_right.flip(-1)]
        weights = [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    return views, weights


def tta_views(x: torch.Tensor, translate: bool) -> tuple[torch.Tensor, list[float]]:
    """:func:`tta_view_list` as one batch ``(V * B, C, H, W)``."""
    views, weights = tta_view_list(x, translate)
    return torch.cat(views), weights


def view_mean(logits: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """The weighted mean over views of ``logits`` ``(V * B, K)`` made from :func:`tta_views`."""
    logits = logits.view(len(weights), -1, logits.shape[-1])                         # (V, B, K)
    return (logits * torch.tensor(weights, dtype=logits.dtype, device=logits.device).view(-1, 1, 1)).sum(0)


def batched_tta(single_pass, x: torch.Tensor, translate: bool) -> torch.Tensor:
    """What :func:`mirror_mean` or :func:`shifted_mirror_mean` compute, with every view of ``x``
    ``(B, C, H, W)`` in one batch: one pass rather than two or six, for small ``B`` (in eval mode a
    sample's logits do not depend on its batch)."""
    views, weights = tta_views(x, translate)
    return view_mean(single_pass(views), weights)


class Classifier(nn.Module):
    cam_layer: str | None = "features"  # None: no spatial map, so no CAM (e.g. an MLP)
    flip_tta: bool = False       # eval-mode forward averages the mirror image (set_tta)
    translate_tta: bool = False  # ... and the one-pixel shifts of both

    def set_tta(self, flip_tta: bool = False, translate_tta: bool = False) -> None:
        """Test-time augmentation of ``forward`` in eval mode (training is unaffected): with
        ``flip_tta`` the mean logits of the image and its mirror image (two passes, about a point
        more on CIFAR-10), with ``translate_tta`` too airbench's level 2 (six passes)."""
        if translate_tta and not flip_tta:
            raise ValueError("translate_tta builds on flip_tta (airbench's level 2); set both")
        self.flip_tta, self.translate_tta = bool(flip_tta), bool(translate_tta)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def single_pass(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.flip_tta:
            return self.single_pass(x)
        if len(x) * (6 if self.translate_tta else 2) <= BATCHED_TTA_MAX:  # a few images: one pass over all views
            return batched_tta(self.single_pass, x, self.translate_tta)
        return (shifted_mirror_mean if self.translate_tta else mirror_mean)(self.single_pass, x)

    def linear_cam_weight(self) -> torch.Tensor | None:
        """``(num_classes, C)`` weight when the head is global-average-pool then linear.

        Then the original CAM (Zhou et al. 2016) is exact: ``cam_k = sum_c w_kc * A_c``.
        Other heads return None and CAMs go through Grad-CAM.
        """
        return None

    def cam_module(self) -> nn.Module:
        if self.cam_layer is None:
            raise ValueError(f"{type(self).__name__} has no spatial feature map, so it has no CAM")
        return self.get_submodule(self.cam_layer)


class SingleView(nn.Module):
    """``forward(x) = forward_head(forward_features(x))`` of a wrapped classifier: exactly one pass,
    even when the classifier's own ``forward`` adds test-time augmentation (several passes).
    Hook-based CAM tools (the grad-cam package) need one pass per input to pair each activation
    with its gradient."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.single_pass(x)

    def cam_module(self) -> nn.Module:
        return self.model.cam_module()


class GapLinearHead(nn.Module):
    """Global average pool -> (dropout) -> linear: the head for which the original CAM is exact."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))  # (B, C)
        return self.fc(self.dropout(pooled))


class GapLinearClassifier(Classifier):
    """A classifier whose ``head`` is a :class:`GapLinearHead`."""

    head: GapLinearHead

    def linear_cam_weight(self) -> torch.Tensor:
        return self.head.fc.weight
