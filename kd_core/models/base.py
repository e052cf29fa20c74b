"""The contract every classifier in the zoo follows.

``forward(x) == forward_head(forward_features(x))`` (a model may add test-time augmentation to
``forward`` in eval mode, as airnet's ``flip_tta`` does; :class:`SingleView` gives one pass). ``forward_features`` returns the last spatial
feature map ``(B, C, H, W)``; feature matching, the CAM losses and the dashboard's Grad-CAM all
read that same tensor. ``cam_layer`` is the dotted name of the submodule whose output it is, so
hook-based tools (the grad-cam package) find it by name.
"""
from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    cam_layer: str | None = "features"  # None: no spatial map, so no CAM (e.g. an MLP)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

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
        return self.model.forward_head(self.model.forward_features(x))

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
