"""Distillation losses: a registry of terms and :func:`build_objective` to weight them."""
from __future__ import annotations

from typing import Any

import torch

from ..models import Classifier
from . import terms  # noqa: F401  (fill the registry)
from .base import LOSSES, LossContext, LossTerm, ModelOutput, Objective, StepOutputs


def feature_shape(model: Classifier, input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of ``model.forward_features`` for one input of ``input_shape``."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        parameter = next(model.parameters())
        probe = torch.zeros(1, *input_shape, device=parameter.device)
        shape = tuple(model.forward_features(probe).shape[1:])
    model.train(was_training)
    return shape


def needs_teacher(weights: dict[str, float]) -> bool:
    """Whether an objective with these weights has a term that reads the teacher's outputs."""
    return any(LOSSES.get(name).needs_teacher for name, weight in weights.items() if weight > 0)


def build_objective(weights: dict[str, float], student: Classifier, teacher: Classifier | None,
                    input_shape: tuple[int, int, int], options: dict[str, dict[str, Any]] | None = None) -> Objective:
    """Make the weighted objective. Terms with weight 0 are left out; a negative weight is an error."""
    options = options or {}
    active = {name: weight for name, weight in weights.items() if weight != 0}
    for name, weight in active.items():
        if weight < 0:
            raise ValueError(f"loss weight --{name} must not be negative, got {weight}")
        LOSSES.get(name)  # unknown names raise with the list of choices
    if not active:
        raise ValueError("all loss weights are zero: nothing to train")
    context = LossContext(student, teacher, feature_shape(student, input_shape),
                          feature_shape(teacher, input_shape) if teacher is not None else None)
    built = {name: LOSSES.create(name, context=context, **options.get(name, {})) for name in active}
    objective = Objective(built, active)
    if objective.needs_teacher and teacher is None:
        needing = [name for name, term in built.items() if term.needs_teacher]
        raise ValueError(f"loss terms {', '.join(needing)} need a teacher")
    return objective


__all__ = ["LOSSES", "LossContext", "LossTerm", "ModelOutput", "Objective", "StepOutputs",
           "build_objective", "feature_shape", "needs_teacher"]
