"""Predictions and accuracy metrics on in-memory splits."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .data import normalize


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
            batch_size: int = 1000, device: torch.device | str = "cpu",
            amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits ``(N, K)`` (float32, on the CPU) for uint8 images ``(N, C, H, W)``; eval mode, restored after."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    outputs = []
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    try:
        with autocast:
            for chunk in images.split(batch_size):
                batch = normalize(chunk.to(device), mean, std)
                outputs.append(model(batch).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs)


class _MeanAndFirstView(torch.nn.Module):
    """A classifier with test-time augmentation as a net whose logits ``(B, 2K)`` are its mean over the
    views and, beside them, its first view's (the image itself), from one pass per view."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.training = model.training  # so that predict puts the model back in the mode it found it in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .models.base import tta_view_list, view_mean

        views, weights = tta_view_list(x, self.model.translate_tta)
        logits = torch.cat([self.model.single_pass(view).float() for view in views])
        return torch.cat([view_mean(logits, weights), logits[:len(x)]], dim=1)


def predict_views(model: torch.nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                  batch_size: int = 1000, device: torch.device | str = "cpu",
                  amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`predict`'s logits and, for a model that predicts with test-time augmentation (several
    views: :meth:`~kd_core.models.base.Classifier.set_tta`), its single-view logits beside them, from
    the same passes (the image itself is the first view); None for a model without it, whose logits
    are already single-view."""
    if not getattr(model, "flip_tta", False):
        return predict(model, images, mean, std, batch_size, device, amp_dtype), None
    both = predict(_MeanAndFirstView(model), images, mean, std, batch_size, device, amp_dtype)
    mixed, single = both.chunk(2, dim=1)
    return mixed.contiguous(), single.contiguous()


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K, K)`` counts; row = true class, column = predicted class."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_report(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1, top-5, per-class accuracy and the confusion matrix of logits ``(N, K)``."""
    num_classes = logits.shape[1]
    predictions = logits.argmax(1)
    top5 = logits.topk(min(5, num_classes), dim=1).indices.eq(labels[:, None]).any(1)
    confusion = confusion_matrix(predictions, labels, num_classes)
    per_class = 100.0 * confusion.diag().float() / confusion.sum(1).clamp(min=1).float()
    return {"top1": 100.0 * (predictions == labels).float().mean().item(),
            "top5": 100.0 * top5.float().mean().item(),
            "per_class": per_class.tolist(), "confusion": confusion.tolist()}


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict:
    """How far a student follows its teacher: same top-1 (percent) and mean KL(teacher || student)."""
    same = (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()
    kl = torch.nn.functional.kl_div(student_logits.log_softmax(1), teacher_logits.log_softmax(1),
                                    log_target=True, reduction="batchmean").item()
    return {"top1_agreement": 100.0 * same, "kl_teacher_student": kl}


def sample_predictions(checkpoint, images: torch.Tensor, sample_sha256: str) -> torch.Tensor:
    """A loaded checkpoint's predicted classes ``(N,)`` on a fixed sample of uint8 images: those
    recorded in its metadata for this very sample (``evaluate --record --sample``), else computed
    once and kept with the loaded checkpoint (a changed file is a new load)."""
    recorded = checkpoint.meta.get("sample_predictions") or {}
    if recorded.get("sample_sha256") == sample_sha256 and len(recorded.get("predictions", ())) == len(images):
        return torch.tensor(recorded["predictions"], dtype=torch.long)
    cache = checkpoint.__dict__.setdefault("_sample_predictions", {})
    if sample_sha256 not in cache:
        cache[sample_sha256] = predict(checkpoint.model, images, checkpoint.mean, checkpoint.std).argmax(1)
    return cache[sample_sha256]


def student_mistakes(student, teacher, images: torch.Tensor, labels: torch.Tensor,
                     sample_sha256: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the sample images (uint8 ``(N, C, H, W)``) that ``teacher`` classifies correctly
    and ``student`` does not (two loaded checkpoints), and the student's predictions on all of them."""
    student_predictions = sample_predictions(student, images, sample_sha256)
    teacher_predictions = sample_predictions(teacher, images, sample_sha256)
    chosen = torch.nonzero((teacher_predictions == labels) & (student_predictions != labels))[:, 0]
    return chosen, student_predictions


TOP_REGION_FRACTION = 0.2  # the "hottest region" of a map, as the Explain tab measures it


def teacher_class_maps(teacher: torch.nn.Module, images: torch.Tensor,
                       stats: tuple[Sequence[float], Sequence[float]], batch_size: int = 500,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor] | None:
    """A teacher's torch CAMs ``(N, h, w)`` for its own predicted classes ``(N,)`` on uint8
    ``images`` (one pass each, no test-time augmentation); None without a spatial feature map.
    Computed once, they serve every student compared with this teacher."""
    from .cam import class_activation_map

    if teacher.cam_layer is None:
        return None
    was_training = teacher.training
    teacher.eval()
    maps, classes = [], []
    try:
        for chunk in images.split(batch_size):
            with torch.no_grad():
                features = teacher.forward_features(normalize(chunk.to(device), *stats))
                predicted = teacher.forward_head(features).argmax(1)
            maps.append(class_activation_map(teacher, features, predicted, create_graph=False).detach().cpu())
            classes.append(predicted.cpu())
    finally:
        teacher.train(was_training)
    return torch.cat(maps), torch.cat(classes)


def cam_agreement(student: torch.nn.Module, teacher: torch.nn.Module, images: torch.Tensor,
                  student_stats: tuple[Sequence[float], Sequence[float]],
                  teacher_stats: tuple[Sequence[float], Sequence[float]], batch_size: int = 500,
                  device: torch.device | str = "cpu",
                  teacher_maps: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float] | None:
    """Whether a student looks where its teacher looks, over uint8 ``images`` ``(N, C, H, W)``:
    both models' torch CAMs (:func:`kd_core.cam.class_activation_map`, one pass each, no test-time
    augmentation) for the teacher's predicted class, compared per image at the larger map's size:
    mean and median Pearson correlation, and the mean IoU of their top-20% regions. None when
    either model has no spatial feature map. A flat map correlates 0. ``teacher_maps``: the
    teacher's :func:`teacher_class_maps` on these images, when already computed."""
    from .cam import class_activation_map, resize_maps

    if student.cam_layer is None or teacher.cam_layer is None:
        return None
    device = torch.device(device)
    all_teacher_maps, all_classes = teacher_maps or teacher_class_maps(teacher, images, teacher_stats, batch_size,
                                                                       device)
    was_training = student.training
    student.eval()
    correlations, ious = [], []
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].to(device)
            classes = all_classes[start:start + batch_size].to(device)
            with torch.no_grad():
                student_features = student.forward_features(normalize(chunk, *student_stats))
            teacher_maps_chunk = all_teacher_maps[start:start + batch_size].to(device)
            student_maps = class_activation_map(student, student_features, classes, create_graph=False).detach()
            size = tuple(max(a, b) for a, b in zip(teacher_maps_chunk.shape[-2:], student_maps.shape[-2:]))
            teacher_flat = resize_maps(teacher_maps_chunk, size).flatten(1).double()    # (B, HW)
            student_flat = resize_maps(student_maps, size).flatten(1).double()
            correlations.append(_pearson(teacher_flat, student_flat))
            ious.append(_top_region_iou(teacher_flat, student_flat))
    finally:
        student.train(was_training)
    correlation, iou = torch.cat(correlations), torch.cat(ious)
    return {"cam_correlation_mean": round(correlation.mean().item(), 4),
            "cam_correlation_median": round(correlation.median().item(), 4),
            "cam_top_region_iou_mean": round(iou.mean().item(), 4), "cam_images": len(correlation)}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of ``(B, D)`` tensors; 0 where either row is flat."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    denominator = (a.square().sum(1) * b.square().sum(1)).sqrt()
    return torch.where(denominator > 0, (a * b).sum(1) / denominator.clamp_min(1e-300), torch.zeros_like(denominator))


def _top_region_iou(a: torch.Tensor, b: torch.Tensor, fraction: float = TOP_REGION_FRACTION) -> torch.Tensor:
    """Row-wise IoU of the ``fraction`` largest entries of ``(B, D)`` tensors (ties by position)."""
    count = max(1, int(round(fraction * a.shape[1])))
    region_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(count, dim=1).indices, True)
    region_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(count, dim=1).indices, True)
    return (region_a & region_b).sum(1).double() / (region_a | region_b).sum(1).double()
