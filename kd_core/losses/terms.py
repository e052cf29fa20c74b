"""The loss terms. Each docstring names its paper; each returns ``{"loss": scalar, ...}``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cam import class_activation_map, normalize_maps, resize_maps
from .base import LOSSES, LossContext, LossTerm, StepOutputs


@LOSSES.register("ce")
class CrossEntropy(LossTerm):
    """Cross-entropy with the ground truth, optionally label-smoothed (Szegedy et al. 2016); for mixed
    images the two labels weighed by their shares (Zhang et al. 2018)."""

    needs_teacher = False

    def __init__(self, context: LossContext | None = None, label_smoothing: float = 0.0):
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        logits = outputs.student.logits.float()
        if outputs.mixed is None:
            return {"loss": F.cross_entropy(logits, outputs.labels, label_smoothing=self.label_smoothing)}
        # a mixed image: both images' labels, weighed by their shares (mixup, CutMix)
        mixed = outputs.mixed
        own = F.cross_entropy(logits, mixed.labels, label_smoothing=self.label_smoothing, reduction="none")
        partner = F.cross_entropy(logits, mixed.partner_labels, label_smoothing=self.label_smoothing, reduction="none")
        return {"loss": (mixed.lam * own + (1 - mixed.lam) * partner).mean()}


def z_score(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each row of ``(B, K)`` logits shifted to mean 0 and scaled to standard deviation 1."""
    centred = logits - logits.mean(1, keepdim=True)
    return centred / (centred.std(1, keepdim=True) + eps)


