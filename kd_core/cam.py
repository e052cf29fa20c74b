"""Class activation maps computed in torch, so they can train a student.

Two ways, chosen per model:

- the original CAM (Zhou et al. 2016) when the head is global-average-pool then linear:
  ``cam_k = sum_c w_kc * A_c``, exact and cheap;
- Grad-CAM (Selvaraju et al. 2017) otherwise: ``relu(sum_c alpha_c * A_c)`` with
  ``alpha_c = mean_hw d y_k / d A_c``, taken through ``torch.autograd.grad(create_graph=True)``
  so the map stays differentiable with respect to the student's parameters.

The grad-cam package (numpy, hooks, ``model.eval()``) is for drawing heatmaps in the dashboard;
it never computes a training loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import Classifier


def class_activation_map(model: Classifier, features: torch.Tensor, classes: torch.Tensor,
                         logits: torch.Tensor | None = None, create_graph: bool = True) -> torch.Tensor:
    """Maps ``(B, H, W)`` for ``classes`` ``(B,)`` from ``features`` ``(B, C, H, W)``.

    ``logits`` must come from ``model.forward_head(features)`` when the model needs Grad-CAM; a
    frozen teacher may pass ``None`` and the head is re-run here on a detached copy of its features.
    """
    if model.cam_layer is None:
        raise ValueError(f"{type(model).__name__} has no spatial feature map, so it has no CAM")
    weight = model.linear_cam_weight()
    if weight is not None:
        return _weighted_sum(weight[classes], features)  # weight[classes]: (B, C)
    if logits is None or not features.requires_grad:
        features = features.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model.forward_head(features)
        create_graph = False
    with torch.enable_grad():  # callers may ask for a (teacher's) map under torch.no_grad()
        score = logits.float().gather(1, classes[:, None]).sum()
    # the gradient is taken with respect to the very tensor the head consumed (bf16 under autocast)
    (gradient,) = torch.autograd.grad(score, features, create_graph=create_graph)
    alpha = gradient.float().mean(dim=(2, 3))  # (B, C)
    return F.relu(_weighted_sum(alpha, features))


def _weighted_sum(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``sum_c w_bc * A_bchw`` -> ``(B, H, W)`` in float32. Autocast would run the einsum in bf16,
    and min-max normalizing a bf16 map turns its rounding into huge gradients (the loss diverged)."""
    with torch.autocast(features.device.type, enabled=False):
        return torch.einsum("bc,bchw->bhw", weights.float(), features.float())


def normalize_maps(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each map ``(B, H, W)`` to [0, 1] by its own min and max (a flat map becomes zeros)."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low + eps)).view_as(maps)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
