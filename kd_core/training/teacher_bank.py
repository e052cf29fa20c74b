"""The teacher's outputs on a fixed set of augmented views of every training image.

Distilling from a large teacher on a CPU is dominated by the teacher's forward pass: airnet's costs
about a hundred times a camnet student's. A bank runs it once per view, the way FKD (Shen & Xing,
"A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022) stores soft labels of
random crops: for each of ``views`` random augmentation draws per training image it keeps the draw
(crop offsets and flip; rotation angle, colour-jitter factors and cutout square where those are on),
the teacher's logits and, for the CAM term, the teacher's class activation map;
for terms that read the teacher's feature map (FitNets hints, attention transfer, the cosine loss)
it keeps that map too, in bfloat16.
The student then trains on exactly those views, so its KD and CAM targets are the teacher's outputs
for the very image it sees; what changes is only that an image offers ``views`` views instead of a
fresh draw every epoch. With ``mirror`` a loader also shows each view as its mirror image, with
the view's logits and its maps mirrored: twice the distinct images for the same teacher cost.
With mixing (``augment.mix``: mixup or CutMix, :mod:`kd_core.data.mixing`) every view is first a
blend of its image with a partner image; the bank keeps the partner, the share and the CutMix box,
so the student sees exactly the mixed image the teacher scored, and cross-entropy both labels.
A view is made in one order, the same when the bank is built and when it is served: mix, rotate,
crop, jitter, cut out, flip (and mirror).

A bank is saved in the cache folder under a key of the teacher's weights, the training images, the
augmentation, the views, the CAM target, whether it keeps feature maps, and the seed, so the runs of
a study share one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..cam import class_activation_map
from ..files import atomic_path
from ..data import AugmentConfig, BatchLoader, normalize
from ..data.augment import (crop, crop_offsets, cutout_centers, erase_squares, flip_draws, flip_where, jitter,
                             jitter_factors, rotate, rotation_angles)
from ..data.mixing import MixDraw, MixedLabels, draw_mix, mix_images
from ..data.sources import Split
from ..models import Classifier

BANK_VERSION = 1
MAX_FEATURE_BYTES = 8 * 2**30  # feature maps a bank may hold in memory (and on disk)


@dataclass
class TeacherTargets:
    """The teacher's outputs for one batch, read from a bank."""
    logits: torch.Tensor          # (B, K)
    cams: torch.Tensor | None     # (B, h, w): maps for the classes the CAM term targets
    features: torch.Tensor | None = None  # (B, C, h, w): the teacher's feature maps, float32


