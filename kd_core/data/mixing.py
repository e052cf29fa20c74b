"""Mixing augmentation: each training image blended with a partner image from the same split.

``mixup`` (Zhang et al., ICLR 2018) takes ``lam * a + (1 - lam) * b``; ``cutmix`` (Yun et al.,
ICCV 2019) pastes a box of ``b`` into ``a`` whose area is ``1 - lam`` of the image. ``lam`` is drawn
from Beta(alpha, alpha) per sample. Mixing happens before crops and flips, so a mixed image is then
augmented like any other, and a teacher bank (:mod:`kd_core.training.teacher_bank`) can store the
partner, ``lam`` and box of each view and replay exactly the mixed image its teacher scored: the
patient, consistent teaching of function matching (Beyer et al., CVPR 2022).

The labels of a mixed image are :class:`MixedLabels`: cross-entropy weighs the two images' labels by
``lam``; terms that need one class (DKD's target class, the training accuracy) take the image that
covers more of the mixed one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MIX_KINDS = ("none", "mixup", "cutmix")


@dataclass
class MixDraw:
    """One mixing draw per sample of a batch."""
    partners: torch.Tensor        # (B,) long: index of each sample's partner in the split
    lam: torch.Tensor             # (B,) float32: the share of the sample's own image
    boxes: torch.Tensor | None    # (4, B) long for cutmix: top, bottom, left, right of the pasted box

    def rows(self, rows: slice) -> "MixDraw":
        return MixDraw(self.partners[rows], self.lam[rows], self.boxes[:, rows] if self.boxes is not None else None)


@dataclass
class MixedLabels:
    """The labels of a batch of mixed images."""
    labels: torch.Tensor          # (B,) the samples' own labels
    partner_labels: torch.Tensor  # (B,) their partners' labels
    lam: torch.Tensor             # (B,) the share of the own image

    @property
    def dominant(self) -> torch.Tensor:
        """Per sample the label of the image covering at least half of the mixed one."""
        return torch.where(self.lam >= 0.5, self.labels, self.partner_labels)


def beta_draws(count: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` draws from Beta(alpha, alpha), reproducible from ``generator`` (torch has no seeded
    Beta sampler, so NumPy draws from a seed taken from it)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, count)).float()


def draw_mix(kind: str, alpha: float, batch: int, population: int, height: int, width: int,
             generator: torch.Generator) -> MixDraw:
    """Partners (uniform over the ``population`` images of the split), ``lam`` and, for cutmix, boxes
    for ``batch`` samples. A cutmix box is clipped at the border and ``lam`` set to the share it
    leaves uncovered, so the labels weigh what the image really shows."""
    if kind not in MIX_KINDS[1:]:
        raise ValueError(f"mixing must be one of {MIX_KINDS[1:]}, got {kind!r}")
    if not alpha > 0:
        raise ValueError(f"mixing alpha must be positive, got {alpha}")
    partners = torch.randint(0, population, (batch,), generator=generator)
    lam = beta_draws(batch, alpha, generator)
    if kind == "mixup":
        return MixDraw(partners, lam, None)
    cut = (1 - lam).sqrt()
    centers = torch.rand(2, batch, generator=generator)
    half_h, half_w = (cut * height / 2).round().long(), (cut * width / 2).round().long()
    center_y, center_x = (centers[0] * height).long(), (centers[1] * width).long()
    top, bottom = (center_y - half_h).clamp(0, height), (center_y + half_h).clamp(0, height)
    left, right = (center_x - half_w).clamp(0, width), (center_x + half_w).clamp(0, width)
    lam = 1 - ((bottom - top) * (right - left)).float() / (height * width)
    return MixDraw(partners, lam, torch.stack([top, bottom, left, right]))


def mix_images(images: torch.Tensor, partner_images: torch.Tensor, draw: MixDraw) -> torch.Tensor:
    """Float images ``(B, C, H, W)`` mixed with their partners' as ``draw`` says."""
    if draw.boxes is None:
        lam = draw.lam.to(images)[:, None, None, None]
        return lam * images + (1 - lam) * partner_images
    _, _, height, width = images.shape
    boxes = draw.boxes.to(images.device)
    rows = torch.arange(height, device=images.device)[None]
    cols = torch.arange(width, device=images.device)[None]
    inside_rows = (rows >= boxes[0][:, None]) & (rows < boxes[1][:, None])   # (B, H)
    inside_cols = (cols >= boxes[2][:, None]) & (cols < boxes[3][:, None])   # (B, W)
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]      # (B, 1, H, W)
    return torch.where(mask, partner_images, images)
