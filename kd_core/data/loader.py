"""Batches straight from in-memory uint8 tensors: shuffle, move to the device, scale, augment,
normalize. No worker processes and no per-sample Python work."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .augment import AugmentConfig, augment_batch
from .sources import Split


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or [0, 1] float images ``(B, C, H, W)`` -> normalized float32."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype)[:, None, None]
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype)[:, None, None]
    return (images - mean_t) / std_t


class BatchLoader:
    """Iterates ``(images, labels)`` batches of a :class:`Split`; a new order every epoch."""

    def __init__(self, split: Split, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 shuffle: bool = False, augment: AugmentConfig | None = None, drop_last: bool = False,
                 device: torch.device | str = "cpu", seed: int = 0, channels_last: bool = False):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.split, self.batch_size, self.mean, self.std = split, batch_size, mean, std
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        full, rest = divmod(len(self.split), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple]:
        count = len(self.split)
        order = torch.randperm(count, generator=self.generator) if self.shuffle else torch.arange(count)
        for batch_index in range(len(self)):
            yield self.batch(order[batch_index * self.batch_size:(batch_index + 1) * self.batch_size])

    def batch(self, index: torch.Tensor) -> tuple:
        """``(images, labels)`` of the samples ``index``, augmented and normalized."""
        images = self.split.images[index].to(self.device, non_blocking=True).float().div_(255)
        if self.augment is not None:
            images = augment_batch(images, self.augment, self.generator)
        return self.finish(images), self.split.labels[index].to(self.device, non_blocking=True)

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] -> normalized, in the loader's memory format."""
        images = normalize(images, self.mean, self.std)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images