@dataclass
class TeacherBank:
    padding: int                  # crop padding the offsets refer to (0: no crops)
    offsets: torch.Tensor         # (V, 2, N) uint8: row, column of each view's window
    flips: torch.Tensor           # (V, N) bool
    logits: torch.Tensor          # (V, N, K) float32
    cams: torch.Tensor | None     # (V, N, h, w) float32, or None without a CAM term
    features: torch.Tensor | None = None  # (V, N, C, h, w) bfloat16, kept for feature-reading terms
    build_seconds: float | None = None    # how long building it took (read back from a cached file)
    reused: bool = False                  # loaded from the cache rather than built by this run
    partners: torch.Tensor | None = None  # (V, N) int32: each mixed view's partner image
    lam: torch.Tensor | None = None       # (V, N) float32: the share of the view's own image
    boxes: torch.Tensor | None = None     # (V, 4, N) uint8: CutMix boxes (top, bottom, left, right)
    angles: torch.Tensor | None = None    # (V, N) float32: rotation angles (radians)
    jitter: torch.Tensor | None = None    # (V, 3, N) float32: brightness, contrast, saturation factors
    centers: torch.Tensor | None = None   # (V, 2, N) float32: cutout squares' centres (fractions of H, W)
    cutout: int = 0                       # side of the cutout squares (0: none)

    @property
    def views(self) -> int:
        return self.logits.shape[0]

    def mix_draw(self, index: torch.Tensor, view: torch.Tensor) -> MixDraw | None:
        if self.partners is None:
            return None
        boxes = self.boxes[view, :, index].T.long() if self.boxes is not None else None
        return MixDraw(self.partners[view, index].long(), self.lam[view, index], boxes)

    def source_images(self, split: Split, index: torch.Tensor, view: torch.Tensor,
                      device: torch.device | str = "cpu") -> torch.Tensor:
        """Float images ``(B, C, H, W)`` in [0, 1] of samples ``index`` before their views' transforms
        (:meth:`view_images`): the images themselves, or for a mixed bank their blends with the views' partners."""
        images = split.images[index].to(device, non_blocking=True).float().div_(255)
        draw = self.mix_draw(index, view)
        if draw is None:
            return images
        partners = split.images[draw.partners].to(device, non_blocking=True).float().div_(255)
        return mix_images(images, partners, draw)

    def mixed_labels(self, split: Split, index: torch.Tensor, view: torch.Tensor,
                     device: torch.device | str = "cpu") -> MixedLabels | None:
        draw = self.mix_draw(index, view)
        if draw is None:
            return None
        return MixedLabels(split.labels[index].to(device), split.labels[draw.partners].to(device), draw.lam.to(device))

    def view_images(self, images: torch.Tensor, index: torch.Tensor, view: torch.Tensor,
                    mirror: torch.Tensor | None = None) -> torch.Tensor:
        """Float images ``(B, C, H, W)`` in [0, 1] of samples ``index`` -> their views ``view`` ``(B,)``,
        mirrored where ``mirror`` ``(B,)`` is true."""
        if self.angles is not None:
            images = rotate(images, self.angles[view, index])
        if self.padding > 0:
            images = crop(images, self.padding, self.offsets[view, :, index].T)
        if self.jitter is not None:
            images = jitter(images, self.jitter[view, :, index].T)
        if self.centers is not None:
            images = erase_squares(images, self.cutout, self.centers[view, :, index].T)
        flips = self.flips[view, index]
        return flip_where(images, flips ^ mirror if mirror is not None else flips)

    def targets(self, index: torch.Tensor, view: torch.Tensor, device: torch.device,
                mirror: torch.Tensor | None = None) -> TeacherTargets:
        """The teacher's outputs for those views. A mirrored view reuses its view's logits (a teacher
        trained with flips scores an image and its mirror image alike) and mirrors its maps."""
        def maps(bank: torch.Tensor | None) -> torch.Tensor | None:
            if bank is None:
                return None
            chosen = bank[view, index]
            if mirror is not None:
                chosen = torch.where(mirror.view(-1, *[1] * (chosen.dim() - 1)), chosen.flip(-1), chosen)
            return chosen.to(device)
        features = maps(self.features)
        return TeacherTargets(self.logits[view, index].to(device), maps(self.cams),
                              features.float() if features is not None else None)

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"offsets": self.offsets, "flips": self.flips.to(torch.uint8), "logits": self.logits}
        for name in ("partners", "lam", "boxes", "angles", "jitter", "centers"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        if self.cams is not None:
            tensors["cams"] = self.cams
        if self.features is not None:
            tensors["features"] = self.features
        return tensors


def bank_key(teacher_weights: str, split: Split, augment: AugmentConfig, views: int, cam_target: str | None,
             seed: int, features: bool = False) -> str:
    digest = hashlib.sha256()
    fields = [BANK_VERSION, teacher_weights, augment.crop_padding, augment.flip, views, cam_target, seed]
    fields += ["features"] if features else []  # older keys unchanged
    fields += [augment.mix, augment.mix_alpha] if augment.mix != "none" else []
    fields += [["rotation", augment.rotation]] if augment.rotation else []
    fields += [["color_jitter", augment.color_jitter]] if augment.color_jitter else []
    fields += [["cutout", augment.cutout]] if augment.cutout else []
    digest.update(json.dumps(fields).encode())
    digest.update(split.images.contiguous().numpy().tobytes())
    digest.update(split.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def build_bank(teacher: Classifier, split: Split, mean: Sequence[float], std: Sequence[float],
               augment: AugmentConfig, views: int, cam_target: str | None = None, seed: int = 0,
               features: bool = False, batch_size: int = 500, device: torch.device | str = "cpu", channels_last: bool = False,
               autocast: Callable | None = None, progress: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> TeacherBank | None:
    """Run the frozen ``teacher`` on ``views`` random views (independent draws of every transform
    ``augment`` turns on) of every image of ``split``.

    ``cam_target``: ``'teacher'`` (maps for the teacher's predicted class), ``'label'``, or None (no
    maps). ``features``: keep the teacher's feature maps too (refused beyond ``MAX_FEATURE_BYTES``).
    ``progress(done, total)`` is called after each batch; when ``should_stop()`` turns true
    the build is abandoned and None returned.
    """
    if views < 1:
        raise ValueError(f"teacher views must be at least 1, got {views}")
    augment = augment or AugmentConfig.none()
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    count = len(split)
    if features:
        check_feature_size(teacher, split, views)
    padding = augment.crop_padding
    offsets = torch.stack([crop_offsets(count, padding, generator) if padding else torch.zeros(2, count, dtype=torch.long)
                           for _ in range(views)]).to(torch.uint8)                      # (V, 2, N)
    flips = torch.stack([flip_draws(count, generator) if augment.flip else torch.zeros(count, dtype=torch.bool)
                         for _ in range(views)])                                         # (V, N)
    bank = TeacherBank(padding, offsets, flips, torch.empty(0), None)
    if augment.mix != "none":
        _, _, height, width = split.images.shape
        draws = [draw_mix(augment.mix, augment.mix_alpha, count, count, height, width, generator) for _ in range(views)]
        bank.partners = torch.stack([draw.partners for draw in draws]).to(torch.int32)     # (V, N)
        bank.lam = torch.stack([draw.lam for draw in draws])                             # (V, N)
        if augment.mix == "cutmix":
            bank.boxes = torch.stack([draw.boxes for draw in draws]).to(torch.uint8)     # (V, 4, N)
    # drawn after the older transforms, so a bank without these has the draws it always had
    if augment.rotation > 0:
        bank.angles = torch.stack([rotation_angles(count, augment.rotation, generator) for _ in range(views)])
    if augment.color_jitter > 0:
        bank.jitter = torch.stack([jitter_factors(count, augment.color_jitter, generator) for _ in range(views)])
    if augment.cutout > 0:
        bank.cutout = augment.cutout
        bank.centers = torch.stack([cutout_centers(count, generator) for _ in range(views)])
    logits, cams, maps = [], [], []
    batches = [torch.arange(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    total, done = views * len(batches), 0
    for view in range(views):
        for index in batches:
            views_of = torch.full_like(index, view)
            images = bank.view_images(bank.source_images(split, index, views_of, device), index, views_of)
            images = normalize(images, mean, std)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast() if autocast else torch.autocast(device.type, enabled=False):  # as in training
                feature_maps = teacher.forward_features(images)
                batch_logits = teacher.forward_head(feature_maps).float()
                if cam_target is not None:
                    classes = batch_logits.argmax(1) if cam_target == "teacher" else split.labels[index].to(device)
                    cams.append(class_activation_map(teacher, feature_maps, classes).float().cpu())
            logits.append(batch_logits.cpu())
            if features:
                maps.append(feature_maps.to(torch.bfloat16).cpu().contiguous())
            done += 1
            if progress is not None:
                progress(done, total)
            if should_stop is not None and should_stop():
                return None
    bank.logits = torch.cat(logits).view(views, count, -1)
    if cam_target is not None:
        stacked = torch.cat(cams)
        bank.cams = stacked.view(views, count, *stacked.shape[1:])
    if features:
        stacked = torch.cat(maps)
        bank.features = stacked.view(views, count, *stacked.shape[1:])
    return bank


def bank_bytes(views: int, images: int, num_classes: int, cam_shape: Sequence[int] | None,
               feature_shape: Sequence[int] | None, augment: AugmentConfig | None = None) -> int:
    """What a bank of ``views`` views of ``images`` images holds, in memory and in its cache file:
    per view and image, its crop offsets and flip, the logits (float32), the CAM (float32) when the
    teacher has one, the feature maps (bfloat16) when a term reads them, with mixing the partner
    and share (and CutMix's box), and ``augment``'s rotation angle, jitter factors and cutout centre."""
    per_view = 2 + 1 + 4 * num_classes + (4 * math.prod(cam_shape) if cam_shape else 0) \
        + (2 * math.prod(feature_shape) if feature_shape else 0) \
        + (draw_bytes(augment) if augment else 0)
    return views * images * per_view


def draw_bytes(augment: AugmentConfig) -> int:
    """What a view's draws beyond its crop and flip take: mixing's partner and share (CutMix's box
    too), the rotation angle, the three jitter factors, the cutout centre."""
    return {"none": 0, "mixup": 8, "cutmix": 12}[augment.mix] + 4 * bool(augment.rotation) \
        + 12 * bool(augment.color_jitter) + 8 * bool(augment.cutout)


def check_feature_size(teacher: Classifier, split: Split, views: int) -> None:
    """Refuse a bank whose feature maps would not fit comfortably in memory."""
    with torch.no_grad():
        probe = torch.zeros(1, *split.images.shape[1:], device=next(teacher.parameters()).device)
        shape = teacher.forward_features(probe).shape[1:]
    size = views * len(split) * shape.numel() * 2
    if size > MAX_FEATURE_BYTES:
        raise ValueError(f"a bank of {views} views would hold {size / 2**30:.1f} GB of teacher feature maps "
                         f"({tuple(shape)} per view, more than {MAX_FEATURE_BYTES / 2**30:.0f} GB); "
                         "use fewer --teacher-views, or --teacher-views 0 to run the teacher at every step")


def load_or_build_bank(cache_dir: str | os.PathLike | None, key: str, build: Callable[[], TeacherBank | None],
                       padding: int, save: bool = True, cutout: int = 0) -> TeacherBank | None:
    """The bank saved under ``key`` in ``cache_dir``, else ``build()`` and save it (atomically).
    ``cache_dir=None`` keeps the bank in memory only. A damaged file is rebuilt, never trusted; an
    abandoned build (None) is not saved. The file records how long the build took, so a run that
    reuses the bank can still report what the bank cost (``padding``, ``cutout``: the crop padding and
    cutout size the views were drawn with). ``save=False``: read the cache folder, never
    write it (the processes of a distributed run other than rank 0)."""
    path = Path(cache_dir) / "teacher-banks" / f"{key}.safetensors" if cache_dir else None
    if path is not None and path.exists():
        try:
            with safe_open(path, "pt") as handle:  # one read: the tensors and the build time
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
                seconds = (handle.metadata() or {}).get("build_seconds")
            os.utime(path)  # the file's time is its last use: what a retention setting goes by
            return TeacherBank(padding, tensors["offsets"], tensors["flips"].bool(), tensors["logits"],
                               tensors.get("cams"), tensors.get("features"),
                               build_seconds=float(seconds) if seconds else None, reused=True,
                               partners=tensors.get("partners"), lam=tensors.get("lam"), boxes=tensors.get("boxes"),
                               angles=tensors.get("angles"), jitter=tensors.get("jitter"),
                               centers=tensors.get("centers"), cutout=cutout if "centers" in tensors else 0)
        except Exception:
            path.unlink(missing_ok=True)
    started = time.perf_counter()
    bank = build()
    if bank is not None:
        bank.build_seconds = time.perf_counter() - started
    if bank is not None and path is not None and save:
        with atomic_path(path) as temporary:
            save_file(bank.tensors(), str(temporary),
                      metadata={"version": str(BANK_VERSION), "build_seconds": f"{bank.build_seconds:.3f}"})
    return bank


class BankLoader(BatchLoader):
    """Batches ``(images, labels, TeacherTargets)``: each sample shows one of its bank's views,
    drawn anew every epoch. ``mirror``: each view is also offered as its mirror image, with the
    view's targets (see ``TeacherBank.targets``): twice the distinct images for the same bank."""

    def __init__(self, split: Split, bank: TeacherBank, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 drop_last: bool = False, device: torch.device | str = "cpu", seed: int = 0,
                 channels_last: bool = False, mirror: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__(split, batch_size, mean, std, shuffle=True, augment=None, drop_last=drop_last,
                         device=device, seed=seed, channels_last=channels_last, rank=rank, world_size=world_size)
        self.bank, self.mirror = bank, mirror

    def batch(self, index: torch.Tensor, rows: slice = slice(None)) -> tuple:
        """The samples ``index[rows]``; views and mirrors are drawn for all of ``index`` (see BatchLoader)."""
        view = torch.randint(0, self.bank.views, (len(index),), generator=self.generator)[rows]
        mirror = flip_draws(len(index), self.generator)[rows] if self.mirror else None
        index = index[rows]
        images = self.bank.source_images(self.split, index, view, self.device)
        images = self.finish(self.bank.view_images(images, index, view, mirror))
        mixed = self.bank.mixed_labels(self.split, index, view, self.device)
        labels = mixed if mixed is not None else self.split.labels[index].to(self.device, non_blocking=True)
        return images, labels, self.bank.targets(index, view, self.device, mirror)
