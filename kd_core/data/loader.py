"""Batches straight from in-memory uint8 tensors: shuffle, move to the device, scale, augment,
normalize. No worker processes and no per-sample Python work.

In a run over several processes (kd_core.distributed) each loader yields its process's share of
every global batch: the same order and augmentation draws in every process, its own rows kept."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .augment import AugmentConfig, augment_batch
from .mixing import MixedLabels, draw_mix, mix_images
from .sources import Split


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or [0, 1] float images ``(B, C, H, W)`` -> normalized float32."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype)[:, None, None]
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype)[:, None, None]
    return (images - mean_t) / std_t


def shard(count: int, rank: int, world_size: int, even: bool = True) -> slice:
    """The rows of a batch of ``count`` that process ``rank`` of ``world_size`` takes: contiguous and
    disjoint from the others'. ``even``: ``count // world_size`` each, the rest left out (training:
    every process's mean loss then weighs the same); else shares differing by at most one that
    together cover every row (evaluation)."""
    if even:
        share = count // world_size
        return slice(rank * share, (rank + 1) * share)
    return slice(count * rank // world_size, count * (rank + 1) // world_size)


class BatchLoader:
    """Iterates ``(images, labels)`` batches of a :class:`Split`; a new order every epoch.

    ``rank``/``world_size``: the batches are global, of ``batch_size``; this loader yields process
    ``rank``'s ``batch_size / world_size`` rows of each (:func:`shard`). A last, partial batch is cut
    to a multiple of ``world_size`` (dropped when smaller).
    """

    def __init__(self, split: Split, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 shuffle: bool = False, augment: AugmentConfig | None = None, drop_last: bool = False,
                 device: torch.device | str = "cpu", seed: int = 0, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split over {world_size} processes: it is the global "
                             f"batch, each process taking batch_size / {world_size}; use a multiple of {world_size}")
        self.split, self.batch_size, self.mean, self.std = split, batch_size, mean, std
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        full, rest = divmod(len(self.split), self.batch_size)
        return full if self.drop_last or rest < self.world_size else full + 1

    def __iter__(self) -> Iterator[tuple]:
        count = len(self.split)
        order = torch.randperm(count, generator=self.generator) if self.shuffle else torch.arange(count)
        for batch_index in range(len(self)):
            index = order[batch_index * self.batch_size:(batch_index + 1) * self.batch_size]  # the global batch
            yield self.batch(index, shard(len(index), self.rank, self.world_size))

    def batch(self, index: torch.Tensor, rows: slice = slice(None)) -> tuple:
        """``(images, labels)`` of the samples ``index[rows]``, augmented and normalized; the random
        augmentation is drawn for all of ``index``, so every share of a batch is augmented as the
        whole batch would be. With mixing (``augment.mix``) each image is first blended with a
        random partner and the labels are :class:`~kd_core.data.mixing.MixedLabels`."""
        mine = index[rows]
        images = self.images(mine)
        labels = self.split.labels[mine].to(self.device, non_blocking=True)
        if self.augment is not None and self.augment.mix != "none":
            _, _, height, width = self.split.images.shape
            draw = draw_mix(self.augment.mix, self.augment.mix_alpha, len(index), len(self.split), height, width,
                            self.generator).rows(rows)
            images = mix_images(images, self.images(draw.partners), draw)
            labels = MixedLabels(labels, self.split.labels[draw.partners].to(self.device), draw.lam.to(self.device))
        if self.augment is not None:
            images = augment_batch(images, self.augment, self.generator, batch=len(index), rows=rows)
        return self.finish(images), labels

    def images(self, index: torch.Tensor) -> torch.Tensor:
        """The split's images ``index`` on the loader's device, as floats in [0, 1]."""
        return self.split.images[index].to(self.device, non_blocking=True).float().div_(255)

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] -> normalized, in the loader's memory format."""
        images = normalize(images, self.mean, self.std)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images