@LOSSES.register("kd")
class SoftTargetKD(LossTerm):
    """Hinton, Vinyals & Dean 2015: ``KL(softmax(t/T) || softmax(s/T)) * T^2``, batch mean.

    The ``T^2`` keeps the gradient scale independent of ``T``, so the weight against CE means the
    same thing at every temperature.

    With ``standardize`` both sides' logits are first z-scored per sample (Sun et al., "Logit
    Standardization in Knowledge Distillation", CVPR 2024): the student matches the shape of the
    teacher's logits, not their scale, so a small student need not reproduce a large teacher's
    logit range (or a label-smoothed teacher's compressed one).
    """

    needs_teacher_features = False

    def __init__(self, context: LossContext | None = None, temperature: float = 4.0, standardize: bool = False):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature, self.standardize = temperature, bool(standardize)

    def forward(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        temperature = self.temperature
        student, teacher = outputs.student.logits.float(), outputs.teacher.logits.float()
        if self.standardize:
            student, teacher = z_score(student), z_score(teacher)
        student_log_probs = F.log_softmax(student / temperature, dim=1)
        teacher_log_probs = F.log_softmax(teacher / temperature, dim=1)
        kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
        return {"loss": kl * temperature**2}


@LOSSES.register("dkd")
class DecoupledKD(LossTerm):
    """Decoupled KD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022): Hinton's KD split
    into a target-class term, TCKD = KL(b_t || b_s) over the binary (label, not label)
    probabilities, and a non-target term, NCKD = KL(q_t || q_s) over the softmax of the other
    classes, weighted independently: ``alpha * TCKD + beta * NCKD``, each times ``T^2``.

    Plain KD weights NCKD by ``1 - p_t(label)``, which is small exactly where the teacher is
    confident; DKD gives the "dark knowledge" among wrong classes a weight of its own.
    """

    needs_teacher_features = False

    def __init__(self, context: LossContext | None = None, temperature: float = 4.0, alpha: float = 1.0,
                 beta: float = 8.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if alpha < 0 or beta < 0:
            raise ValueError(f"DKD weights must not be negative, got alpha {alpha}, beta {beta}")
        self.temperature, self.alpha, self.beta = temperature, alpha, beta

    def forward(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        temperature = self.temperature
        student = outputs.student.logits.float() / temperature                # (B, K)
        teacher = outputs.teacher.logits.float() / temperature
        target = F.one_hot(outputs.labels, student.shape[1]).bool()            # (B, K)

        def binary(logits: torch.Tensor) -> torch.Tensor:
            """log of (p(label), 1 - p(label)), computed stably from logits: (B, 2)."""
            log_probs = F.log_softmax(logits, dim=1)
            label = log_probs[target]                                          # (B,)
            others = torch.logsumexp(log_probs.masked_fill(target, float("-inf")), dim=1)
            return torch.stack([label, others], dim=1)

        def non_target(logits: torch.Tensor) -> torch.Tensor:
            return F.log_softmax(logits.masked_fill(target, float("-inf")), dim=1).masked_fill(target, 0.0)

        tckd = F.kl_div(binary(student), binary(teacher), log_target=True, reduction="batchmean")
        teacher_rest = non_target(teacher)
        nckd = (teacher_rest.exp() * (teacher_rest - non_target(student))).sum(1).mean()
        scale = temperature**2
        return {"loss": scale * (self.alpha * tckd + self.beta * nckd), "tckd": scale * tckd, "nckd": scale * nckd}


def _match_spatial(student: torch.Tensor, teacher: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two ``(B, C, H, W)`` maps to one spatial size: ``pool`` shrinks the larger map to the
    smaller one's size (adaptive average pooling); ``resize`` resizes the student to the teacher."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if mode == "resize":
        return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False), teacher
    student_area = student.shape[-2] * student.shape[-1]
    teacher_area = teacher.shape[-2] * teacher.shape[-1]
    if student_area > teacher_area:
        return F.adaptive_avg_pool2d(student, teacher.shape[-2:]), teacher
    return student, F.adaptive_avg_pool2d(teacher, student.shape[-2:])


@LOSSES.register("feature")
class FeatureHint(LossTerm):
    """FitNets hint (Romero et al. 2015): MSE between a learnable 1x1-conv adapter of the student's
    feature map and the teacher's, after matching spatial sizes (``spatial='pool'`` or
    ``'resize'``). The adapter trains with the student."""

    def __init__(self, context: LossContext, spatial: str = "pool"):
        super().__init__()
        if spatial not in ("pool", "resize"):
            raise ValueError(f"spatial must be 'pool' or 'resize', got {spatial!r}")
        student_channels = context.student_feature_shape[0]
        teacher_channels = context.teacher_feature_shape[0]
        self.adapter = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                                     nn.BatchNorm2d(teacher_channels))
        self.spatial = spatial

    def forward(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        student = self.adapter(outputs.student.features)
        student, teacher = _match_spatial(student.float(), outputs.teacher.features.float(), self.spatial)
        return {"loss": F.mse_loss(student, teacher)}


@LOSSES.register("cam")
class CamAlignment(LossTerm):
    """CAM-KD: the student's class activation map should match the teacher's.

    Maps are taken for the teacher's predicted class (``target='teacher'``) or the label
    (``target='label'``), in torch (see :mod:`kd_core.cam`), scaled to [0, 1], resized to the larger
    of the two sizes, and compared by L1 or MSE. The teacher's map is a constant target; a teacher
    bank supplies it precomputed for the same classes.
    """

    needs_teacher_features = False

    def __init__(self, context: LossContext, target: str = "teacher", distance: str = "l1"):
        super().__init__()
        if target not in ("teacher", "label"):
            raise ValueError(f"CAM target must be 'teacher' or 'label', got {target!r}")
        if distance not in ("l1", "mse"):
            raise ValueError(f"CAM distance must be 'l1' or 'mse', got {distance!r}")
        for model in (context.student, context.teacher):
            if model is not None and model.cam_layer is None:
                raise ValueError(f"{type(model).__name__} has no spatial feature map, so the CAM loss cannot use it")
        self.target, self.distance = target, distance

    def forward(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        student, teacher = outputs.student, outputs.teacher
        classes = teacher.logits.argmax(1) if self.target == "teacher" else outputs.labels
        student_maps = class_activation_map(student.model, student.features, classes,
                                            student.logits if student.features.requires_grad else None)
        if teacher.cams is not None:
            teacher_maps = teacher.cams.float()
        else:
            teacher_maps = class_activation_map(teacher.model, teacher.features.detach(), classes).detach()
        size = max(student_maps.shape[-2:], teacher_maps.shape[-2:], key=lambda hw: hw[0] * hw[1])
        student_maps = normalize_maps(resize_maps(student_maps, size))
        teacher_maps = normalize_maps(resize_maps(teacher_maps, size))
        distance = F.l1_loss if self.distance == "l1" else F.mse_loss
        return {"loss": distance(student_maps, teacher_maps)}


@LOSSES.register("cosine")
class CosineHidden(LossTerm):
    """The PyTorch KD tutorial's hidden-representation loss: ``1 - cos`` between the flattened
    feature maps, the longer one average-pooled to the shorter one's length."""

    def forward(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        student = outputs.student.features.float().flatten(1)
        teacher = outputs.teacher.features.float().flatten(1)
        if student.shape[1] > teacher.shape[1]:
            student = F.adaptive_avg_pool1d(student[:, None], teacher.shape[1])[:, 0]
        elif teacher.shape[1] > student.shape[1]:
            teacher = F.adaptive_avg_pool1d(teacher[:, None], student.shape[1])[:, 0]
        return {"loss": (1 - F.cosine_similarity(student, teacher, dim=1)).mean()}

    def __init__(self, context: LossContext | None = None):
        super().__init__()


@LOSSES.register("at")
class AttentionTransfer(LossTerm):
    """Attention transfer (Zagoruyko & Komodakis 2017): match the L2-normalized spatial maps
    ``mean_c A_c^2`` of student and teacher (resized to the larger size) by mean squared error."""

    def __init__(self, context: LossContext | None = None):
        super().__init__()

    @staticmethod
    def attention(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        maps = features.float().pow(2).mean(1)  # (B, H, W)
        return F.normalize(resize_maps(maps, size).flatten(1), dim=1)

    def forward(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        student, teacher = outputs.student.features, outputs.teacher.features
        size = max(student.shape[-2:], teacher.shape[-2:], key=lambda hw: hw[0] * hw[1])
        difference = self.attention(student, size) - self.attention(teacher, size)
        return {"loss": difference.pow(2).mean()}
