"""The training loop people write first, as the yardstick for the engine.

It follows the PyTorch knowledge-distillation tutorial's loop: a torchvision ``ImageFolder`` decoded
per sample with per-sample transforms (random crop and flip, as the recipes augment, then
``ToTensor`` and ``Normalize``), a ``DataLoader`` with 2 worker processes and batch 128, the teacher
run forward under ``no_grad`` at every step, float32 throughout, and the tutorial's loss: cross
entropy plus ``T^2``-scaled KL divergence between softened outputs, plus, for CAM-KD, the L1
distance between the two models' min-max-scaled class activation maps for the teacher's class.
Nothing here is used to train shipped models.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cam import class_activation_map, normalize_maps, resize_maps
from ..data.sources import _fingerprint, default_cache_dir, parse_source

BATCH_SIZE, WORKERS = 128, 2


def image_folder(source: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """An unpacked image-folder tree (``train/<class>/...``) for a ``folder:`` source: the folder
    itself, or an archive unpacked once into the cache folder (as a user would unpack it)."""
    kind, path = parse_source(source)
    if path is None:
        raise ValueError(f"the reference loop reads an image-folder tree; {source!r} is not a folder: source")
    if path.is_dir():
        return path
    if not path.is_file():
        raise ValueError(f"data set archive {str(path)!r} does not exist")
    target = Path(cache_dir or default_cache_dir()) / f"image-folder-{_fingerprint(path)}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=target.parent))
        try:
            with tarfile.open(path) as archive:
                archive.extractall(scratch, filter="data")
            roots = [entry for entry in scratch.iterdir() if entry.is_dir()]
            tree = scratch if (scratch / "train").is_dir() or len(roots) != 1 else roots[0]
            os.replace(tree, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _loader(root: Path, mean, std, batch_size: int, workers: int, seed: int):
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    dataset = datasets.ImageFolder(str(root / "train"), transform=transform)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       generator=generator, drop_last=True)


def distillation_loss(student_logits, teacher_logits, labels, weights: dict[str, float], temperature: float,
                      student=None, student_features=None, teacher=None, teacher_features=None) -> torch.Tensor:
    """The tutorial's objective, written out: ``ce`` x cross entropy + ``kd`` x KL(teacher || student)
    at ``temperature`` (times T^2) + ``cam`` x L1 between the scaled CAMs of the teacher's class."""
    loss = weights.get("ce", 0.0) * F.cross_entropy(student_logits, labels)
    if weights.get("kd", 0.0):
        soft_targets = F.softmax(teacher_logits / temperature, dim=-1)
        soft_prob = F.log_softmax(student_logits / temperature, dim=-1)
        kl = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size(0)
        loss = loss + weights["kd"] * kl * temperature ** 2
    if weights.get("cam", 0.0):
        classes = teacher_logits.argmax(1)
        student_maps = class_activation_map(student, student_features, classes, student_logits)
        teacher_maps = class_activation_map(teacher, teacher_features, classes).detach()
        size = max(student_maps.shape[-2:], teacher_maps.shape[-2:], key=lambda hw: hw[0] * hw[1])
        loss = loss + weights["cam"] * F.l1_loss(normalize_maps(resize_maps(student_maps, size)),
                                                 normalize_maps(resize_maps(teacher_maps, size)))
    return loss


def reference_distill(teacher, student, root: Path, mean, std, weights: dict[str, float], temperature: float = 4.0,
                      lr: float = 0.05, steps: int = 20, warmup: int = 3, batch_size: int = BATCH_SIZE,
                      workers: int = WORKERS, seed: int = 0, clip_grad_norm: float = 0.0) -> dict[str, float]:
    """Images per second of the usual loop over ``steps`` steps after ``warmup`` (the loader's
    start-up and the first batches are not timed; its decoding and transforms are).
    ``clip_grad_norm``: the recipe's gradient clipping (0: none), as the engine applies it."""
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be at least 1 and warm-up not negative")
    torch.manual_seed(seed)
    loader = _loader(root, mean, std, batch_size, workers, seed)
    if len(loader) < steps + warmup:
        raise ValueError(f"{len(loader)} batches of {batch_size} is fewer than the {steps + warmup} steps asked for")
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    uses_cam = weights.get("cam", 0.0) > 0
    teacher.eval()
    student.train()
    started = None
    for step, (inputs, labels) in enumerate(loader):
        if step == warmup:
            started = time.perf_counter()
        if step == warmup + steps:
            break
        optimizer.zero_grad()
        with torch.no_grad():
            teacher_features = teacher.forward_features(inputs)
            teacher_logits = teacher.forward_head(teacher_features)
        student_features = student.forward_features(inputs)
        student_logits = student.forward_head(student_features)
        loss = distillation_loss(student_logits, teacher_logits, labels, weights, temperature,
                                 student if uses_cam else None, student_features,
                                 teacher if uses_cam else None, teacher_features)
        loss.backward()
        if clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), clip_grad_norm)
        optimizer.step()
    elapsed = time.perf_counter() - started
    return {"images_per_second": steps * batch_size / elapsed, "step_seconds": elapsed / steps,
            "batch_size": batch_size, "workers": workers}
