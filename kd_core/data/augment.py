"""Training augmentation on whole batches of float tensors ``(B, C, H, W)`` in [0, 1], on any
device. Every transform draws one random parameter per sample, so a batch of 512 costs a few
tensor ops rather than 512 PIL calls. Drawing and applying are separate steps (``crop_offsets`` and
``crop``, ...), so a process of a distributed run can draw for the whole global batch and apply
its own rows' draws (:func:`augment_batch`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    crop_padding: int = 4         # random crop after reflect-padding by this many pixels (0: off)
    flip: bool = True             # random horizontal flip
    rotation: float = 0.0         # max rotation in degrees (0: off)
    color_jitter: float = 0.0     # brightness/contrast/saturation strength (0: off)
    cutout: int = 0               # side of a zeroed square (0: off)
    mix: str = "none"             # blend each image with a partner first: none | mixup | cutmix (data.mixing)
    mix_alpha: float = 1.0        # mixing weights drawn from Beta(alpha, alpha)

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(crop_padding=0, flip=False)


def crop_offsets(batch: int, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ``(2, B)`` (row, column) window offsets in ``[0, 2 * padding]``."""
    return torch.randint(0, 2 * padding + 1, (2, batch), generator=generator, device="cpu")


def crop(images: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Reflect-pad by ``padding`` and take the H x W window at ``offsets`` ``(2, B)`` per sample."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    offsets = offsets.to(images.device, torch.long)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)   # (B, W)
    index = torch.arange(batch, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return cropped.permute(0, 3, 1, 2)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reflect-pad by ``padding`` and take a random H x W window per sample."""
    return crop(images, padding, crop_offsets(len(images), padding, generator))


def flip_where(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror the samples whose entry in the boolean ``flips`` ``(B,)`` is set."""
    return torch.where(flips.to(images.device)[:, None, None, None], images.flip(3), images)


def flip_draws(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.rand(batch, generator=generator) < 0.5


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return flip_where(images, flip_draws(len(images), generator))


def rotation_angles(batch: int, degrees: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ``(B,)`` angles in radians within ``[-degrees, degrees]``."""
    return (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(degrees)


def random_rotation(images: torch.Tensor, degrees: float, generator: torch.Generator | None = None) -> torch.Tensor:
    return rotate(images, rotation_angles(len(images), degrees, generator))


def rotate(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each sample by its angle ``(B,)`` (radians), reflecting at the borders."""
    cos, sin = angles.cos(), angles.sin()
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def jitter_factors(batch: int, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ``(3, B)`` brightness, contrast and saturation factors in [1-s, 1+s]."""
    return 1 + (torch.rand(3, batch, generator=generator) * 2 - 1) * strength


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, contrast and (for RGB) saturation, each scaled by a factor in [1-s, 1+s]."""
    return jitter(images, jitter_factors(len(images), strength, generator))


def jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Scale brightness, contrast and (for RGB) saturation by ``factors`` ``(3, B)``."""
    factors = factors.to(images)
    images = images * factors[0, :, None, None, None]
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * factors[1, :, None, None, None] + mean
    if images.shape[1] == 3:
        gray = (images * torch.tensor([0.299, 0.587, 0.114], device=images.device)[:, None, None]).sum(1, keepdim=True)
        images = (images - gray) * factors[2, :, None, None, None] + gray
    return images.clamp(0, 1)


def cutout_centers(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ``(2, B)`` (row, column) square centres, as fractions of the height and width."""
    return torch.rand(2, batch, generator=generator)


def cutout(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return erase_squares(images, size, cutout_centers(len(images), generator))


def erase_squares(images: torch.Tensor, size: int, centers: torch.Tensor) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square around each sample's centre ``(2, B)``."""
    _, _, height, width = images.shape
    top = (centers[0] * height).long().to(images.device)[:, None] - size // 2
    left = (centers[1] * width).long().to(images.device)[:, None] - size // 2
    rows = torch.arange(height, device=images.device)[None]
    cols = torch.arange(width, device=images.device)[None]
    inside_rows = (rows >= top) & (rows < top + size)     # (B, H)
    inside_cols = (cols >= left) & (cols < left + size)   # (B, W)
    mask = inside_rows[:, :, None] & inside_cols[:, None, :]
    return images.masked_fill(mask[:, None], 0.0)


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None,
                  batch: int | None = None, rows: slice = slice(None)) -> torch.Tensor:
    """Apply the configured transforms to float images in [0, 1], shape ``(B, C, H, W)``.

    ``batch``/``rows``: ``images`` are the rows ``rows`` of a batch of ``batch`` samples (a process's
    share of a global batch). Every random parameter is drawn for the whole batch and these rows'
    are used, so the shares are augmented exactly as the whole batch would be.
    """
    count = len(images) if batch is None else batch
    if config.rotation > 0:
        images = rotate(images, rotation_angles(count, config.rotation, generator)[rows])
    if config.crop_padding > 0:
        images = crop(images, config.crop_padding, crop_offsets(count, config.crop_padding, generator)[:, rows])
    if config.flip:
        images = flip_where(images, flip_draws(count, generator)[rows])
    if config.color_jitter > 0:
        images = jitter(images, jitter_factors(count, config.color_jitter, generator)[:, rows])
    if config.cutout > 0:
        images = erase_squares(images, config.cutout, cutout_centers(count, generator)[:, rows])
    return images
