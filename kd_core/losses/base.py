"""What every loss term sees, and how terms are combined.

A term is a small ``nn.Module`` whose ``forward(outputs)`` returns a dict with ``"loss"`` and,
optionally, named diagnostic parts. :class:`Objective` weights and sums the terms and returns
``{"loss": total, "<term>": unweighted value, ...}``.

Weighting convention: ``total = sum_i weight_i * term_i``, weights as given on the command line
(``--ce 1 --kd 1``). Hinton et al.'s ``alpha`` mix ``(1 - alpha) * CE + alpha * KD`` is
``--ce 1-alpha --kd alpha``. The KD term already carries its ``T^2`` factor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.mixing import MixedLabels
from ..models import Classifier
from ..registry import Registry


@dataclass
class ModelOutput:
    features: torch.Tensor | None  # (B, C, H, W): forward_features; None for a teacher bank without feature maps
    logits: torch.Tensor           # (B, K): forward_head(features)
    model: Classifier
    cams: torch.Tensor | None = None  # (B, h, w): a teacher bank's CAMs for the CAM term's classes


@dataclass
class StepOutputs:
    student: ModelOutput
    teacher: ModelOutput | None
    labels: torch.Tensor    # (B,); for mixed images the label of the image covering more of each
    mixed: MixedLabels | None = None  # both images' labels and shares, when the batch is mixed


@dataclass
class LossContext:
    """What a factory may need to size its learnable parts (adapters) at construction."""
    student: Classifier
    teacher: Classifier | None
    student_feature_shape: tuple[int, int, int]           # (C, H, W)
    teacher_feature_shape: tuple[int, int, int] | None


LOSSES: Registry[nn.Module] = Registry("loss")


class LossTerm(nn.Module):
    needs_teacher = True
    # True when the term reads the teacher's feature maps (a teacher bank then keeps them too)
    needs_teacher_features = True

    def forward(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class Objective(nn.Module):
    """Weighted sum of named loss terms; its parameters (adapters) train with the student."""

    def __init__(self, terms: dict[str, LossTerm], weights: dict[str, float]):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)

    @property
    def needs_teacher(self) -> bool:
        return any(term.needs_teacher for term in self.terms.values())

    @property
    def needs_teacher_features(self) -> list[str]:
        """The terms that read the teacher's feature maps (a teacher bank must keep them for these)."""
        return [name for name, term in self.terms.items() if term.needs_teacher and term.needs_teacher_features]

    def forward(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        total = outputs.student.logits.new_zeros((), dtype=torch.float32)
        for name, term in self.terms.items():
            result = term(outputs)
            total = total + self.weights[name] * result["loss"]
            parts[name] = result["loss"].detach()
            parts.update({f"{name}/{key}": value.detach() for key, value in result.items() if key != "loss"})
        return {"loss": total, **parts}
