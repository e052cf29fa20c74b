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


def student_mistakes(student, teacher, images: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the images (uint8 ``(N, C, H, W)``) that ``teacher`` classifies correctly and
    ``student`` does not (two loaded checkpoints), and the student's predictions on all of them."""
    student_predictions = predict(student.model, images, student.mean, student.std).argmax(1)
    teacher_predictions = predict(teacher.model, images, teacher.mean, teacher.std).argmax(1)
    chosen = torch.nonzero((teacher_predictions == labels) & (student_predictions != labels))[:, 0]
    return chosen, student_predictions
